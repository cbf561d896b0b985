# shellcheck shell=sh
# "A && B || C" means C when either fails.
# shellcheck disable=SC2015
# Reading a bundle repository (publish.py writes it; docs/reference/repository.md), the node's one way:
# the signed index, then a bundle checked against it. Sourced by node/fetch.sh (which stages
# bundles for other kernels and OS releases), and copied by `coreos-gpu render` into
# provision.sh (which installs a node's first bundle), so both read a repository alike. POSIX
# sh; the caller defines say and die, sha256_of (node/sha256.sh) and the exit codes
# (node/exit-codes.sh: REPO_*, the same for both).
# The caller defines ROOT (the tree acted on, "" for /) and may set REPO_CHECK_ONLY=1 to
# check an index's generation without remembering it (fetch.sh --index: changes nothing).

# The most an index file may be: a server that sends more (an endless answer, junk appended)
# is cut off there, before it fills the node's disk (on Flatcar /opt shares ROOT with /var).
REPO_MAX_POINTER=1024  # index.current: one line
REPO_MAX_INDEX=16777216  # index/<sha256>.txt: a line per bundle, tens of thousands of them
REPO_MAX_SIGNATURE=65536  # index/<sha256>.txt.sig

# repo_download URL FILE SECONDS MAXBYTES: the whole file or a failure (its reason on stdout)
# within SECONDS, and never more than MAXBYTES written: the transfer goes through head, which
# stops reading one byte past the limit, so the client stops too. curl where there is one
# (both OSes ship it), else wget; file:// is read the same way (a hung NFS mount: bounded
# too). Redirects (S3 websites, CDNs, http to https) are followed as wget does, at most 3,
# and only to http(s) (curl: from https only to https; wget cannot be held to that).
repo_download() {
	rm -f "$2.rc" "$2.err"
	case $1 in
	file://*) timeout "$3" head -c "$(($4 + 1))" "${1#file://}" >"$2" 2>"$2.err"; echo $? >"$2.rc" ;;
	http://* | https://*)
		if command -v curl >/dev/null 2>&1; then
			case $1 in https://*) rd_redir='=https' ;; *) rd_redir='=http,https' ;; esac
			{
				timeout "$3" curl -fsS --proto =http,https -L --max-redirs 3 --proto-redir "$rd_redir" \
					--connect-timeout 10 --retry 2 --retry-delay 1 --retry-connrefused -o - "$1" 2>"$2.err"
				echo $? >"$2.rc"
			} | head -c "$(($4 + 1))" >"$2"
		else
			{
				# -nv, not -q: -q says nothing at all on failure (a 500 would give no reason).
				timeout "$3" wget -nv -T 10 -t 3 --max-redirect=3 -O - "$1" 2>"$2.err"
				echo $? >"$2.rc"
			} | head -c "$(($4 + 1))" >"$2"
		fi ;;
	*) printf 'not an http://, https:// or file:// URL'; return 1 ;;
	esac
	rd_rc=$(cat "$2.rc" 2>/dev/null) || rd_rc=1
	rd_size=$(wc -c <"$2" 2>/dev/null | tr -d ' ')
	if [ "${rd_size:-0}" -gt "$4" ]; then
		printf 'the answer is larger than %s bytes: cut off there' "$4"
		rd_rc=1
	elif [ "$rd_rc" = 124 ]; then
		printf 'no answer within %s s' "$3"
	elif [ "$rd_rc" != 0 ]; then
		cat "$2.err" 2>/dev/null
	elif [ "${rd_size:-0}" = 0 ]; then
		# Nothing a repository holds is empty. wget takes a 416 for "already complete" and
		# succeeds with nothing: a failed download, as curl says it is.
		printf 'the server answered with no data'
		[ ! -s "$2.err" ] || printf ' (%s)' "$(tail -n 1 "$2.err")"
		rd_rc=1
	fi
	rm -f "$2.rc" "$2.err"
	[ "$rd_rc" = 0 ]
}

# repo_pointer FILE: the index sha256 an index.current names; fails unless FILE is exactly one
# line "coreos-gpu-repository 1 <sha256>", single spaces, the final newline optional (as the
# Python reader, repository.parse_pointer: spec/pointer.json holds the cases both agree on).
repo_pointer() {
	awk 'NR == 1 && /^coreos-gpu-repository 1 [0-9a-f]+$/ && length($3) == 64 { sha = $3 }
		END { if (NR == 1 && sha != "") print sha; else exit 1 }' "$1"
}

