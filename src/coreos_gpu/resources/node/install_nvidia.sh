#!/bin/sh
# Installs the NVIDIA driver bundle this script came in: run it from the extracted archive.
#
#   tar xzf nvidia.tar.gz -C /tmp && sudo /tmp/install_nvidia.sh
#
# What it trusts: nothing from the folder it was extracted into is sourced or run. That
# folder may belong to whoever ran tar, and may hold other files: only the bundle's own
# names count (install_nvidia.sh, nvidia.service, startup.sh, MANIFEST.json, SHA256SUMS,
# node/, payload/). The bundle is copied into a root-owned staging folder under /opt/nvidia
# (moved, when node/fetch.sh extracted it into its own root-only folder there: see
# fetched_bundle), made root:root with the modes node/contents lists, and checked there,
# where nobody else can change it any more: every file against SHA256SUMS, every link
# against node/contents, nothing missing and nothing more. Only then is it renamed into place.
#
# --expect-sha256 HEX pins the bundle itself: the sha256 of the copy's SHA256SUMS (which
# covers every other file, node/contents with its links and modes too) must be HEX, the
# "contents sha256" coreos-gpu inspect shows; the bundle id is its first 12 digits. Without
# it, whoever can rewrite the extracted files and SHA256SUMS can hand root another bundle.
# It does not vouch for this script, which runs from the extracted folder: extract the
# archive where only root can write, as coreos-gpu render's provisioning does.
#
# The driver goes to /opt/nvidia/<driver>-<bundle id>/ through that staging folder, and
# /opt/nvidia/current flips to it in one rename: until then the previous driver stays in
# use, and a run stopped at any point leaves the old or the new driver complete, never a
# mix. What the boot runs is not reached through `current`, so that a broken `current` is
# reported and repaired rather than silently skipped: the unit, its entry point
# /opt/nvidia/startup.sh (node/boot.sh: it falls back to /opt/nvidia/previous), the agents'
# drop-ins and /opt/nvidia/nvidia-doctor are files of their own. The rest (ld.so.conf.d
# entry, /opt/bin links, the bundle's other units) points through current.
#
# One transaction: every path it changes is saved first, and a failure at any step, before
# the switch or after it, puts each back, removes the driver folder it added and then says
# why in one line: the node is as it was, the old driver current. Running it again is safe.
# The installed folder keeps a copy of this script: /opt/bin/nvidia-uninstall (or
# install_nvidia.sh --uninstall from /opt/nvidia/current) removes everything after a reboot
# has emptied /tmp.
#
# --stage installs the driver folder only, beside `current`, for a kernel the node boots
# later (an OS update waiting for its reboot): /opt/nvidia/staged records it, and at that
# boot startup.sh switches to it. node/fetch.sh stages what it fetches this way.
#
# On Flatcar, the image's own nvidia.service (setup-nvidia) compiles another driver into
# /opt/nvidia at boot; ours, of the same name in /etc/systemd/system, shadows it. An install
# stops a run of it, takes over its /opt/nvidia/current, /opt/bin tools and ld.so.conf.d
# entry, and once whole removes its build ("Flatcar's own recipe" below); --uninstall leaves
# the node to it again.
#
# Exit codes:
#   0      installed (and the driver started, unless --no-start; a repository's watcher and
#          retry timer, or the persistence daemon, that would not start are a warning), or
#          uninstalled; or staged, when the bundle has no modules for the running kernel
#          (see --force)
#   1      a step failed (the message says which; the node is as it was before the run)
#   2      bad command line
#   3      not run as root
#   4      the bundle is corrupt, incomplete or unsafe (a file does not match SHA256SUMS, a
#          link leaves the bundle, a file is missing or not part of the bundle), or not the
#          one --expect-sha256 names
#   5      not enough free space
#   6      another install_nvidia.sh kept the lock for 10 minutes
#   7      a command this script needs is missing
#   8      the bundle is not for this node: another OS or machine, or no modules for the
#          running kernel while a driver that cannot be staged beside is installed (--force);
#          or the node is not for it: Flatcar's NVIDIA sysext is enabled or merged (two
#          drivers), or the kernel loads only signed modules (lockdown, Secure Boot) and the
#          bundle's are unsigned
#   11-19  installed, but the driver did not start: 10 + startup.sh's exit code 3..9 (14:
#          kernel mismatch, 15: a module failed to load, 18: no usable GPU, …; see
#          startup.sh), 11 for any other
#   20     installed and startup.sh succeeded, but systemctl start nvidia.service failed
#   21-29  installed, but the bundle has no modules for the running kernel and fetching them
#          from the repository failed: startup.sh's code (see startup.sh and node/fetch.sh)
# "A && B || die …" means: die when either fails.
# shellcheck disable=SC2015
set -u
PROG=install_nvidia.sh

usage() {
	cat <<'EOF'
usage: install_nvidia.sh [--root DIR] [--no-start] [--no-enable] [--uninstall] [--dry-run]
                         [--stage [--release VERSION]] [--force] [--expect-sha256 HEX]
  --root DIR    install into the tree under DIR (an image being prepared, a test tree)
  --no-start    do not load the driver now (it loads at the next boot), nor start the
                repository's stage watcher and retry timer, or the persistence daemon
                (they start at the next boot)
  --no-enable   do not enable nvidia.service
  --uninstall   remove everything this script added, and nothing else (also: nvidia-uninstall)
  --dry-run     check the bundle and say what would be done, without changing anything
  --stage       install the driver folder beside the current one without switching to it,
                for a kernel the node boots later (startup.sh switches at that boot)
  --release VERSION  with --stage: the OS release it is staged for (nvidia-doctor shows it)
  --force       make the bundle current even when it has no modules for the running kernel
                (without it, such a bundle is staged beside the installed driver instead)
  --expect-sha256 HEX  install only the bundle whose SHA256SUMS has this sha256 (64 lower-case
                hex digits: "contents sha256" in coreos-gpu inspect), checked in the
                root-owned copy (on a dry run, in the extracted files)
EOF
}

ROOT=
START=1
ENABLE=1
UNINSTALL=0
DRY=0
STAGE_ONLY=0
STAGE_RELEASE=-
FORCE=0
EXPECT=0
EXPECT_SHA256=
# /opt/bin/nvidia-uninstall links to the installed copy of this script.
case ${0##*/} in nvidia-uninstall) UNINSTALL=1 ;; esac
while [ $# -gt 0 ]; do
	case $1 in
	--root)
		[ $# -ge 2 ] || { usage >&2; exit 2; }
		ROOT=$2
		shift ;;
	--root=*) ROOT=${1#--root=} ;;
	--no-start) START=0 ;;
	--no-enable) ENABLE=0 ;;
	--uninstall) UNINSTALL=1 ;;
	--dry-run) DRY=1 ;;
	--stage) STAGE_ONLY=1 ;;
	--force) FORCE=1 ;;
	--release)
		[ $# -ge 2 ] || { usage >&2; exit 2; }
		STAGE_RELEASE=$2
		shift ;;
	--release=*) STAGE_RELEASE=${1#--release=} ;;
	--expect-sha256)
		[ $# -ge 2 ] || { usage >&2; exit 2; }
		EXPECT=1
		EXPECT_SHA256=$2
		shift ;;
	--expect-sha256=*) EXPECT=1; EXPECT_SHA256=${1#--expect-sha256=} ;;
	-h | --help) usage; exit 0 ;;
	*) printf '%s: error: unknown argument %s\n' "$PROG" "$1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

# The shared helpers (say, die, act, parse_root, …) are copied in here when the bundle is
# built (node.py), so that nothing is sourced from the extracted folder; the line below is
# what a build replaces, and what shellcheck follows.
# shellcheck source=lib.sh
. "${0%/*}/node/lib.sh" # coreos-gpu: inline

