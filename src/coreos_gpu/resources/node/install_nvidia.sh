#!/bin/sh
# Installs the NVIDIA driver bundle this script came in: run it from the extracted archive.
#
#   tar xzf nvidia.tar.gz -C /tmp && sudo /tmp/install_nvidia.sh
#
# The driver goes to /opt/nvidia/<driver>-<bundle id>/ through a temporary folder and a
# rename, and /opt/nvidia/current flips to it in one rename: until then the previous driver
# stays in use, and a run stopped at any point leaves the old or the new driver complete,
# never a mix. Everything else it adds (ld.so.conf.d entry, unit, agent drop-ins, /opt/bin
# links) points through /opt/nvidia/current. Running it again is safe.
#
# Exit codes:
#   0  installed (and the driver started, unless --no-start), or uninstalled
#   1  a step failed (the message says which)
#   2  bad command line
#   3  not run as root
#   4  the bundle is corrupt or incomplete (a file does not match SHA256SUMS)
#   5  not enough free space
#   6  another install_nvidia.sh kept the lock for 10 minutes
#   7  a command this script needs is missing
#   10 installed, but the driver did not start (startup.sh's reason is shown above)
# "A && B || die …" means: die when either fails.
# shellcheck disable=SC2015
set -u
PROG=install_nvidia.sh

usage() {
	cat <<'EOF'
usage: install_nvidia.sh [--root DIR] [--no-start] [--no-enable] [--uninstall] [--dry-run]
  --root DIR    install into the tree under DIR (an image being prepared, a test tree)
  --no-start    do not load the driver now (it loads at the next boot)
  --no-enable   do not enable nvidia.service
  --uninstall   remove everything this script added, and nothing else
  --dry-run     check the bundle and say what would be done, without changing anything
EOF
}

ROOT=
START=1
ENABLE=1
UNINSTALL=0
DRY=0
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
	-h | --help) usage; exit 0 ;;
	*) printf '%s: error: unknown argument %s\n' "$PROG" "$1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

BUNDLE=$(cd "$(dirname "$0")" && pwd -P) || exit 1
[ -r "$BUNDLE/node/lib.sh" ] || {
	printf '%s: error: %s/node/lib.sh is missing: extract the whole archive\n' "$PROG" "$BUNDLE" >&2
	exit 4
}
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$BUNDLE/node/lib.sh"
ROOT=$(parse_root "$ROOT")
[ -z "$ROOT" ] || [ -d "$ROOT" ] || die 2 "--root $ROOT is not a folder"
# A node's systemd is only asked to reload and start things on a real node, not in a tree.
[ -z "$ROOT" ] || START=0

# replace_link TARGET PATH: make PATH a symlink to TARGET in one rename (ln -sf is not
# atomic: it unlinks first). mv -T keeps mv from moving into a linked folder.
replace_link() {
	[ "$(readlink "$2" 2>/dev/null)" = "$1" ] && return 0
	act ln -s "$1" "$2.tmp.$$" && act mv -Tf "$2.tmp.$$" "$2"
}