# repo_index URL KEY WORK SECONDS: the repository's index, its signature checked with the
# public key KEY (openssl dgst -sha256 -verify), as WORK/index.txt. Each file within SECONDS.
repo_index() {
	ri_url=$1
	ri_err=$(repo_download "$ri_url/index.current" "$3/index.current" "$4" "$REPO_MAX_POINTER") ||
		die "$REPO_UNREACHABLE" "cannot read $ri_url/index.current: $(printf '%s' "$ri_err" | tail -n 1); check the repository URL and the network"
	ri_sha=$(repo_pointer "$3/index.current") ||
		die "$REPO_UNREACHABLE" "$ri_url/index.current is not 'coreos-gpu-repository 1 <sha256>': $ri_url is not a coreos-gpu repository of this format"
	for ri_name in "index/$ri_sha.txt" "index/$ri_sha.txt.sig"; do
		case $ri_name in *.sig) ri_max=$REPO_MAX_SIGNATURE ;; *) ri_max=$REPO_MAX_INDEX ;; esac
		ri_err=$(repo_download "$ri_url/$ri_name" "$3/${ri_name#index/}" "$4" "$ri_max") ||
			die "$REPO_UNREACHABLE" "cannot read $ri_url/$ri_name: $(printf '%s' "$ri_err" | tail -n 1)"
	done
	ri_err=$(openssl dgst -sha256 -verify "$2" -signature "$3/$ri_sha.txt.sig" "$3/$ri_sha.txt" 2>&1) ||
		die "$REPO_UNSIGNED" "$ri_url/index/$ri_sha.txt does not match its signature by the key in $2 (another key signed it, or it was changed): $(printf '%s' "$ri_err" | head -n 1); nothing was installed"
	[ "$(sha256_of "$3/$ri_sha.txt")" = "$ri_sha" ] ||
		die "$REPO_UNSIGNED" "$ri_url/index/$ri_sha.txt is signed, but not the index index.current names (its sha256 differs)"
	mv "$3/$ri_sha.txt" "$3/index.txt"
	repo_fresh "$ri_url" "$3/index.txt"
}

# Where a node remembers the highest generation it accepted, one file per signing key: under
# /var, so that removing or reinstalling every driver folder does not forget it.
REPO_STATE=/var/lib/coreos-gpu

# repo_fresh URL INDEX: refuses (28) a signed index older than one accepted before, and (29)
# one past its expiry (the node's clock against the expiry it was signed with); then
# remembers its generation. Only called on an index whose signature was checked.
repo_fresh() {
	rf_head=$(repo_check "$2") ||
		die "$REPO_UNSIGNED" "$1's signed index is not a coreos-gpu index of format 1: $rf_head; nothing was installed"
	read -r rf_gen rf_key rf_exp <<-EOF
	$rf_head
	EOF
	[ "$rf_exp" != - ] ||
		die "$REPO_EXPIRED" "$1's index (generation $rf_gen) has no expiry: it was signed before indexes expired, or replayed from then; the publisher runs coreos-gpu repository refresh; nothing was installed"
	rf_now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
	awk -v now="$rf_now" -v until="$rf_exp" 'BEGIN { exit !(now > until) }' &&
		die "$REPO_EXPIRED" "$1's index (generation $rf_gen) expired at $rf_exp (now $rf_now): the repository was not refreshed, a mirror serves an old copy, or this node's clock is wrong; the publisher runs coreos-gpu repository refresh (sync does it); nothing was installed"
	rf_file=$ROOT$REPO_STATE/generation.$rf_key
	rf_seen=0
	if [ -f "$rf_file" ]; then
		rf_seen=$(awk 'NR == 1 && /^[0-9]+$/ && length($0) < 16 { print; exit }' "$rf_file")
		[ -n "$rf_seen" ] || { say "warning: $rf_file does not hold a generation; it is written again"; rf_seen=0; }
	fi
	awk -v gen="$rf_gen" -v seen="$rf_seen" 'BEGIN { exit !(gen + 0 < seen + 0) }' &&
		die "$REPO_ROLLED_BACK" "$1's index is generation $rf_gen, older than generation $rf_seen this node accepted before ($rf_file): a mirror or cache serves an old copy, or index.current was rolled back; nothing was installed. If the repository was made again from nothing on purpose, remove $rf_file"
	[ "${REPO_CHECK_ONLY:-}" != 1 ] || return 0
	# A file a killed run left half-written has a name of its own: written whole, then renamed.
	for rf_old in "$rf_file".tmp.*; do
		[ ! -e "$rf_old" ] || rm -f "$rf_old"
	done
	[ "$rf_gen" != "$rf_seen" ] || return 0
	{ mkdir -p "${rf_file%/*}" && printf '%s\n' "$rf_gen" >"$rf_file.tmp.$$" && mv -f "$rf_file.tmp.$$" "$rf_file"; } 2>/dev/null ||
		{ rm -f "$rf_file.tmp.$$"; say "warning: cannot write $rf_file: this node cannot remember which index generation it accepted"; }
	return 0
}