SELF=$(readlink -f "$0") || die 1 "cannot resolve $0"
BUNDLE=${SELF%/*}
ROOT=$(parse_root "$ROOT")
[ -z "$ROOT" ] || [ -d "$ROOT" ] || die 2 "--root $ROOT is not a folder"
case $STAGE_ONLY:$UNINSTALL:$STAGE_RELEASE in
1:1:*) die 2 "--stage and --uninstall do not go together" ;;
0:*:[!-]*) die 2 "--release names the OS release a --stage is for: give --stage too" ;;
*:*:*[!A-Za-z0-9._+~-]* | *:*:) die 2 "--release $STAGE_RELEASE is not an OS release (e.g. 4081.2.0)" ;;
esac
# As sha256sum prints it: 64 digits, lower case.
[ "$EXPECT" = 0 ] || { [ "${#EXPECT_SHA256}" -eq 64 ] && case $EXPECT_SHA256 in *[!0-9a-f]*) false ;; esac; } ||
	die 2 "--expect-sha256 $EXPECT_SHA256 is not a sha256: give the 64 lower-case hex digits coreos-gpu inspect shows as contents sha256"
[ "$EXPECT$UNINSTALL" != 11 ] || die 2 "--expect-sha256 names a bundle to install; --uninstall installs none"
# A staged driver is not switched to: nothing starts, nothing is enabled.
[ "$STAGE_ONLY" = 0 ] || { START=0; ENABLE=0; }
# A node's systemd is only asked to reload and start things on a real node, not in a tree.
[ -z "$ROOT" ] || START=0
# The copy in an installed driver folder can only uninstall. Said only on positive evidence
# (this script sits in a driver folder of $OPT), never guessed from what a folder lacks: a
# bundle extracted from a download cut short has no payload/ either, and --uninstall would
# remove the node's working driver. That one is refused below as an incomplete bundle.
if [ "$UNINSTALL" = 0 ] && [ ! -d "$BUNDLE/payload" ] && [ -f "$BUNDLE/node/bundle.env" ] &&
	[ "${BUNDLE%/*}" = "$(readlink -f "$ROOT$OPT" 2>/dev/null)" ]; then
	die 2 "$BUNDLE is an installed driver, not an extracted bundle: run $SELF --uninstall, or install_nvidia.sh from an extracted archive"
fi

# make_dir DIR: mkdir -p, and remember each folder made (in $OPT/.created-dirs, written
# first: a stop between the two leaves a record of a folder, never a folder without one),
# so --uninstall removes it again.
make_dir() {
	[ -d "$1" ] && return 0
	make_dir "$(dirname "$1")" || return 1
	if [ "$DRY" = 0 ] && ! grep -qxF "${1#"$ROOT"}" "$ROOT$OPT/.created-dirs" 2>/dev/null; then
		txn_save "$ROOT$OPT/.created-dirs" &&
			quietly append_line "${1#"$ROOT"}" "$ROOT$OPT/.created-dirs" || return 1
	fi
	quietly act mkdir "$1" || return 1
	[ -z "${UNDO:-}" ] || txn_note made "$1"
}

# ours PATH: a link this script made (it points into /opt/nvidia).
ours() {
	case $(readlink "$1" 2>/dev/null) in
	"$OPT"/* | current/*) return 0 ;;
	*) return 1 ;;
	esac
}

# ours_file PATH: a unit or drop-in this script wrote: a file of its own (not a link) whose
# first line the build wrote ("# Written by coreos-gpu …").
ours_file() {
	[ -f "$1" ] && [ ! -L "$1" ] || return 1
	case $(head -n 1 "$1" 2>/dev/null) in
	"# Written by coreos-gpu"*) return 0 ;;
	*) return 1 ;;
	esac
}

systemctl_root() {
	if [ -n "$ROOT" ]; then
		act systemctl --root="$ROOT" "$@"
	else
		act systemctl "$@"
	fi
}

UNITS=$ROOT/etc/systemd/system
# Units a bundle may carry in node/, by its settings: with a repository, the retry timer (and
# the service it starts) and the watcher that stages the bundle for a downloaded OS update;
# with persistence = daemon, nvidia-persistenced.service.
BUNDLE_UNITS="nvidia-retry.timer nvidia-retry.service nvidia-stage.service nvidia-persistenced.service"
ENABLED_BUNDLE_UNITS="nvidia-retry.timer nvidia-stage.service nvidia-persistenced.service"
LDCONF=$ROOT/etc/ld.so.conf.d/nvidia.conf
LDCONF_TEXT="# coreos-gpu: the NVIDIA driver's libraries, found by the Mesos agent through ld.so.cache
$OPT/current/lib64"

# make_opt: $OPT (and /opt) appear in one rename, with the record of the folders made.
make_opt() {
	[ -d "$ROOT$OPT" ] && return 0
	if [ "$DRY" = 1 ]; then
		say "would create $OPT"
		return 0
	fi
	mo_top=$ROOT$OPT
	while [ ! -d "$(dirname "$mo_top")" ]; do mo_top=$(dirname "$mo_top"); done
	mo_tmp=$mo_top.tmp.$$
	mo_rest=$ROOT$OPT
	mo_rest=${mo_rest#"$mo_top"}  # "/nvidia" when /opt is missing too, else ""
	mkdir -p "$mo_tmp$mo_rest" || return 1
	if [ -n "$mo_rest" ]; then
		printf '%s\n' "${mo_top#"$ROOT"}" >"$mo_tmp$mo_rest/.created-dirs" || return 1
	fi
	# Another run may have made it meanwhile: then theirs stands.
	mv -T "$mo_tmp" "$mo_top" 2>/dev/null || rm -rf "$mo_tmp"
	[ -d "$ROOT$OPT" ]
}

# lock: serialise against a concurrent run; the lock file lives with the installation.
# --uninstall (and a first install whose bundle fails its checks) removes the lock file
# while holding it, so a run that was waiting on it may wake up holding a lock on a file
# nobody else can open any more: it then locks the file that is there now instead.
lock() {
	if [ "$DRY" = 1 ]; then
		make_opt
		return 0
	fi
	[ -e "$ROOT$OPT/.lock" ] || LOCK_MADE=1
	lock_tries=0
	while [ "$lock_tries" -lt 20 ]; do
		lock_tries=$((lock_tries + 1))
		make_opt || die 1 "cannot create $OPT under ${ROOT:-/}"
		check_lock_file "$ROOT$OPT/.lock"
		exec 9>>"$ROOT$OPT/.lock"
		flock -w 600 9 || die 6 "another install_nvidia.sh holds $ROOT$OPT/.lock; wait for it to finish"
		# The same file? (test -ef is not POSIX; /dev/fd/9 leads to the file even once removed)
		[ "$(stat -L -c %d:%i "$ROOT$OPT/.lock" 2>/dev/null)" = "$(stat -L -c %d:%i /dev/fd/9)" ] &&
			return 0
	done
	die 6 "$ROOT$OPT/.lock keeps being removed while this run waits for it; run me again when no other install_nvidia.sh runs"
}

# A run that was killed leaves temporary names behind: clear them under the lock.
clean_leftovers() {
	for left in "$ROOT$OPT"/.stage.* "$ROOT$OPT"/.undo.* "$ROOT$OPT"/.gone.* "$ROOT$OPT"/*.tmp.* "$ROOT/opt/bin"/*.tmp.* \
		"$ROOT/opt".tmp.* "$ROOT$OPT".tmp.* \
		"$UNITS"/*.tmp.* "$UNITS"/*.d/*.tmp.* "$LDCONF".tmp.*; do
		[ -e "$left" ] || [ -L "$left" ] || continue
		act rm -rf "$left"
	done
}

# drop_opt: remove the lock, the record and the folders this script made, where nothing of
# a driver is left in them (the end of --uninstall; a first install refused midway).
drop_opt() {
	do_created=$(cat "$ROOT$OPT/.created-dirs" 2>/dev/null || true)
	act rm -f "$ROOT$OPT/.created-dirs" "$ROOT$OPT/.lock"
	act rmdir "$ROOT$OPT" 2>/dev/null
	# Folders it made (none inside $OPT), deepest first, where they are empty now.
	printf '%s\n' "$do_created" | sort -r | while read -r do_dir; do
		[ -n "$do_dir" ] && [ -d "$ROOT$do_dir" ] && act rmdir "$ROOT$do_dir" 2>/dev/null
	done
	return 0
}

uninstall() {
	lock
	clean_leftovers
	[ -L "$ROOT$OPT/current" ] || [ -e "$UNITS/nvidia.service" ] || [ -f "$LDCONF" ] ||
		say "no coreos-gpu driver is installed under ${ROOT:-/}; removing what is left, if anything"
	# First what activates the driver, then the driver: a stop midway leaves nothing that
	# points at a missing file for long, and a second --uninstall finishes the job.
	for unit in nvidia.service $BUNDLE_UNITS; do
		{ [ -L "$UNITS/$unit" ] && ours "$UNITS/$unit"; } || ours_file "$UNITS/$unit" || continue
		# A watcher left running would stage a driver into the $OPT this removes; the
		# persistence daemon runs from it.
		[ -n "$ROOT" ] || [ "$unit" = nvidia.service ] || systemctl_root stop "$unit" >/dev/null 2>&1 || true
		systemctl_root disable "$unit" >/dev/null 2>&1 || true
		act rm -f "$UNITS/$unit"
	done
	for dropin in "$UNITS"/*.d/"$DROPIN_NAME"; do
		ours "$dropin" || ours_file "$dropin" || continue
		act rm -f "$dropin"
	done
	for link in "$ROOT"/opt/bin/*; do
		ours "$link" && act rm -f "$link"
	done
	if [ -f "$LDCONF" ] && grep -q '^# coreos-gpu' "$LDCONF"; then
		act rm -f "$LDCONF"
	fi
	# Only what this script puts in /opt/nvidia (and startup.sh's CDI spec, which names the
	# driver folders that go): an earlier tool's files there stay. This script may run from
	# one of these folders: sh has it open already, so it reads on.
	for item in "$ROOT$OPT"/current "$ROOT$OPT"/previous "$ROOT$OPT"/startup.sh \
		"$ROOT$OPT"/nvidia-doctor "$ROOT$STAGED" "$ROOT$CDI_SPEC" \
		"$ROOT$OPT"/.fetch.* "$ROOT$OPT"/*/node/bundle.env; do
		[ -e "$item" ] || [ -L "$item" ] || continue
		case $item in */node/bundle.env) item=${item%/node/bundle.env} ;; esac
		act rm -rf "$item"
	done
	drop_opt
	run_ldconfig || warn "ldconfig failed; run it by hand"
	[ -n "$ROOT" ] || systemctl_root daemon-reload || true
	say "uninstalled; modules already loaded stay loaded until the next reboot"
	# Nothing of setup-nvidia's is left (an install removes it): unshadowed, it starts over.
	[ ! -f "$ROOT$FLATCAR_UNIT" ] ||
		say "Flatcar's own nvidia.service (setup-nvidia) is no longer shadowed: at the next boot it downloads, builds and loads NVIDIA's driver$(recipe_driver | sed 's/^./ &/') on a node with an NVIDIA GPU (systemctl mask nvidia.service keeps it from doing so)"
	exit 0
}