# write_file PATH TEXT: the same, for a small file.
write_file() {
	[ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && return 0
	if [ "$DRY" = 1 ]; then
		say "would write $1"
		return 0
	fi
	printf '%s\n' "$2" >"$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"
}

# make_dir DIR: mkdir -p, and remember each folder made (in $OPT/.created-dirs, written
# first: a stop between the two leaves a record of a folder, never a folder without one),
# so --uninstall removes it again.
make_dir() {
	[ -d "$1" ] && return 0
	make_dir "$(dirname "$1")" || return 1
	if [ "$DRY" = 0 ] && ! grep -qxF "${1#"$ROOT"}" "$ROOT$OPT/.created-dirs" 2>/dev/null; then
		printf '%s\n' "${1#"$ROOT"}" >>"$ROOT$OPT/.created-dirs" || return 1
	fi
	act mkdir "$1"
}

# ours PATH: a link this script made (it points into /opt/nvidia).
ours() {
	case $(readlink "$1" 2>/dev/null) in
	"$OPT"/* | current/*) return 0 ;;
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

run_ldconfig() {
	if [ -n "$ROOT" ]; then
		act ldconfig -r "$ROOT"
	else
		act ldconfig
	fi
}

UNITS=$ROOT/etc/systemd/system
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
lock() {
	make_opt || die 1 "cannot create $OPT under ${ROOT:-/}"
	[ "$DRY" = 1 ] && return 0
	exec 9>>"$ROOT$OPT/.lock" || die 1 "cannot open the lock file $ROOT$OPT/.lock"
	flock -w 600 9 || die 6 "another install_nvidia.sh holds $ROOT$OPT/.lock; wait for it to finish"
}

# A run that was killed leaves temporary names behind: clear them under the lock.
clean_leftovers() {
	for left in "$ROOT$OPT"/.stage.* "$ROOT$OPT"/*.tmp.* "$ROOT/opt/bin"/*.tmp.* \
		"$ROOT/opt".tmp.* "$ROOT$OPT".tmp.* \
		"$UNITS"/*.tmp.* "$UNITS"/*.d/*.tmp.* "$LDCONF".tmp.*; do
		[ -e "$left" ] || [ -L "$left" ] || continue
		act rm -rf "$left"
	done
}

uninstall() {
	lock
	clean_leftovers
	[ -L "$ROOT$OPT/current" ] || [ -e "$UNITS/nvidia.service" ] || [ -f "$LDCONF" ] ||
		say "no coreos-gpu driver is installed under ${ROOT:-/}; removing what is left, if anything"
	# First what activates the driver, then the driver: a stop midway leaves nothing that
	# points at a missing file for long, and a second --uninstall finishes the job.
	if [ -L "$UNITS/nvidia.service" ] && ours "$UNITS/nvidia.service"; then
		systemctl_root disable nvidia.service >/dev/null 2>&1 || true
		act rm -f "$UNITS/nvidia.service"
	fi
	for dropin in "$UNITS"/*.d/"$DROPIN_NAME"; do
		ours "$dropin" && act rm -f "$dropin"
	done
	for link in "$ROOT"/opt/bin/*; do
		ours "$link" && act rm -f "$link"
	done
	if [ -f "$LDCONF" ] && grep -q '^# coreos-gpu' "$LDCONF"; then
		act rm -f "$LDCONF"
	fi
	CREATED=$(cat "$ROOT$OPT/.created-dirs" 2>/dev/null || true)
	# Only what this script puts in /opt/nvidia: an earlier tool's files there stay.
	for item in "$ROOT$OPT"/current "$ROOT$OPT"/previous "$ROOT$OPT"/startup.sh \
		"$ROOT$OPT"/*/node/bundle.env; do
		[ -e "$item" ] || [ -L "$item" ] || continue
		case $item in */node/bundle.env) item=${item%/node/bundle.env} ;; esac
		act rm -rf "$item"
	done
	act rm -f "$ROOT$OPT/.created-dirs" "$ROOT$OPT/.lock"
	# Folders it made, deepest first, where they are empty now.
	printf '%s\n' "$CREATED" | sort -r | while read -r dir; do
		[ -n "$dir" ] && [ -d "$ROOT$dir" ] && act rmdir "$ROOT$dir" 2>/dev/null
	done
	act rmdir "$ROOT$OPT" 2>/dev/null || true
	run_ldconfig || warn "ldconfig failed; run it by hand"
	[ -n "$ROOT" ] || systemctl_root daemon-reload || true
	say "uninstalled; modules already loaded stay loaded until the next reboot"
	exit 0
}

# --- checks: nothing on the node changes before they pass ---------------------------------
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
	die 3 "run me as root (sudo $0)"
fi
need_tools 7 sha256sum flock mktemp readlink df du cp mv ln rm awk sort ldconfig
[ "$ENABLE" = 0 ] && [ "$START" = 0 ] && [ "$UNINSTALL" = 0 ] || need_tools 7 systemctl
[ "$UNINSTALL" = 0 ] || uninstall

[ -r "$BUNDLE/node/bundle.env" ] && [ -r "$BUNDLE/SHA256SUMS" ] ||
	die 4 "$BUNDLE is not a whole coreos-gpu bundle (node/bundle.env or SHA256SUMS is missing); extract the whole archive"
# shellcheck source=/dev/null
. "$BUNDLE/node/bundle.env"
PAYLOAD=$BUNDLE/payload/$DRIVER_VERSION