# The line-based index, format 1 (docs/reference/repository.md "The line-based index"):
# repository.py's parse_text reads it by the same rules, and spec/index-text.json holds the
# cases both readers are tested on. Every awk here that reads it starts with REPO_AWK, so its
# layout is written once: bundle() is true for the current line when it is a well-formed
# bundle line (exactly 11 fields, single spaces), and sets b_driver … b_published;
# mine(d, f, p, os) is true when that bundle is one this node can install for driver d,
# flavour f, profile p ("" matches any) and OS os. Whole-line patterns rather than awk's
# fields: busybox awk splits fields at a CR too. Run with LC_ALL=C: bytes, ASCII ranges.
# shellcheck disable=SC2016 # awk's $, not the shell's
REPO_AWK='
BEGIN {
	R_TOKEN = "[A-Za-z0-9][A-Za-z0-9._+~:@-]*"
	R_NUMBER = "(0|[1-9][0-9]*)"
	R_TIME = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z"
	R_BUNDLE = "^bundle " R_TOKEN " " R_TOKEN " " R_TOKEN " " R_TOKEN " (-|" R_TOKEN "(," R_TOKEN ")*) "
	R_BUNDLE = R_BUNDLE R_TOKEN " bundles/[0-9a-f]+/nvidia[.]tar[.](gz|xz|zst) [0-9a-f]+ " R_NUMBER " " R_TIME "$"
}
function bundle(  x) {
	if ($0 !~ R_BUNDLE) return 0
	split($0, x, " ")
	# The path names the sha256: bundles/<sha256>/nvidia.tar.*. Numbers: at most 15 digits.
	if (length(x[9]) != 64 || substr(x[8], 9, 65) != (x[9] "/") || length(x[10]) > 15) return 0
	b_driver = "" x[2]; b_flavour = "" x[3]; b_profile = "" x[4]; b_os = "" x[5]
	b_releases = "" x[6]; b_kernel = "" x[7]; b_path = "" x[8]; b_sha256 = "" x[9]
	b_size = "" x[10]; b_published = "" x[11]
	return 1
}
function mine(d, f, p, os) {
	return b_os == os && (d == "" || b_driver == d) && (f == "" || b_flavour == f) &&
		(p == "" || b_profile == p) && b_driver ~ /^[0-9]+([.][0-9]+)*$/ &&
		b_flavour ~ /^(proprietary|open)$/ && b_profile ~ /^(compute|full)$/
}
'

# repo_check INDEX: "GENERATION KEY EXPIRES" of a well-formed index (KEY the fingerprint's
# hex, EXPIRES - where it has none), else the first thing wrong with it, and fails. Refused:
# a NUL byte (busybox awk cuts lines there), a first line other than "coreos-gpu-index 1", a
# known record (generation, created, expires, key, json, bundle: what comes before a line's
# first space or tab) not exactly as written or given twice, no generation, created, key or
# json record. Other records are skipped (a later format's). Lines end in LF, the last one's
# optional.
repo_check() {
	[ "$(tr -d '\000' <"$1" | wc -c | tr -d ' ')" = "$(wc -c <"$1" | tr -d ' ')" ] ||
		{ printf 'it holds a NUL byte\n'; return 1; }
	LC_ALL=C awk "$REPO_AWK"'
		function refuse(why) { print "line " NR ": " why; bad = 1; exit 1 }
		NR == 1 { if ($0 != "coreos-gpu-index 1") refuse("not \"coreos-gpu-index 1\""); next }
		{ r = $0; sub(/[ \t].*/, "", r) }
		r == "bundle" { if (!bundle()) refuse("a malformed bundle line"); next }
		r != "generation" && r != "created" && r != "expires" && r != "key" && r != "json" { next }
		(r in seen) { refuse("a second " r " record") }
		{ seen[r] = 1; v = substr($0, length(r) + 2) }
		r == "generation" && ($0 !~ "^generation " R_NUMBER "$" || length(v) > 15) ||
		r == "created" && $0 !~ "^created " R_TIME "$" ||
		r == "expires" && $0 !~ "^expires " R_TIME "$" ||
		r == "key" && ($0 !~ /^key sha256:[0-9a-f]+$/ || length(v) != 71) ||
		r == "json" && ($0 !~ /^json index\/[0-9a-f]+[.]json [0-9a-f]+$/ || length(v) != 140 ||
			substr(v, 7, 64) != substr(v, 77, 64)) { refuse("a malformed " r " record") }
		r == "generation" { g = v }
		r == "key" { k = substr(v, 8) }
		r == "expires" { e = v }
		END {
			if (bad) exit 1
			if (NR == 0) { print "it is empty"; exit 1 }
			split("generation created key json", need, " ")
			for (i = 1; i <= 4; i++) if (!(need[i] in seen)) { print "it has no " need[i] " record"; exit 1 }
			print g, k, (e == "" ? "-" : e)
		}' "$1"
}