# --- the bundle's own checks (no helper from the extracted folder: see the top) -----------
# The bundle's parts, relative to the folder it was extracted into; anything else there is
# not ours to look at.
TOP_NAMES="install_nvidia.sh nvidia.service startup.sh MANIFEST.json SHA256SUMS"

# check_contents: node/contents (in the current folder) describes a bundle that cannot
# reach outside itself: plain relative paths in the bundle's parts, no link to an absolute
# path or out of its folder (payload links stay in the driver folder), nothing beneath a
# link, no group- or world-writable file. Prints the first problem.
check_contents() {
	awk -v v="$DRIVER_VERSION" -v top=" $TOP_NAMES " '
		function fail(why) { print why; bad = 1; exit }
		{
			mode = $1; kind = $2; path = $3; target = $4
			if (NF != (kind == "link" ? 4 : 3) || (kind != "file" && kind != "link"))
				fail("node/contents line " NR " is malformed")
			if (path ~ /^\// || path ~ /(^|\/)\.\.?(\/|$)/ || path ~ /\/\//)
				fail(path ": not a plain relative path")
			base = ""
			if (index(path, "payload/") == 1) {
				base = "payload/" v "/"
				if (index(path, base) != 1)
					fail(path ": outside payload/" v)
				first = substr(path, length(base) + 1)
				sub(/\/.*/, "", first)
				if (first == "node" || index(top, " " first " "))
					fail(path ": would land on the driver folder'\''s own " first)
			} else if (index(path, "node/") != 1 && !index(top, " " path " "))
				fail(path ": not part of a coreos-gpu bundle")
			if (kind == "file" && (mode !~ /^[0-7]?[0-7][0-7][0-7]$/ ||
				substr(mode, length(mode) - 1, 1) ~ /[2367]/ || substr(mode, length(mode), 1) ~ /[2367]/))
				fail(path ": mode " mode " is not a safe file mode (group or world could write it)")
			if (kind == "link") {
				if (target ~ /^\//)
					fail(path ": links to the absolute path " target)
				depth = split(substr(path, length(base) + 1), up, "/") - 1
				n = split(target, hop, "/")
				for (i = 1; i <= n; i++) {
					if (hop[i] == "..") depth--
					else if (hop[i] != "." && hop[i] != "") depth++
					if (depth < 0)
						fail(path ": links to " target ", outside " (base == "" ? "the bundle" : base))
				}
				links[path] = 1
			}
			paths[NR] = path
		}
		END {
			if (bad) exit
			for (i in paths) for (l in links)
				if (index(paths[i], l "/") == 1) { print paths[i] ": lies beneath the link " l; exit }
			print "OK"
		}' node/contents
}

# check_tree STRIP [modes]: the current folder holds exactly the files and links node/contents
# lists (STRIP, the payload prefix, removed from their paths: "" in the extracted bundle,
# payload/<driver>/ in the driver folder), each of its kind (and, with "modes", each file
# with its mode); folders do not count. Prints
# the first difference. In the extracted bundle only the bundle's parts are looked at.
check_tree() {
	if [ -n "$1" ]; then
		ct_where=.
	else
		ct_where="$TOP_NAMES node payload"
	fi
	# shellcheck disable=SC2086 # the names are word-split on purpose
	{ cat node/contents; printf '%s\n' '--- found'; find $ct_where ! -type d -printf '%y %m %p %l\n' 2>/dev/null; } |
		awk -v strip="$1" -v modes="${2:-}" '
		function octal(m) { sub(/^0+/, "", m); return m }
		$0 == "--- found" { found = 1; next }
		!found {
			path = $3
			if (strip != "" && index(path, strip) == 1) path = substr(path, length(strip) + 1)
			want[path] = ($2 == "link") ? "l " $4 : "f"
			mode[path] = octal($1)
			next
		}
		{
			path = $3
			sub(/^\.\//, "", path)
			have = ($1 == "l") ? "l " $4 : $1
			seen[path] = 1
			if (!(path in want)) { print path ": not part of the bundle (node/contents does not list it)"; done = 1; exit }
			if (have == want[path]) {
				if (modes == "" || have != "f" || octal($2) == mode[path]) next
				print path ": mode " $2 ", not " mode[path]
			} else if (want[path] == "f") print path ": not a regular file"
			else if ($1 == "l") print path ": links to " $4 ", not " substr(want[path], 3)
			else print path ": not a link to " substr(want[path], 3)
			done = 1
			exit
		}
		END {
			if (done) exit
			for (path in want) if (!(path in seen)) { print path ": missing"; exit }
			print "OK"
		}'
}

# check_sums STRIP: every file in the current folder against SHA256SUMS (paths as in
# check_tree). openssl uses the CPU's SHA instructions (4x coreutils' sha256sum here), one
# process per core (at most 8: a bundle is a few hundred MiB), the files dealt out largest
# first to the one with the fewest bytes so far, so that all end about together (dealt in
# list order, one core was left hashing nvidia.ko alone); one short line per file: pipe writes
# that small never interleave. sha256sum where openssl is missing. Prints the first file that
# differs, by its path in the archive.
check_sums() {
	# "<sum> <path here> <path in the archive>" per file
	cs_list=$(awk -v strip="$1" '{
		sum = $1; sub(/^[0-9a-f]+ [ *]/, ""); archived = $0
		if (strip != "" && index($0, strip) == 1) $0 = substr($0, length(strip) + 1)
		print sum, $0, archived }' SHA256SUMS) && [ -n "$cs_list" ] || {
		printf 'SHA256SUMS could not be read'
		return 0
	}
	if command -v openssl >/dev/null 2>&1; then
		cs_cores=$(nproc 2>/dev/null || echo 1)
		[ "$cs_cores" -le 8 ] 2>/dev/null || cs_cores=8
		cs_hash="openssl dgst -sha256 -r"
	else
		cs_cores=1
		cs_hash=sha256sum
	fi
	# "<core> <path here>" per file that is there (stat: a missing one is "unreadable" below)
	cs_shares=$(printf '%s\n' "$cs_list" | cut -d' ' -f2 | tr '\n' '\0' |
		xargs -0 stat -c '%s %n' 2>/dev/null | sort -rn | awk -v n="$cs_cores" '{
			c = 0
			for (i = 1; i < n; i++) if (bytes[i] < bytes[c]) c = i
			bytes[c] += $1
			print c, $2 }')
	# shellcheck disable=SC2086 # cs_hash is a command and its options
	{
		printf '%s\n' "$cs_list"
		printf '%s\n' '--- hashed'
		cs_core=0
		while [ "$cs_core" -lt "$cs_cores" ]; do
			printf '%s\n' "$cs_shares" | awk -v c="$cs_core" '$1 == c { print $2 }' | tr '\n' '\0' |
				xargs -0 -r $cs_hash 2>/dev/null &
			cs_core=$((cs_core + 1))
		done
		wait
	} | awk '
		$0 == "--- hashed" { hashed = 1; next }
		!hashed { want[$2] = $1; archived[$2] = $3; next }
		{ sum = $1; sub(/^[0-9a-f]+ [ *]/, ""); seen[$0] = 1
		  if (want[$0] != sum) { print archived[$0] ": FAILED"; done = 1; exit } }
		END {
			if (done) exit
			for (f in want) if (!(f in seen)) { print archived[f] ": unreadable"; exit }
			print "OK"
		}'
}

# check_settings FILE: every value of a node/bundle.env in the grammar the build side gives it
# (config.py: UNIT, _url, the enums; keys.fingerprint; the payload's driver version): a value
# that is not would reach file names (an agent unit "../x" writes a drop-in outside the tree,
# ";" or "*" names other drop-ins) or comparisons that never match. One awk, no intervals
# ({n}: mawk lacks them). Prints the first problem.
check_settings() {
	cs_out=$(awk -v driver="$DRIVER_VERSION" "$BUNDLE_ENV_AWK"'
		function words(v, pattern,    n, i, w) {
			if (v == "" || v ~ /^ | $|  /) return 0
			n = split(v, w, " ")
			for (i = 1; i <= n; i++) if (w[i] !~ pattern) return 0
			return 1
		}
		function valid(key, v) {
			if (key == "DRIVER_VERSION") return v == driver
			if (key == "FLAVOUR") return v ~ /^(proprietary|open)$/
			if (key == "PROFILE") return v ~ /^(compute|full)$/
			if (key == "OS") return v ~ /^(flatcar|coreos)$/
			if (key == "ARCH") return v ~ /^(x86_64|aarch64)$/
			if (key == "ON_DRIVER_FAILURE") return v ~ /^(start-without-gpus|wait)$/
			if (key == "PERSISTENCE") return v ~ /^(daemon|legacy|off)$/
			if (key == "KERNEL_RELEASES") return words(v, "^[A-Za-z0-9._+~-]+$")
			if (key == "AGENT_UNITS") return words(v, "^[A-Za-z0-9@_.:\\\\-]+[.]service$")
			if (key == "REPOSITORY_URL") return v == "" || v ~ /^(https?|file):\/\/[^ \t]+$/
			if (key == "REPOSITORY_KEY_FINGERPRINT")
				return v == "" || (v ~ /^sha256:[0-9a-f]+$/ && length(v) == 71)
		}
		END {
			n = split("DRIVER_VERSION FLAVOUR PROFILE OS ARCH KERNEL_RELEASES AGENT_UNITS " \
				"ON_DRIVER_FAILURE PERSISTENCE REPOSITORY_URL REPOSITORY_KEY_FINGERPRINT", keys, " ")
			for (i = 1; i <= n; i++)
				if (!valid(keys[i], values[keys[i]])) {
					printf "node/bundle.env: %s=%s is not a valid value", keys[i], values[keys[i]]
					exit
				}
			print "OK"
		}' "$1" 2>&1)
	# Only a clean "OK" passes: an awk that failed says nothing, which is no verdict.
	[ "$cs_out" = OK ] || printf '%s' "${cs_out:-node/bundle.env could not be checked (awk failed)}"
}

# verdict OUTPUT WHAT: nothing when a check printed exactly "OK", else what it printed (or,
# when it printed nothing, that it could not run): a check that fails never passes a bundle.
verdict() {
	[ "$1" = OK ] || printf '%s' "${1:-$2 could not be checked (a command failed)}"
}

# check_bundle STRIP [structure]: all of the above, in the current folder; prints the first
# problem.
check_bundle() {
	cb_bad=$(verdict "$(check_contents)" node/contents)
	[ -n "$cb_bad" ] || cb_bad=$(verdict "$(check_tree "$1")" "the bundle's files")
	[ -n "$cb_bad" ] || [ "${2:-}" = structure ] || cb_bad=$(verdict "$(check_sums "$1")" "the bundle's sums")
	printf '%s' "$cb_bad"
}

# check_expected FOLDER WHAT: with --expect-sha256, FOLDER's SHA256SUMS (it covers every other
# file of the bundle) has that sha256; else die 4, naming WHAT.
check_expected() {
	[ "$EXPECT" = 1 ] || return 0
	ce_sum=$(sha256sum <"$1/SHA256SUMS") && ce_sum=${ce_sum%% *} && [ -n "$ce_sum" ] ||
		die 1 "cannot read $1/SHA256SUMS"
	[ "$ce_sum" = "$EXPECT_SHA256" ] ||
		die 4 "$2 is not the one you expect: its SHA256SUMS has sha256 $ce_sum, not $EXPECT_SHA256 (--expect-sha256); extract the archive again, where only root can write"
}

# check_fits_node: refuse (8) a bundle for another OS or machine; and decide what a bundle
# without modules for the running kernel does. Making it current would leave the node
# without a driver that loads until it boots one of those kernels, so it is staged beside
# the installed driver (startup.sh switches to it at that boot), as --stage does. Where it
# cannot be (no driver of its version and flavour is current), it is refused, unless
# --force; where no driver is installed, the node has nothing to lose: it becomes current.
check_fits_node() {
	cf_env=$BUNDLE/node/bundle.env
	# `current` is switched by renaming a link over it: a folder or file there (an earlier
	# tool's) would stop the switch, after the driver folder has landed.
	[ ! -e "$ROOT$OPT/current" ] || [ -L "$ROOT$OPT/current" ] ||
		die 1 "$ROOT$OPT/current is not a link (an earlier tool's folder?): move it out of $OPT and run me again"
	cf_os=$(os_release ID)
	case $cf_os in
	flatcar | coreos)
		[ "$cf_os" = "$(bundle_value OS "$cf_env")" ] ||
			die 8 "this bundle is for $(bundle_value OS "$cf_env"), but this node runs $cf_os; build one with --os $cf_os" ;;
	esac
	cf_arch=$(uname -m) && [ -n "$cf_arch" ] || die 1 "uname -m failed: cannot tell this node's machine"
	[ "$cf_arch" = "$(bundle_value ARCH "$cf_env")" ] ||
		die 8 "this bundle is for $(bundle_value ARCH "$cf_env") machines, but this node is $cf_arch; install a bundle built for $cf_arch"
	cf_kernels=$(kernel_releases_in "$PAYLOAD")
	cf_running=$(uname -r) && [ -n "$cf_running" ] || die 1 "uname -r failed: cannot tell the running kernel"
	# Flatcar's own NVIDIA driver as a sysext: two drivers never load on one node.
	find_nvidia_sysext "$cf_running"
	[ -z "$SYSEXT" ] ||
		die 8 "$SYSEXT: its driver and this one must not both load, so nothing was changed; to install this bundle, $SYSEXT_FIX, and run me again (or keep the sysext, Flatcar's signed driver, and do not install this one)"
	case " $cf_kernels" in *" $cf_running "*)
		# A driver made current that this kernel will not load (it loads only signed
		# modules): refused now, not at every boot. A staged one is startup.sh's to judge at
		# its boot.
		[ "$STAGE_ONLY" = 0 ] || return 0
		read_lockdown
		[ -n "$LOCKDOWN" ] || return 0
		cf_unsigned=$(first_unsigned "$PAYLOAD/modules/$cf_running"/*.ko)
		[ -z "$cf_unsigned" ] ||
			die 8 "this kernel loads only signed modules ($LOCKDOWN), and this bundle's ${cf_unsigned#"$BUNDLE/"} is unsigned: its driver cannot load here, so nothing was changed; $LOCKDOWN_CHOICES"
		return 0 ;;
	esac
	[ "$STAGE_ONLY" = 0 ] && [ "$FORCE" = 0 ] || return 0
	cf_current=$(link_of "$ROOT$OPT/current") || die 1 "cannot read the link $ROOT$OPT/current"
	installed_folder "$cf_current" || return 0
	[ "$cf_current" != "$NAME" ] || return 0  # current already: nothing to switch
	if [ "$(bundle_value DRIVER_VERSION "$ROOT$OPT/$cf_current/node/bundle.env")" = "$DRIVER_VERSION" ] &&
		[ "$(bundle_value FLAVOUR "$ROOT$OPT/$cf_current/node/bundle.env")" = "$(bundle_value FLAVOUR "$cf_env")" ]; then
		say "this node runs kernel $cf_running, and the bundle has modules only for ${cf_kernels% }: staging it beside $OPT/current, which stays $cf_current until the node boots one of those (--force makes it current now)"
		STAGE_ONLY=1
		START=0
		ENABLE=0
		return 0
	fi
	die 8 "this node runs kernel $cf_running, but the bundle has modules only for ${cf_kernels% }, and the installed driver ($cf_current) is another version or flavour, so it cannot be staged beside it; install a bundle built for kernel $cf_running, or give --force to switch to it anyway (the driver will not load until the node boots one of those kernels)"
}

# --- checks: nothing on the node changes before they pass ---------------------------------
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
	die 3 "run me as root (sudo $0)"
fi
need_tools 7 sha256sum flock mktemp readlink stat df du cp mv ln rm awk sed sort find xargs chmod \
	chown ldconfig cmp head
[ "$ENABLE" = 0 ] && [ "$START" = 0 ] && [ "$UNINSTALL" = 0 ] || need_tools 7 systemctl
[ "$UNINSTALL" = 0 ] || uninstall

# The driver version is the one folder in payload/ (bundle.env is read only once verified).
for version in "$BUNDLE"/payload/*/; do
	[ -n "${DRIVER_VERSION:-}" ] &&
		die 4 "$BUNDLE/payload holds more than one driver; extract the archive into an empty folder"
	DRIVER_VERSION=${version%/}
	DRIVER_VERSION=${DRIVER_VERSION##*/}
done
case ${DRIVER_VERSION:-*} in
"*" | *[!0-9.]*) die 4 "$BUNDLE is not a whole coreos-gpu bundle (no payload/<driver version>/); extract the whole archive" ;;
esac
[ -f "$BUNDLE/node/contents" ] && [ -f "$BUNDLE/SHA256SUMS" ] ||
	die 4 "$BUNDLE is not a whole coreos-gpu bundle (node/contents or SHA256SUMS is missing); extract the whole archive"
PAYLOAD=$BUNDLE/payload/$DRIVER_VERSION
# startup.sh switches only among folders of current's driver and flavour.
[ "$STAGE_ONLY" = 0 ] || [ -f "$ROOT$OPT/current/node/bundle.env" ] ||
	die 2 "--stage installs beside an installed driver, and none is installed under ${ROOT:-/}; run me without --stage"
# The bundle id: the first 12 hex digits of SHA256SUMS's sum (as the build names it).
SUM=$(sha256sum <"$BUNDLE/SHA256SUMS") || die 1 "cannot read $BUNDLE/SHA256SUMS"
ID=${SUM%"${SUM#????????????}"}
case $ID in *[!0-9a-f]* | "") die 1 "sha256sum gave no sum for $BUNDLE/SHA256SUMS" ;; esac
NAME=$DRIVER_VERSION-$ID
DEST=$ROOT$OPT/$NAME

# Here the shape of the bundle (cheap: names, kinds, link targets); the sums are checked on
# the root-owned copy (or here, on a dry run, where nothing is copied).
if [ "$DRY" = 1 ]; then
	BAD=$(cd "$BUNDLE" && check_bundle "")
else
	BAD=$(cd "$BUNDLE" && check_bundle "" structure)
fi
[ -z "$BAD" ] ||
	die 4 "the bundle in $BUNDLE is corrupt: $BAD; download and extract it again"
# Only now is anything read from the extracted folder: node/bundle.env is a regular file
# that node/contents lists (a FIFO there would have hung a read). What it says is checked
# again on the root-owned copy, with the sums, before anything lands.
check_fits_node
if [ "$STAGE_ONLY" = 1 ]; then
	for key in DRIVER_VERSION FLAVOUR; do
		[ "$(bundle_value "$key" "$ROOT$OPT/current/node/bundle.env")" = "$(bundle_value "$key" "$BUNDLE/node/bundle.env")" ] ||
			die 2 "--stage: this bundle's $key is $(bundle_value "$key" "$BUNDLE/node/bundle.env"), the installed driver's $(bundle_value "$key" "$ROOT$OPT/current/node/bundle.env"); startup.sh would never switch to it: install it without --stage"
	done
fi

if [ ! -d "$DEST" ]; then
	NEED=$(du -sk "$PAYLOAD" "$BUNDLE/node" | awk '{ s += $1 } END { print s + 1024 }')
	SPACE=$ROOT$OPT
	while [ ! -d "$SPACE" ]; do SPACE=$(dirname "$SPACE"); done  # the first install makes it
	FREE=$(df -Pk "$SPACE" | awk 'NR == 2 { print $4 }')
	case $NEED:$FREE in
	:* | *: | *[!0-9:]*) die 1 "cannot tell the space the driver needs (du) or the space free in $ROOT$OPT (df)" ;;
	esac
	[ "$FREE" -ge "$NEED" ] ||
		die 5 "not enough space for the driver in $ROOT$OPT: $((NEED / 1024)) MiB needed, $((FREE / 1024)) MiB free; free some space and run me again"
fi

# --- one transaction: any failure from here on leaves the node as it was -----------------------
# Before this run changes a path, the path is saved in $UNDO (.undo.* beside the drivers): a
# copy of the file or link there (cp -P keeps a link a link), or a note that there was none;
# each folder it makes is noted too. die (below) puts every one back, newest first, removes
# the driver folder it added, and only then says why. A run killed midway cannot do that: it
# leaves the old driver current, or the new one complete (see the top); the next run clears
# the journal it left.
UNDO=
UNDO_N=0
UNDO_SAVED=
SWITCHED=0
NL='
'
# What the last command that failed to change the node said (its last line): die adds it to
# its own line, so that the one line names the cause (a read-only file system, no space).
CAUSE=

# quietly CMD...: run CMD (a command, or a function whose changes are on disk only: it runs
# in a subshell), its words kept in CAUSE when it fails instead of printed; a dry run runs
# it as it is (what it would do is what it says).
quietly() {
	[ "$DRY" = 0 ] || { "$@"; return; }
	q_said=$("$@" 2>&1 >/dev/null) && return 0
	CAUSE=${q_said##*"$NL"}
	return 1
}

append_line() {
	printf '%s\n' "$1" >>"$2"
}

write_line() {
	printf '%s\n' "$1" >"$2"
}

# land_bundle: the bundle's parts, into the staging folder: copied (-P: links stay links; no
# -p: the copies are root's, not the extracting user's), or, for a bundle fetch.sh extracted
# (fetched_bundle), moved: one rename each, the payload's folder over the empty staging one.
land_bundle() {
	if [ "$LAND" = move ]; then
		# shellcheck disable=SC2086 # the names are word-split on purpose
		mv -T "$PAYLOAD" "$STAGE" && (cd "$BUNDLE" && mv node $TOP_NAMES "$STAGE/")
	else
		# shellcheck disable=SC2086 # the names are word-split on purpose
		cp -RP "$PAYLOAD/." "$STAGE/" && (cd "$BUNDLE" && cp -RP node $TOP_NAMES "$STAGE/")
	fi
}

# fetched_bundle: the extracted bundle lies in a work folder of node/fetch.sh's: directly in
# $OPT, named .fetch.*, mode 0700 and owned as $OPT is, on its file system. Nobody but root
# could reach it from the moment the archive, verified against the signed index, was
# extracted there, and fetch.sh removes it after this run: moving its files saves a copy of
# every byte, and the staging folder is checked all the same (shape, owner, modes, sums).
# Any other folder, the extracting user's above all, is copied from.
fetched_bundle() {
	fb_parent=${BUNDLE%/*}
	fb_opt=$(readlink -f "$ROOT$OPT" 2>/dev/null) && [ "${fb_parent%/*}" = "$fb_opt" ] || return 1
	case ${fb_parent##*/} in .fetch.*) ;; *) return 1 ;; esac
	[ ! -L "$fb_parent" ] && [ "$(stat -c '%u %a %d' "$fb_parent" 2>/dev/null)" = "$(stat -c '%u 700 %d' "$fb_opt" 2>/dev/null)" ]
}