# Every file against SHA256SUMS, and no file that SHA256SUMS does not list. openssl uses the
# CPU's SHA instructions (4x coreutils' sha256sum here), one file per process on every core
# (one short line each: pipe writes that small never interleave); sha256sum without openssl.
check_sums() {
	if command -v openssl >/dev/null 2>&1; then
		cs_files=$(sed 's/^[0-9a-f]* [ *]//' SHA256SUMS)
		printf '%s\n' "$cs_files" | while read -r cs_file; do
			[ -f "$cs_file" ] || { printf '%s: missing\n' "$cs_file"; break; }
		done
		cs_cores=$(nproc 2>/dev/null || echo 1)
		printf '%s\n' "$cs_files" | tr '\n' '\0' |
			xargs -0 -n 1 -P "$cs_cores" openssl dgst -sha256 -r 2>/dev/null |
			awk 'NR == FNR { sum = $1; sub(/^[0-9a-f]+ [ *]/, ""); want[$0] = sum; next }
				{ sum = $1; sub(/^[0-9a-f]+ [ *]/, ""); seen[$0] = 1; if (want[$0] != sum) print $0 ": FAILED" }
				END { for (f in want) if (!(f in seen)) print f ": unreadable" }' SHA256SUMS -
	else
		sha256sum -c --strict --quiet SHA256SUMS 2>&1
	fi
}
BAD=$(cd "$BUNDLE" && check_sums | head -n 1)
[ -z "$BAD" ] ||
	die 4 "the bundle in $BUNDLE is corrupt: $BAD; download and extract it again"
EXTRA=$(cd "$BUNDLE" && find . -type f ! -path ./SHA256SUMS | sed 's|^\./||' | awk '
	NR == FNR { sub(/^[0-9a-f]+ [ *]/, ""); listed[$0] = 1; next }
	!($0 in listed) { print; exit }' SHA256SUMS -)
[ -z "$EXTRA" ] ||
	die 4 "the bundle in $BUNDLE has a file SHA256SUMS does not list: $EXTRA; extract the archive into an empty folder"
[ -d "$PAYLOAD" ] || die 4 "$PAYLOAD is missing; extract the whole archive"

ID=$(sha256sum "$BUNDLE/SHA256SUMS" | cut -c1-12)
NAME=$DRIVER_VERSION-$ID
DEST=$ROOT$OPT/$NAME
RUNNING=$(uname -r)
case " $KERNEL_RELEASES " in
*" $RUNNING "*) ;;
*) warn "this node runs kernel $RUNNING, but the bundle has modules only for $KERNEL_RELEASES: the driver will not load until the node boots one of those" ;;
esac

if [ ! -d "$DEST" ]; then
	NEED=$(du -sk "$PAYLOAD" "$BUNDLE/node" | awk '{ s += $1 } END { print s + 1024 }')
	SPACE=$ROOT$OPT
	while [ ! -d "$SPACE" ]; do SPACE=$(dirname "$SPACE"); done  # the first install makes it
	FREE=$(df -Pk "$SPACE" | awk 'NR == 2 { print $4 }')
	[ "${FREE:-0}" -ge "$NEED" ] ||
		die 5 "not enough space for the driver in $ROOT$OPT: $((NEED / 1024)) MiB needed, $((${FREE:-0} / 1024)) MiB free; free some space and run me again"
fi

lock
clean_leftovers

# --- the driver folder ----------------------------------------------------------------------
if [ -d "$DEST" ]; then
	say "driver $DRIVER_VERSION ($ID) is installed already in $OPT/$NAME"
else
	if [ "$DRY" = 1 ]; then
		say "would install driver $DRIVER_VERSION ($ID) into $OPT/$NAME"
	else
		STAGE=$(mktemp -d "$ROOT$OPT/.stage.XXXXXX") || die 1 "cannot create a folder in $ROOT$OPT"
		cp -a "$PAYLOAD/." "$STAGE/" &&
			cp -a "$BUNDLE/node" "$BUNDLE/startup.sh" "$BUNDLE/nvidia.service" \
				"$BUNDLE/MANIFEST.json" "$BUNDLE/SHA256SUMS" "$STAGE/" ||
			die 1 "cannot copy the driver into $STAGE"
		# The soname links (libnvidia-ml.so.1 -> …) are ldconfig's to make, in the new folder
		# before it goes live; the cache itself is refreshed once current points there.
		[ ! -d "$STAGE/lib64" ] || ldconfig -n "$STAGE/lib64" || die 1 "ldconfig -n $STAGE/lib64 failed"
		chmod 0755 "$STAGE" && sync -f "$STAGE" || die 1 "cannot write $STAGE to disk"
		mv "$STAGE" "$DEST" || die 1 "cannot rename $STAGE to $DEST"
		say "installed driver $DRIVER_VERSION ($ID) into $OPT/$NAME"
	fi