# repo_pick INDEX kernel|release WANT DRIVER FLAVOUR PROFILE OS: the bundle for that kernel
# release (or OS release) as "PATH SHA256 SIZE KERNEL". An empty DRIVER, FLAVOUR or PROFILE
# matches any. The choice never depends on the order of the index's lines (the order bundles
# were published in, which a replayed or merged index changes): of the lines that match, the
# highest driver (compared field by field as numbers), then proprietary before open, then
# compute before full; among rebuilds of one driver, flavour and profile, the newest
# PUBLISHED, and of those the greatest SHA256 (both signed). A line this node could not
# install (an unknown flavour or profile, a driver version not all numbers; mine()) or not
# well-formed (bundle(); repo_check refuses the whole index for that) is never picked.
# ("" v) compares as text what awk would compare as numbers (580.82 = 580.820).
repo_pick() {
	LC_ALL=C awk -v by="$2" -v want="$3" -v d="$4" -v f="$5" -v p="$6" -v os="$7" "$REPO_AWK"'
		function vercmp(a, b, x, y, nx, ny, i) {
			nx = split(a, x, ".")
			ny = split(b, y, ".")
			for (i = 1; i <= nx || i <= ny; i++) {
				if (i > nx) return -1
				if (i > ny) return 1
				if (x[i] + 0 != y[i] + 0) return ((x[i] + 0 > y[i] + 0) ? 1 : -1)
			}
			if (("" a) == ("" b)) return 0
			return ((("" a) > ("" b)) ? 1 : -1)
		}
		function better(c) {
			c = vercmp(b_driver, bd)
			if (c != 0) return (c > 0)
			if (b_flavour != bf) return (b_flavour == "proprietary")
			if (b_profile != bp) return (b_profile == "compute")
			if (b_published != bt) return (b_published > bt)
			return (b_sha256 > bs)
		}
		!bundle() || !mine(d, f, p, os) { next }
		by == "kernel" && b_kernel != want { next }
		by == "release" && (b_releases == "-" || index("," b_releases ",", "," want ",") == 0) { next }
		line == "" || better() {
			bd = b_driver; bf = b_flavour; bp = b_profile; bt = b_published; bs = b_sha256
			line = b_path " " b_sha256 " " b_size " " b_kernel
		}
		END { if (line != "") print line }' "$1"
}

# repo_kernels INDEX DRIVER FLAVOUR PROFILE OS: each kernel release repo_pick finds a bundle
# for, one a line, in the order of the index (fetch.sh --index).
# shellcheck disable=SC2317 # unused where render inlines this file into provision.sh
repo_kernels() {
	LC_ALL=C awk -v d="$2" -v f="$3" -v p="$4" -v os="$5" "$REPO_AWK"'
		bundle() && mine(d, f, p, os) && !(b_kernel in seen) { seen[b_kernel] = 1; print b_kernel }' "$1"
}

# repo_bundle URL PATH SHA256 SIZE FILE SECONDS: the bundle, checked against the index.
repo_bundle() {
	if ! rb_err=$(repo_download "$1/$2" "$5" "$6" "$4"); then
		case $rb_err in
		*"larger than $4 bytes"*)
			die "$REPO_BUNDLE_MISMATCH" "$1/$2 is larger than the $4 bytes the signed index gives: it was tampered with or damaged; the download was cut off there, and nothing was installed" ;;
		esac
		die "$REPO_UNREACHABLE" "cannot download $1/$2: $(printf '%s' "$rb_err" | tail -n 1); nothing was installed"
	fi
	rb_got=$(wc -c <"$5" | tr -d ' ')
	# Short: the transfer stopped (a cut connection, a lying Content-Length, wget taking the
	# 416 to its resume as the end; curl says so itself), or the bytes were changed on the
	# way (gzip uninvited): a failed download either way.
	[ "${rb_got:-0}" -ge "$4" ] ||
		die "$REPO_UNREACHABLE" "cannot download $1/$2: $rb_got of the $4 bytes the signed index gives arrived (the transfer stopped, or the server changed them: compressed them uninvited?); nothing was installed"
	[ "$rb_got" = "$4" ] && [ "$(sha256_of "$5")" = "$3" ] ||
		die "$REPO_BUNDLE_MISMATCH" "$1/$2 does not match the sha256 and size the signed index gives ($3, $4 bytes): it was tampered with or damaged; nothing was installed"
}
