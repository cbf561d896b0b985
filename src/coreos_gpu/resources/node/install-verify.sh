# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# install_nvidia.sh: the bundle's own checks.
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

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
# differs, by its path in the archive. (sha256.sh: openssl, else sha256sum)
check_sums() {
	# "<sum> <path here> <path in the archive>" per file. A line is 64 lower-case hex digits,
	# a space, a space or *, and a plain relative path without white space, each path once
	# (as layout.parse_sums reads it; spec/sha256sums.json): a path the archive cannot hold
	# (../x, ./x, a//b) would hash a file other than the one it names.
	cs_list=$(awk -v strip="$1" '{
		sum = $1; sub(/^[0-9a-f]+ [ *]/, ""); archived = $0
		if (length(sum) != 64 || sum ~ /[^0-9a-f]/ || $0 == "" || $0 ~ /[ \t\r]/ ||
			$0 ~ /^\/|\/\/|(^|\/)\.\.?(\/|$)/ || $0 == "SHA256SUMS" || (archived in listed)) exit 1
		listed[archived] = 1
		if (strip != "" && index($0, strip) == 1) $0 = substr($0, length(strip) + 1)
		print sum, $0, archived }' SHA256SUMS) && [ -n "$cs_list" ] || {
		printf 'SHA256SUMS could not be read, or a line of it is malformed'
		return 0
	}
	[ -n "${SHA256_TOOL:-}" ] || sha256_command
	case $SHA256_TOOL in
	openssl*)
		cs_cores=$(nproc 2>/dev/null || echo 1)
		[ "$cs_cores" -le 8 ] 2>/dev/null || cs_cores=8 ;;
	*) cs_cores=1 ;;
	esac
	# "<core> <path here>" per file that is there (stat: a missing one is "unreadable" below)
	cs_shares=$(printf '%s\n' "$cs_list" | cut -d' ' -f2 | tr '\n' '\0' |
		xargs -0 stat -c '%s %n' 2>/dev/null | sort -rn | awk -v n="$cs_cores" '{
			c = 0
			for (i = 1; i < n; i++) if (bytes[i] < bytes[c]) c = i
			bytes[c] += $1
			print c, $2 }')
	# shellcheck disable=SC2086 # SHA256_TOOL is a command and its options
	{
		printf '%s\n' "$cs_list"
		printf '%s\n' '--- hashed'
		cs_core=0
		while [ "$cs_core" -lt "$cs_cores" ]; do
			printf '%s\n' "$cs_shares" | awk -v c="$cs_core" '$1 == c { print $2 }' | tr '\n' '\0' |
				xargs -0 -r $SHA256_TOOL 2>/dev/null &
			cs_core=$((cs_core + 1))
		done
		wait
	} | awk -v strip="$1" '
		# Every file node/contents lists (check_tree holds the tree to it) must be listed here
		# too, or it would go unchecked, and --expect-sha256 pins SHA256SUMS alone.
		BEGIN {
			while ((getline line < "node/contents") > 0) {
				if (split(line, entry, " ") < 3 || entry[2] != "file" || entry[3] == "SHA256SUMS")
					continue
				path = entry[3]
				if (strip != "" && index(path, strip) == 1) path = substr(path, length(strip) + 1)
				contents[path] = entry[3]
			}
		}
		$0 == "--- hashed" { hashed = 1; next }
		!hashed { want[$2] = $1; archived[$2] = $3; next }
		{ sum = $1; sub(/^[0-9a-f]+ [ *]/, ""); seen[$0] = 1
		  if (want[$0] != sum) { print archived[$0] ": FAILED"; done = 1; exit } }
		END {
			if (done) exit
			for (f in want) if (!(f in seen)) { print archived[f] ": unreadable"; exit }
			for (f in contents) if (!(f in want)) { print contents[f] ": not in SHA256SUMS"; exit }
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
# file of the bundle) has that sha256; else die INSTALL_CORRUPT, naming WHAT.
check_expected() {
	[ "$EXPECT" = 1 ] || return 0
	ce_sum=$(sha256_of "$1/SHA256SUMS") && [ -n "$ce_sum" ] ||
		die "$STEP_FAILED" "cannot read $1/SHA256SUMS"
	[ "$ce_sum" = "$EXPECT_SHA256" ] ||
		die "$INSTALL_CORRUPT" "$2 is not the one you expect: its SHA256SUMS has sha256 $ce_sum, not $EXPECT_SHA256 (--expect-sha256); extract the archive again, where only root can write"
}