# set_modes: the modes the bundle lists, one chmod call per mode (links have no mode of
# their own; folders are 0755). check_tree … modes then checks that every file has its own.
set_modes() {
	(cd "$STAGE" && find . -type d -exec chmod 0755 {} + &&
		awk -v strip="payload/$DRIVER_VERSION/" '$2 == "file" {
			if (index($3, strip) == 1) $3 = substr($3, length(strip) + 1); print $1, $3 }' node/contents |
		sort | awk '$1 != mode { if (mode != "") print ""; mode = $1; printf "%s", mode } { printf " %s", $2 } END { print "" }' |
		while read -r mode files; do
			# shellcheck disable=SC2086 # a list of plain relative paths
			chmod "$mode" $files || exit 1
		done)
}

txn_begin() {
	[ "$DRY" = 0 ] || return 0
	UNDO=$(mktemp -d "$ROOT$OPT/.undo.XXXXXX" 2>/dev/null) || {
		UNDO=
		die 1 "cannot create a folder in $ROOT$OPT for the journal; check that it is writable and has space"
	}
}

# txn_note KIND PATH: one journal entry (KIND saved: the copy is $UNDO/<n>; absent: remove
# PATH; made: a folder to rmdir; tree: a folder to remove whole; units: see txn_units).
txn_note() {
	UNDO_N=$((UNDO_N + 1))
	printf '%s %s\n' "$1" "$2" >"$UNDO/$UNDO_N.what" || die 1 "cannot write the journal in $UNDO"
}

