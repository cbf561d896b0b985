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
# for this node's kernel (uname -r), of the driver, flavour and profile rendered in below,
# is downloaded and checked against the sha256 and size the index lists. Either way the
# bundle is extracted into a new, empty, root-owned folder and its install_nvidia.sh runs
# from there (with --expect-sha256 when render had the bundle file: see below). Without
# --root it starts what it installs, as on any node: the driver, and a repository's stage
# watcher and retry timer, so that an OS update downloaded in this first boot is staged.
#
# Exit codes: node/exit-codes.sh's REPO_* and the shared ones, else install_nvidia.sh's
# own; made, as is docs/reference/exit-codes.md, from coreos-gpu's one table of them.
# "A && B || die …" means: die when either fails.
# shellcheck disable=SC2015
set -u
PROG=coreos-gpu-provision
# shellcheck source=../node/exit-codes.sh
. "${0%/*}/../node/exit-codes.sh" # coreos-gpu: inline

# --- settings, rendered by coreos-gpu -----------------------------------------------------
DIR=@DIR@
BUNDLE_SHA256=@BUNDLE_SHA256@
CONTENTS_SHA256=@CONTENTS_SHA256@
REPOSITORY_URL=@REPOSITORY_URL@
OS=@OS@
DRIVER_VERSION=@DRIVER_VERSION@
FLAVOUR=@FLAVOUR@
PROFILE=@PROFILE@
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
		[ $# -ge 2 ] || die "$USAGE" "--root needs a folder"
		ROOT=${2%/}
		shift ;;
	*) die "$USAGE" "unknown argument $1 (usage: provision.sh [--root DIR])" ;;
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
[ -d "$HERE" ] || mkdir -p "$HERE" || die "$STEP_FAILED" "cannot make $HERE"

# Reading the repository: node/repository.sh, copied in here by `coreos-gpu render` (the
# lines below are what it replaces), the same code a node's fetch.sh runs after an OS update,
# with the node's one sha256 helper.
# shellcheck source=../node/sha256.sh
. "${0%/*}/../node/sha256.sh" # coreos-gpu: inline
# shellcheck source=../node/repository.sh
. "${0%/*}/../node/repository.sh" # coreos-gpu: inline

# fetch_from_repository: the bundle for this kernel, of DRIVER_VERSION, FLAVOUR and PROFILE,
# from the repository's signed index (repo_pick says which of several rebuilds).
fetch_from_repository() {
	base=${REPOSITORY_URL%/}
	kernel=$(uname -r)
	tmp=$(mktemp -d "$HERE/fetch.XXXXXX") || die "$STEP_FAILED" "cannot make a folder in $HERE"
	# Bounded: a node without network fails, and tries again at the next boot.
	repo_index "$base" "$HERE/repository.pub" "$tmp" 60
	line=$(repo_pick "$tmp/index.txt" kernel "$kernel" "$DRIVER_VERSION" "$FLAVOUR" "$PROFILE" "$OS")
	[ -n "$line" ] || die "$REPO_NO_BUNDLE" "$base lists no $OS bundle for kernel $kernel of driver $DRIVER_VERSION, $FLAVOUR modules, $PROFILE profile: build and publish one (coreos-gpu build --release … --driver-version $DRIVER_VERSION --kernel-module-type $FLAVOUR --profile $PROFILE; coreos-gpu publish)"
	read -r path sum size _ <<-END
	$line
	END
	say "downloading $base/$path (kernel $kernel)"
	repo_bundle "$base" "$path" "$sum" "$size" "$tmp/bundle" 1200
	mv -f "$tmp/bundle" "$BUNDLE" || die "$STEP_FAILED" "cannot move the bundle to $BUNDLE"
	rm -rf "$tmp"
	BUNDLE_SHA256=$sum
}

if [ -n "$REPOSITORY_URL" ]; then
	fetch_from_repository
fi
[ -f "$BUNDLE" ] || die "$REPO_BUNDLE_MISMATCH" "$BUNDLE is missing"
[ "$(sha256_of "$BUNDLE")" = "$BUNDLE_SHA256" ] ||
	die "$REPO_BUNDLE_MISMATCH" "$BUNDLE does not match sha256 $BUNDLE_SHA256; nothing was installed"

WORK=$(mktemp -d "$HERE/bundle.XXXXXX") || die "$STEP_FAILED" "cannot make a folder in $HERE"
tar -xf "$BUNDLE" -C "$WORK" || { rm -rf "$WORK"; die "$REPO_BAD_BUNDLE" "cannot extract $BUNDLE"; }
if [ -n "$ROOT" ]; then set -- --root "$ROOT"; else set --; fi
# A second lock on the same door, known when render read the bundle file (not from a URL and
# sha256 alone, nor a repository): the archive's sha256 proves the download, this one (of the
# bundle's SHA256SUMS, which covers every file) proves what install_nvidia.sh copies and
# installs, whatever tar made of the archive.
[ -z "$CONTENTS_SHA256" ] || set -- "$@" --expect-sha256 "$CONTENTS_SHA256"
umask 022
code=0
"$WORK/install_nvidia.sh" "$@" || code=$?
rm -rf "$WORK"
case $code in
# 1[1-9]: INSTALL_NOT_STARTED_FIRST..LAST, which a case pattern cannot name.
"$SUCCESS" | 1[1-9] | "$INSTALL_SERVICE_FAILED")
	# Installed (INSTALL_NOT_STARTED_*, INSTALL_SERVICE_FAILED: the driver did not start now;
	# nvidia.service tries at every boot).
	printf '%s\n' "$BUNDLE_SHA256" >"$STAMP"
	rm -f "$BUNDLE"
	;;
esac
exit "$code"
