#!/bin/sh
# Written by coreos-gpu @TOOL_VERSION@ (coreos-gpu render): installs the NVIDIA driver
# bundle on this node once, before the DC/OS agent starts. coreos-gpu-provision.service
# runs it at the first boot (Ignition wrote both), or Terraform runs it over SSH. Its
# files are in DIR (below), root's alone; DIR/provisioned says it is done.
#
#   provision.sh [--root DIR]     --root: act on the tree under DIR (an image, a test tree)
#
# With a bundle: Ignition downloaded it to DIR/nvidia.tar.gz and checked its hash; its
# sha256 is checked again here, before anything reads it. With a repository: the signed
# index is checked with DIR/repository.pub (openssl dgst -sha256 -verify), and the bundle
# for this node's kernel (uname -r) is downloaded and checked against the sha256 and size
# the index lists. Either way the bundle is extracted into a new, empty, root-owned folder
# and its install_nvidia.sh runs from there.
#
# Exit codes: 0 installed (or installed before); 2 bad command line; 21 the bundle does
# not match its sha256 (or size); 22 the repository cannot be read, or holds no coreos-gpu
# repository; 23 the index does not match its signature; 24 the index lists no bundle for
# this kernel; 25 the bundle cannot be extracted; any other: install_nvidia.sh's exit code.
# "A && B || die …" means: die when either fails.
# shellcheck disable=SC2015
set -u
PROG=coreos-gpu-provision

# --- settings, rendered by coreos-gpu -----------------------------------------------------
DIR=@DIR@
BUNDLE_SHA256=@BUNDLE_SHA256@
REPOSITORY_URL=@REPOSITORY_URL@
OS=@OS@
DRIVER_VERSION=@DRIVER_VERSION@
# ------------------------------------------------------------------------------------------

say() {
	printf '%s: %s\n' "$PROG" "$*" >&2
}

die() {
	die_code=$1
	shift
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit "$die_code"
}

ROOT=
while [ $# -gt 0 ]; do
	case $1 in
	--root)
		[ $# -ge 2 ] || die 2 "--root needs a folder"
		ROOT=${2%/}
		shift ;;
	*) die 2 "unknown argument $1 (usage: provision.sh [--root DIR])" ;;
	esac
	shift
done

HERE=$ROOT$DIR
BUNDLE=$HERE/nvidia.tar.gz
STAMP=$HERE/provisioned
if [ -e "$STAMP" ]; then
	say "installed before ($STAMP); nothing to do"
	exit 0
fi
# Our own files are root's alone; install_nvidia.sh runs with the usual umask (below).
umask 077
[ -d "$HERE" ] || mkdir -p "$HERE" || die 1 "cannot make $HERE"

sha256_of() {
	sum=$(sha256sum <"$1") || return 1
	printf '%s\n' "${sum%% *}"
}

# fetch URL FILE: bounded retries, so a node without network fails and tries at the next boot.
fetch() {
	curl -fsSL --retry 5 --retry-delay 5 --connect-timeout 30 -o "$2" "$1"
}

is_sha256() {
	case $1 in *[!0-9a-f]* | "") return 1 ;; esac
	[ "${#1}" -eq 64 ]
}

# fetch_from_repository: the bundle for this kernel, from the repository's signed index.
fetch_from_repository() {
	base=${REPOSITORY_URL%/}
	kernel=$(uname -r)
	tmp=$(mktemp -d "$HERE/fetch.XXXXXX") || die 1 "cannot make a folder in $HERE"
	fetch "$base/index.current" "$tmp/current" ||
		die 22 "cannot read $base/index.current"
	read -r magic format index <"$tmp/current" || magic=
	[ "$magic" = coreos-gpu-repository ] && [ "$format" = 1 ] && is_sha256 "$index" ||
		die 22 "$base/index.current is not a coreos-gpu repository's (format 1)"
	fetch "$base/index/$index.txt" "$tmp/index.txt" && fetch "$base/index/$index.txt.sig" "$tmp/index.sig" ||
		die 22 "cannot read $base/index/$index.txt and its signature"
	openssl dgst -sha256 -verify "$HERE/repository.pub" -signature "$tmp/index.sig" "$tmp/index.txt" >/dev/null ||
		die 23 "$base/index/$index.txt does not match its signature by the key in $HERE/repository.pub"
	[ "$(sha256_of "$tmp/index.txt")" = "$index" ] ||
		die 23 "$base/index/$index.txt is not the index index.current names"
	# bundle lines: 2 driver, 5 OS, 7 kernel release, 8 path, 9 sha256, 10 size, 11 published.
	awk -v k="$kernel" -v os="$OS" -v d="$DRIVER_VERSION" '
		NR == 1 && $0 != "coreos-gpu-index 1" { exit 3 }
		$1 == "bundle" && $5 == os && $7 == k && (d == "" || $2 == d) { print $11, $8, $9, $10 }
	' "$tmp/index.txt" >"$tmp/found" || die 22 "$base/index/$index.txt is not a format 1 index"
	# The most recently published one, when several match.
	line=$(sort "$tmp/found" | tail -n 1)
	[ -n "$line" ] || die 24 "$base lists no $OS bundle for kernel $kernel${DRIVER_VERSION:+ and driver $DRIVER_VERSION}: build and publish one (coreos-gpu build --release …; coreos-gpu publish)"
	read -r _ path sum size <<-END
	$line
	END
	case $path in bundles/*) ;; *) die 22 "the index names an odd path: $path" ;; esac
	case $path in *..* | *//*) die 22 "the index names an odd path: $path" ;; esac
	is_sha256 "$sum" || die 22 "the index gives an odd sha256 for $path"
	say "downloading $base/$path (kernel $kernel)"
	fetch "$base/$path" "$tmp/bundle" || die 22 "cannot download $base/$path"
	[ "$(wc -c <"$tmp/bundle" | tr -d ' ')" = "$size" ] ||
		die 21 "$base/$path is not the $size bytes the signed index lists"
	[ "$(sha256_of "$tmp/bundle")" = "$sum" ] ||
		die 21 "$base/$path does not match the sha256 the signed index lists"
	mv -f "$tmp/bundle" "$BUNDLE" || die 1 "cannot move the bundle to $BUNDLE"
	rm -rf "$tmp"
	BUNDLE_SHA256=$sum
}

if [ -n "$REPOSITORY_URL" ]; then
	fetch_from_repository
fi
[ -f "$BUNDLE" ] || die 21 "$BUNDLE is missing"
[ "$(sha256_of "$BUNDLE")" = "$BUNDLE_SHA256" ] ||
	die 21 "$BUNDLE does not match sha256 $BUNDLE_SHA256; nothing was installed"

WORK=$(mktemp -d "$HERE/bundle.XXXXXX") || die 1 "cannot make a folder in $HERE"
tar -xf "$BUNDLE" -C "$WORK" || { rm -rf "$WORK"; die 25 "cannot extract $BUNDLE"; }
if [ -n "$ROOT" ]; then set -- --root "$ROOT"; else set --; fi
umask 022
code=0
"$WORK/install_nvidia.sh" "$@" || code=$?
rm -rf "$WORK"
case $code in
0 | 1[1-9] | 20)
	# Installed (11-20: the driver did not start now; nvidia.service tries at every boot).
	printf '%s\n' "$BUNDLE_SHA256" >"$STAMP"
	rm -f "$BUNDLE"
	;;
esac
exit "$code"