# txn_save PATH...: before each PATH (a file or a link) changes; the first save of a path is
# the one that counts.
txn_save() {
	[ -n "$UNDO" ] || return 0
	for ts_path in "$@"; do
		case $NL$UNDO_SAVED in *"$NL$ts_path$NL"*) continue ;; esac
		UNDO_SAVED=$UNDO_SAVED$ts_path$NL
		if [ -e "$ts_path" ] || [ -L "$ts_path" ]; then
			quietly cp -pP "$ts_path" "$UNDO/$((UNDO_N + 1))" || die 1 "cannot save $ts_path in $UNDO"
			txn_note saved "$ts_path"
		else
			txn_note absent "$ts_path"
		fi
	done
}

# txn_units: before systemctl enables units, the links in *.wants and *.requires folders (and
# those folders) as they are, so that the ones it adds can go again.
txn_units() {
	[ -n "$UNDO" ] || return 0
	for tu_path in "$UNITS"/*.wants "$UNITS"/*.requires "$UNITS"/*.wants/* "$UNITS"/*.requires/*; do
		if [ -e "$tu_path" ] || [ -L "$tu_path" ]; then printf '%s\n' "$tu_path"; fi
	done >"$UNDO/$((UNDO_N + 1))" || die 1 "cannot write the journal in $UNDO"
	txn_note units "$UNITS"
}

# rollback: undo the journal, newest entry first (quietly: die says why; what cannot be put
# back is named in one warning).
rollback() {
	rb_failed=
	[ -z "$UNDO" ] || undo_journal
	# This run's temporary names, wherever a failed step left one.
	for rb_left in "$ROOT$OPT"/*.tmp."$$" "$ROOT/opt/bin"/*.tmp."$$" "$UNITS"/*.tmp."$$" "$UNITS"/*.d/*.tmp."$$" \
		"$LDCONF".tmp."$$"; do
		[ ! -e "$rb_left" ] && [ ! -L "$rb_left" ] || rm -f "$rb_left" 2>/dev/null || rb_failed="$rb_failed $rb_left"
	done
	# A first install leaves no /opt/nvidia behind (nor /opt, if it made that too).
	if [ "$LOCKING" = 1 ] && [ -d "$ROOT$OPT" ] && [ ! -e "$ROOT$OPT/current" ] && [ ! -L "$ROOT$OPT/current" ] &&
		! ls -d "$ROOT$OPT"/*/node/bundle.env >/dev/null 2>&1; then
		drop_opt
	elif [ "$LOCKING" = 1 ] && [ "$LOCK_MADE" = 1 ]; then
		rm -f "$ROOT$OPT/.lock"  # made by this run (it still holds it: see lock)
	fi
	if [ "$SWITCHED" = 1 ]; then
		run_ldconfig >/dev/null 2>&1 || rb_failed="$rb_failed ld.so.cache"
	fi
	if [ -z "$ROOT" ] && [ "$SYSTEMD_TOUCHED" = 1 ]; then
		systemctl daemon-reload >/dev/null 2>&1 || rb_failed="$rb_failed (systemctl daemon-reload)"
	fi
	# Flatcar's setup-nvidia, stopped by this run, builds its driver again.
	if [ "$RECIPE_STOPPED" = 1 ]; then
		systemctl start --no-block nvidia.service >/dev/null 2>&1 || rb_failed="$rb_failed (systemctl start nvidia.service)"
	fi
	[ -z "$rb_failed" ] || warn "could not put back:$rb_failed"
}