fi

# --- what points through current (constant: it never names a version) ----------------------
make_dir "$ROOT/etc/ld.so.conf.d" && write_file "$LDCONF" "$LDCONF_TEXT" ||
	die 1 "cannot write $LDCONF"
replace_link current/startup.sh "$ROOT$OPT/startup.sh" || die 1 "cannot link $OPT/startup.sh"
make_dir "$UNITS" && replace_link "$OPT/current/nvidia.service" "$UNITS/nvidia.service" ||
	die 1 "cannot link $UNITS/nvidia.service"
for unit in $AGENT_UNITS; do
	make_dir "$UNITS/$unit.d" &&
		replace_link "$OPT/current/node/agent-dropin.conf" "$UNITS/$unit.d/$DROPIN_NAME" ||
		die 1 "cannot add the drop-in for $unit"
done
make_dir "$ROOT/opt/bin" || die 1 "cannot create /opt/bin"
for tool in "$PAYLOAD"/bin/* "$BUNDLE/node/nvidia-doctor"; do
	[ -e "$tool" ] || continue
	tool=${tool##*/}
	target=$OPT/current/bin/$tool
	[ "$tool" != nvidia-doctor ] || target=$OPT/current/node/nvidia-doctor
	if [ -e "$ROOT/opt/bin/$tool" ] && ! ours "$ROOT/opt/bin/$tool"; then
		warn "/opt/bin/$tool is not coreos-gpu's; leaving it"
		continue
	fi
	replace_link "$target" "$ROOT/opt/bin/$tool" || die 1 "cannot link /opt/bin/$tool"
done

# --- the switch: one rename -------------------------------------------------------------------
# `previous` names the driver before the last switch: kept for a rollback, and set before
# the switch so that a run stopped after it keeps the same one.
WAS=$(readlink "$ROOT$OPT/current" 2>/dev/null || true)
if [ -n "$WAS" ] && [ "$WAS" != "$NAME" ]; then
	replace_link "$WAS" "$ROOT$OPT/previous" || die 1 "cannot link $OPT/previous"
fi
replace_link "$NAME" "$ROOT$OPT/current" || die 1 "cannot point $OPT/current at $NAME"
[ "$WAS" = "$NAME" ] || [ "$DRY" = 1 ] || say "$OPT/current is now $NAME${WAS:+ (was $WAS)}"
PREVIOUS=$(readlink "$ROOT$OPT/previous" 2>/dev/null || true)

# --- after the switch: caches, units, old versions -------------------------------------------
run_ldconfig || die 1 "ldconfig failed"
for dropin in "$UNITS"/*.d/"$DROPIN_NAME"; do
	ours "$dropin" || continue
	unit=${dropin%/*}
	unit=${unit##*/}
	case " $AGENT_UNITS " in *" ${unit%.d} "*) continue ;; esac
	act rm -f "$dropin"
done
# Keep the previous driver (a rollback is one install_nvidia.sh of its bundle away).
for old in "$ROOT$OPT"/*/; do
	old=${old%/}
	old=${old##*/}
	case $old in "$NAME" | "$PREVIOUS" | current | previous) continue ;; esac
	[ -f "$ROOT$OPT/$old/node/bundle.env" ] && act rm -rf "${ROOT:?}$OPT/$old"
done
[ -n "$ROOT" ] || systemctl_root daemon-reload || die 1 "systemctl daemon-reload failed"
[ "$ENABLE" = 0 ] || systemctl_root enable nvidia.service ||
	die 1 "systemctl enable nvidia.service failed"
if [ "$START" = 1 ]; then
	# startup.sh here, so its words reach the terminal; then the unit, so systemd knows.
	act "$ROOT$OPT/startup.sh" || die 10 "installed driver $DRIVER_VERSION, but it did not start (exit $?): see above, fix it, then: systemctl restart nvidia.service"
	systemctl_root start nvidia.service || die 10 "installed driver $DRIVER_VERSION, but nvidia.service failed: journalctl -u nvidia.service"
fi
if [ "$DRY" = 1 ]; then
	say "dry run: nothing was changed"
else
	say "done: driver $DRIVER_VERSION in $OPT/current"
fi