undo_journal() {
	rb_undo=$UNDO
	UNDO=
	rb_n=$UNDO_N
	while [ "$rb_n" -gt 0 ]; do
		read -r rb_kind rb_path <"$rb_undo/$rb_n.what" || rb_kind=
		case $rb_kind in
		saved) mv -Tf "$rb_undo/$rb_n" "$rb_path" ;;
		absent) rm -f "$rb_path" ;;
		made) rmdir "$rb_path" ;;
		tree) rm -rf "$rb_path" ;;
		units)
			for rb_unit in "$rb_path"/*.wants/* "$rb_path"/*.requires/* "$rb_path"/*.wants "$rb_path"/*.requires; do
				[ -e "$rb_unit" ] || [ -L "$rb_unit" ] || continue
				grep -qxF "$rb_unit" "$rb_undo/$rb_n" || rm -f "$rb_unit" 2>/dev/null || rmdir "$rb_unit"
			done ;;
		*) false ;;
		esac 2>/dev/null || rb_failed="$rb_failed $rb_path"
		rb_n=$((rb_n - 1))
	done
	rm -rf "$rb_undo"
}
SYSTEMD_TOUCHED=0
RECIPE_STOPPED=0
LOCKING=0
LOCK_MADE=0

# From here, every failure undoes the journal before it says why.
die() {
	die_code=$1
	shift
	die_cause=$CAUSE
	rollback
	printf '%s: error: %s%s\n' "$PROG" "$*" "${die_cause:+ ($die_cause)}" >&2
	exit "$die_code"
}
trap 'die 1 "stopped by a signal; the node is as it was"' HUP INT TERM

# txn_commit: the change is whole; nothing to undo any more.
txn_commit() {
	[ -z "$UNDO" ] || rm -rf "$UNDO" 2>/dev/null ||
		warn "cannot remove the journal $UNDO (the change is whole: the next run removes it)"
	UNDO=
	LOCKING=0
	SWITCHED=0
	SYSTEMD_TOUCHED=0
	trap - HUP INT TERM
}

# put_link TARGET PATH, put_file TEXT PATH, put_copy FILE PATH MODE: make PATH so (in one
# rename), saved first; nothing when it is so already.
put_link() {
	[ "$(readlink "$2" 2>/dev/null)" = "$1" ] && return 0
	txn_save "$2" && quietly replace_link "$1" "$2" || { rm -f "$2.tmp.$$" 2>/dev/null; return 1; }
}

put_file() {
	[ -f "$2" ] && [ ! -L "$2" ] && [ "$(cat "$2")" = "$1" ] && return 0
	if [ "$DRY" = 1 ]; then
		say "would write $2"
		return 0
	fi
	txn_save "$2" && quietly write_line "$1" "$2.tmp.$$" && quietly mv -f "$2.tmp.$$" "$2" ||
		{ rm -f "$2.tmp.$$" 2>/dev/null; return 1; }
}

put_copy() {
	[ -f "$2" ] && [ ! -L "$2" ] && cmp -s "$1" "$2" && return 0
	if [ "$DRY" = 1 ]; then
		say "would write $2"
		return 0
	fi
	txn_save "$2" && quietly cp "$1" "$2.tmp.$$" && quietly chmod "$3" "$2.tmp.$$" &&
		quietly mv -f "$2.tmp.$$" "$2" ||
		{ rm -f "$2.tmp.$$" 2>/dev/null; return 1; }
}

# put_away PATH: remove PATH, saved first.
put_away() {
	txn_save "$1" && quietly act rm -f "$1"
}

# disable UNIT: systemctl disable, its links saved first.
disable() {
	txn_save "$UNITS"/*.wants/"$1" "$UNITS"/*.requires/"$1"
	SYSTEMD_TOUCHED=1
	systemctl_root disable "$1" >/dev/null 2>&1 || true
}

# --- Flatcar's own recipe (lib.sh find_flatcar_recipe) -------------------------------------------
# setup-nvidia may be compiling into /opt/nvidia right now (a node provisioned at its first
# boot runs this script while Flatcar's nvidia.service runs too), or may have left a driver of
# its own. Two drivers must not share /opt/nvidia/current, /opt/bin and
# /etc/ld.so.conf.d/nvidia.conf: setup-nvidia's run is stopped, its `current` link and tools go
# (saved in the journal, like every change) and its ld.so.conf.d entry is replaced by ours;
# its driver folders and work folder go once the install is whole (drop_recipe). From then on
# our nvidia.service, of the same name in /etc/systemd/system, shadows Flatcar's.

# stop_recipe: stop Flatcar's nvidia.service while its setup-nvidia runs (on a node, while
# nvidia.service is still Flatcar's unit). systemd stops the compile with it; a rollback
# starts the unit again.
stop_recipe() {
	[ -z "$ROOT" ] && [ -f "$FLATCAR_UNIT" ] && command -v systemctl >/dev/null 2>&1 || return 0
	# systemd names the file by its unit folder: /lib/systemd/system on a split-/usr build.
	sr_fragment=$(systemctl show -p FragmentPath --value nvidia.service 2>/dev/null)
	[ -n "$sr_fragment" ] && [ "$(readlink -f "$sr_fragment")" = "$(readlink -f "$FLATCAR_UNIT")" ] &&
		[ "$(systemctl show -p ActiveState --value nvidia.service 2>/dev/null)" = activating ] || return 0
	sr_what="Flatcar's nvidia.service: its setup-nvidia is building NVIDIA's driver$(recipe_driver | sed 's/^./ &/') into $OPT, and coreos-gpu's nvidia.service replaces it"
	if [ "$DRY" = 1 ]; then
		say "would stop $sr_what"
		return 0
	fi
	say "stopping $sr_what"
	RECIPE_STOPPED=1
	quietly systemctl stop nvidia.service || die 1 "cannot stop Flatcar's nvidia.service (setup-nvidia)"
}

# take_over_recipe: setup-nvidia's `current` link and /opt/bin tools go (the switch and the
# tool links below put ours there), and its ld.so.conf.d entry is named (put_file below
# replaces it); one line says what.
take_over_recipe() {
	tr_what=
	if [ -n "$RECIPE_CURRENT" ]; then
		tr_what=" $OPT/current"
		put_away "$ROOT$OPT/current" || die 1 "cannot remove Flatcar's $OPT/current (setup-nvidia's)"
	fi
	for tr_tool in $RECIPE_TOOLS; do
		tr_what="$tr_what /opt/bin/$tr_tool"
		put_away "$ROOT/opt/bin/$tr_tool" || die 1 "cannot remove Flatcar's /opt/bin/$tr_tool (setup-nvidia's)"
	done
	tr_line=
	[ ! -f "$LDCONF" ] || read -r tr_line <"$LDCONF" || true
	[ "$tr_line" != "$OPT/current/usr/lib64" ] || tr_what="$tr_what ${LDCONF#"$ROOT"}"
	[ -n "$tr_what" ] || return 0
	say "taking over from Flatcar's setup-nvidia:$tr_what"
}

# drop_recipe: once the install is whole, setup-nvidia's driver folders (a few hundred MiB
# each) and its work folder (the ~6 GB developer container) go: coreos-gpu's driver replaces
# them, and left there they would mislead setup-nvidia itself after nvidia-uninstall (it
# skips the build for a kernel whose folder exists, then loads through a `current` that is
# gone). Out of sight first, one rename each, as drop_unbootable does.
drop_recipe() {
	[ -n "$RECIPE_TREES$RECIPE_WORK" ] || return 0
	dr_what=
	for dr_name in $RECIPE_TREES ${RECIPE_WORK:+workdir}; do
		act mv -T "$ROOT$OPT/$dr_name" "$ROOT$OPT/.gone.$dr_name.$$" &&
			act rm -rf "$ROOT$OPT/.gone.$dr_name.$$" || return 1
		dr_what="$dr_what $OPT/$dr_name"
	done
	[ "$DRY" = 1 ] ||
		say "removed Flatcar's setup-nvidia build:$dr_what (after nvidia-uninstall, Flatcar's nvidia.service builds its driver again at the next boot)"
}

LOCKING=1
lock
clean_leftovers
txn_begin

# --- the driver folder ----------------------------------------------------------------------
if [ -d "$DEST" ]; then
	check_expected "$DEST" "the bundle in $BUNDLE (installed already in $OPT/$NAME)"
	say "driver $DRIVER_VERSION ($ID) is installed already in $OPT/$NAME"
	FROM=$DEST
elif [ "$DRY" = 1 ]; then
	say "would install driver $DRIVER_VERSION ($ID) into $OPT/$NAME"
	FROM=$BUNDLE
	BAD=$(check_settings "$FROM/node/bundle.env")
	[ -z "$BAD" ] || die 4 "the bundle in $BUNDLE is unsafe: $BAD; rebuild it with coreos-gpu build"
	check_expected "$BUNDLE" "the extracted bundle in $BUNDLE"
else
	STAGE=$(mktemp -d "$ROOT$OPT/.stage.XXXXXX") || die 1 "cannot create a folder in $ROOT$OPT"
	txn_note tree "$STAGE"
	LAND=copy
	! fetched_bundle || LAND=move
	quietly land_bundle ||
		die 4 "cannot $LAND the bundle in $BUNDLE into $STAGE; extract the whole archive again"
	# Its shape before anything follows a path in it (chmod would follow a link), then
	# owner and modes, then the sums.
	BAD=$(cd "$STAGE" && check_bundle "payload/$DRIVER_VERSION/" structure)
	[ -z "$BAD" ] ||
		die 4 "the bundle in $BUNDLE changed after it was extracted: $BAD; download and extract it again, where only root can write"
	quietly chown -R -h 0:0 "$STAGE" || die 1 "cannot make $STAGE root's"
	quietly set_modes || die 1 "cannot set the modes of the files in $STAGE"
	BAD=$(cd "$STAGE" && verdict "$(check_tree "payload/$DRIVER_VERSION/" modes)" "the files' modes")
	[ -z "$BAD" ] || die 1 "cannot set the modes of the files in $STAGE: $BAD"
	BAD=$(cd "$STAGE" && verdict "$(check_sums "payload/$DRIVER_VERSION/")" "the bundle's sums")
	[ -z "$BAD" ] ||
		die 4 "the bundle in $BUNDLE is corrupt: $BAD (in its root-owned copy); download and extract it again"
	# The sums passed, so this one SHA256SUMS speaks for the whole copy.
	check_expected "$STAGE" "the extracted bundle in $BUNDLE"
	BAD=$(check_settings "$STAGE/node/bundle.env")
	[ -z "$BAD" ] ||
		die 4 "the bundle in $BUNDLE is unsafe: $BAD; rebuild it with coreos-gpu build"
	# The soname links (libnvidia-ml.so.1 -> …) are ldconfig's to make, in the new folder
	# before it goes live; the cache itself is refreshed once current points there.
	[ ! -d "$STAGE/lib64" ] || quietly ldconfig -n "$STAGE/lib64" || die 1 "ldconfig -n $STAGE/lib64 failed"
	quietly chmod 0755 "$STAGE" && quietly sync -f "$STAGE" || die 1 "cannot write $STAGE to disk"
	txn_note tree "$DEST"
	quietly mv -T "$STAGE" "$DEST" || die 1 "cannot rename $STAGE to $DEST"
	say "installed driver $DRIVER_VERSION ($ID) into $OPT/$NAME"
	FROM=$DEST
fi
SETTINGS=$FROM/node/bundle.env
# Both are never empty in a bundle (check_settings): empty here means the read failed.
AGENT_UNITS=$(bundle_value AGENT_UNITS "$SETTINGS") && [ -n "$AGENT_UNITS" ] &&
	KERNEL_RELEASES=$(bundle_value KERNEL_RELEASES "$SETTINGS") && [ -n "$KERNEL_RELEASES" ] ||
	die 1 "cannot read $SETTINGS"
if [ "$STAGE_ONLY" = 1 ]; then
	CURRENT=$(readlink "$ROOT$OPT/current" 2>/dev/null || true)
	if [ "$CURRENT" = "$NAME" ]; then
		say "driver $DRIVER_VERSION ($ID) is the current one already: nothing to stage"
	elif [ "$DRY" = 1 ]; then
		say "would record $OPT/$NAME in $STAGED as staged for release $STAGE_RELEASE"
	else
		txn_save "$ROOT$STAGED"
		record_staged "$NAME" "$STAGE_RELEASE" || die 1 "cannot write $ROOT$STAGED"
		say "staged driver $DRIVER_VERSION ($ID) for kernel $KERNEL_RELEASES in $OPT/$NAME; $OPT/current stays $CURRENT until the node boots that kernel"
	fi
	txn_commit
	exit 0
fi
RUNNING=$(uname -r)
case " $KERNEL_RELEASES " in
*" $RUNNING "*) ;;
*) warn "this node runs kernel $RUNNING, but the bundle has modules only for $KERNEL_RELEASES: the driver will not load until the node boots one of those" ;;
esac
stop_recipe
find_flatcar_recipe
take_over_recipe

# --- what the boot runs, outside the switched folder; the rest points through current ------------
# The unit, its entry point (boot.sh: it runs current's startup.sh, or says what is wrong with
# current and falls back to previous), the agents' drop-ins and the doctor are files of their
# own: a broken `current` cannot take them with it.
put_copy "$FROM/node/boot.sh" "$ROOT$OPT/startup.sh" 0755 || die 1 "cannot write $OPT/startup.sh"
put_copy "$FROM/node/nvidia-doctor" "$ROOT$OPT/nvidia-doctor" 0755 ||
	die 1 "cannot write $OPT/nvidia-doctor"
make_dir "$ROOT/etc/ld.so.conf.d" && put_file "$LDCONF_TEXT" "$LDCONF" || die 1 "cannot write $LDCONF"
make_dir "$UNITS" && put_copy "$FROM/nvidia.service" "$UNITS/nvidia.service" 0644 ||
	die 1 "cannot write $UNITS/nvidia.service"
# The bundle's units come and go with its settings (repository, persistence).
for unit in $BUNDLE_UNITS; do
	if [ -f "$FROM/node/$unit" ]; then
		put_link "$OPT/current/node/$unit" "$UNITS/$unit" || die 1 "cannot link $UNITS/$unit"
	elif [ -L "$UNITS/$unit" ] && ours "$UNITS/$unit"; then
		disable "$unit"
		put_away "$UNITS/$unit" || die 1 "cannot remove $UNITS/$unit"
	fi
done
for unit in $AGENT_UNITS; do
	make_dir "$UNITS/$unit.d" &&
		put_copy "$FROM/node/agent-dropin.conf" "$UNITS/$unit.d/$DROPIN_NAME" 0644 ||
		die 1 "cannot add the drop-in for $unit"
done
make_dir "$ROOT/opt/bin" || die 1 "cannot create /opt/bin"
# /opt/bin links, for humans: the driver's tools, the doctor, and nvidia-uninstall (the
# driver folder's copy of this script, which outlives the extracted bundle in /tmp).
TOOLS=
[ -d "$DEST" ] && TOOLS_FROM=$DEST || TOOLS_FROM=$PAYLOAD  # a dry run's first install
for tool in "$TOOLS_FROM"/bin/*; do
	[ -e "$tool" ] && TOOLS="$TOOLS ${tool##*/}:current/bin/${tool##*/}"
done
for entry in $TOOLS nvidia-doctor:nvidia-doctor nvidia-uninstall:current/install_nvidia.sh; do
	tool=${entry%%:*}
	# setup-nvidia's went above (a dry run only said so); anyone else's stay.
	case " $RECIPE_TOOLS " in *" $tool "*) ;; *)
		if [ -e "$ROOT/opt/bin/$tool" ] && ! ours "$ROOT/opt/bin/$tool"; then
			warn "/opt/bin/$tool is not coreos-gpu's; leaving it"
			continue
		fi ;;
	esac
	put_link "$OPT/${entry#*:}" "$ROOT/opt/bin/$tool" || die 1 "cannot link /opt/bin/$tool"
done

# --- the switch: one rename -------------------------------------------------------------------
txn_save "$ROOT$OPT/current" "$ROOT$OPT/previous"
SWITCHED=1
switch_current "$NAME" || die 1 "cannot point $OPT/current at $NAME"

# --- after the switch: caches, units -----------------------------------------------------------
run_ldconfig || die 1 "ldconfig failed"
for dropin in "$UNITS"/*.d/"$DROPIN_NAME"; do
	ours "$dropin" || ours_file "$dropin" || continue
	unit=${dropin%/*}
	unit=${unit##*/}
	case " $AGENT_UNITS " in *" ${unit%.d} "*) continue ;; esac
	put_away "$dropin" || die 1 "cannot remove $dropin"
done
SYSTEMD_TOUCHED=1
[ -n "$ROOT" ] || systemctl_root daemon-reload || die 1 "systemctl daemon-reload failed"
if [ "$ENABLE" = 1 ]; then
	txn_units
	systemctl_root enable nvidia.service || die 1 "systemctl enable nvidia.service failed"
	for unit in $ENABLED_BUNDLE_UNITS; do
		[ ! -L "$UNITS/$unit" ] || systemctl_root enable "$unit" || die 1 "systemctl enable $unit failed"
	done
fi
txn_commit

# Keep the previous driver (a rollback is one install_nvidia.sh of its bundle away, and
# Flatcar may boot the previous release again) and the staged ones. The install is whole
# already: a folder that cannot go now goes at the next run.
drop_unbootable || warn "cannot remove the drivers no boot wants any more from $OPT; the next install tries again"
drop_recipe || warn "cannot remove Flatcar's setup-nvidia build from $OPT; the next install tries again"

# start_bundle_units: the stage watcher, the retry timer and the persistence daemon, now:
# enabled, they start only at the next boot, and an OS update downloaded before it would go
# unstaged. After nvidia.service (an elapsed OnBootSec fires the timer at once, and its
# fetch.sh --retry must not race the install's own start). The timer and the watcher start
# whether or not the driver started (the retry timer is for that case); the daemon only when
# it did: its Requires= would start nvidia.service again, in the background, for a driver
# that just failed to load. The watcher is restarted: it runs the fetch.sh, settings and key
# of the driver that was current when it started; a running daemon is left alone (the same
# driver is loaded: another version needs a reboot). --no-block: the watcher is ordered after
# update-engine and the network, and must not hold the first boot's provisioning unit.
# A failure is a warning: the driver is installed, and they start at the next boot.
start_bundle_units() {
	for sbu_unit in $ENABLED_BUNDLE_UNITS; do
		[ -f "$FROM/node/$sbu_unit" ] || continue
		case $sbu_unit in
		nvidia-persistenced.service)
			[ "$STARTED:$UNIT_STARTED" = 0:1 ] || continue
			sbu_verb=start ;;
		*.service) sbu_verb=restart ;;
		*) sbu_verb=start ;;
		esac
		quietly systemctl_root "$sbu_verb" --no-block "$sbu_unit" ||
			warn "cannot start $sbu_unit (${CAUSE:-systemctl $sbu_verb failed}); it starts at the next boot, or now with: systemctl start $sbu_unit"
		CAUSE=
	done
}

if [ "$START" = 1 ]; then
	# startup.sh here, so its words reach the terminal; then the unit, so systemd knows.
	act "$ROOT$OPT/startup.sh"
	STARTED=$?
	UNIT_STARTED=1
	[ "$STARTED" != 0 ] || systemctl_root start nvidia.service || UNIT_STARTED=0
	start_bundle_units
	# startup.sh's own code shows through: 10 + its 3..9 (any other: 11).
	case $STARTED in
	0) ;;
	[3-9]) die $((10 + STARTED)) "installed driver $DRIVER_VERSION, but it did not start (startup.sh exit $STARTED): see above, fix it, then: systemctl restart nvidia.service" ;;
	2[1-9]) die "$STARTED" "installed driver $DRIVER_VERSION, but it has no modules for this kernel and none could be fetched (startup.sh exit $STARTED): see above" ;;
	*) die 11 "installed driver $DRIVER_VERSION, but startup.sh failed (exit $STARTED): see above, fix it, then: systemctl restart nvidia.service" ;;
	esac
	[ "$UNIT_STARTED" = 1 ] || die 20 "installed driver $DRIVER_VERSION and startup.sh loaded it, but systemctl start nvidia.service failed: journalctl -u nvidia.service"
fi
if [ "$DRY" = 1 ]; then
	say "dry run: nothing was changed"
else
	say "done: driver $DRIVER_VERSION in $OPT/current"
fi
