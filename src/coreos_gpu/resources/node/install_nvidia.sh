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
# Exit codes: node/exit-codes.sh's INSTALL_* and the shared ones (SUCCESS, STEP_FAILED,
# USAGE, LOCKED, MISSING_COMMAND), copied in with the options; made, as is
# docs/reference/exit-codes.md, from coreos-gpu's one table of them.
# "A && B || die …" means: die when either fails. Its variables (FORCE, PAYLOAD, DEST, …) are
# for the parts copied in below (install-*.sh), which a shellcheck without -x cannot see.
# shellcheck disable=SC2015,SC2034
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

# shellcheck source=options.sh
. "${0%/*}/node/options.sh" # coreos-gpu: inline
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
	--root | --root=*) option_value "$@"; ROOT=$VALUE; shift "$SHIFT" ;;
	--no-start) START=0 ;;
	--no-enable) ENABLE=0 ;;
	--uninstall) UNINSTALL=1 ;;
	--dry-run) DRY=1 ;;
	--stage) STAGE_ONLY=1 ;;
	--force) FORCE=1 ;;
	--release | --release=*) option_value "$@"; STAGE_RELEASE=$VALUE; shift "$SHIFT" ;;
	--expect-sha256 | --expect-sha256=*)
		option_value "$@"
		EXPECT=1
		EXPECT_SHA256=$VALUE
		shift "$SHIFT" ;;
	-h | --help) usage; exit 0 ;;
	*) printf '%s: error: unknown argument %s\n' "$PROG" "$1" >&2; usage >&2; exit "$USAGE" ;;
	esac
	shift
done

# The shared helpers (say, die, act, parse_root, …) are copied in here when the bundle is
# built (node.py), so that nothing is sourced from the extracted folder; the line below is
# what a build replaces, and what shellcheck follows.
# shellcheck source=lib.sh
. "${0%/*}/node/lib.sh" # coreos-gpu: inline

SELF=$(readlink -f "$0") || die "$STEP_FAILED" "cannot resolve $0"
BUNDLE=${SELF%/*}
ROOT=$(parse_root "$ROOT")
[ -z "$ROOT" ] || [ -d "$ROOT" ] || die "$USAGE" "--root $ROOT is not a folder"
case $STAGE_ONLY:$UNINSTALL:$STAGE_RELEASE in
1:1:*) die "$USAGE" "--stage and --uninstall do not go together" ;;
0:*:[!-]*) die "$USAGE" "--release names the OS release a --stage is for: give --stage too" ;;
*:*:*[!A-Za-z0-9._+~-]* | *:*:) die "$USAGE" "--release $STAGE_RELEASE is not an OS release (e.g. 4081.2.0)" ;;
esac
# As sha256sum prints it: 64 digits, lower case.
[ "$EXPECT" = 0 ] || { [ "${#EXPECT_SHA256}" -eq 64 ] && case $EXPECT_SHA256 in *[!0-9a-f]*) false ;; esac; } ||
	die "$USAGE" "--expect-sha256 $EXPECT_SHA256 is not a sha256: give the 64 lower-case hex digits coreos-gpu inspect shows as contents sha256"
[ "$EXPECT$UNINSTALL" != 11 ] || die "$USAGE" "--expect-sha256 names a bundle to install; --uninstall installs none"
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
	die "$USAGE" "$BUNDLE is an installed driver, not an extracted bundle: run $SELF --uninstall, or install_nvidia.sh from an extracted archive"
fi

# The install's parts, copied in by the build like lib.sh, each before the code that calls it.
# shellcheck source=install-files.sh
. "${0%/*}/node/install-files.sh" # coreos-gpu: inline
# shellcheck source=install-land.sh
. "${0%/*}/node/install-land.sh" # coreos-gpu: inline
# shellcheck source=install-uninstall.sh
. "${0%/*}/node/install-uninstall.sh" # coreos-gpu: inline

# --- checks: nothing on the node changes before they pass ---------------------------------
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
	die "$INSTALL_NOT_ROOT" "run me as root (sudo $0)"
fi
need_tools "$MISSING_COMMAND" sha256sum flock mktemp readlink stat df du cp mv ln rm awk sed sort find xargs chmod \
	chown ldconfig cmp head
[ "$ENABLE" = 0 ] && [ "$START" = 0 ] && [ "$UNINSTALL" = 0 ] || need_tools "$MISSING_COMMAND" systemctl
[ "$UNINSTALL" = 0 ] || uninstall
# The bundle's checks, and whether it fits this node.
# shellcheck source=install-verify.sh
. "${0%/*}/node/install-verify.sh" # coreos-gpu: inline
# shellcheck source=install-fits.sh
. "${0%/*}/node/install-fits.sh" # coreos-gpu: inline

# The driver version is the one folder in payload/ (bundle.env is read only once verified).
for version in "$BUNDLE"/payload/*/; do
	[ -n "${DRIVER_VERSION:-}" ] &&
		die "$INSTALL_CORRUPT" "$BUNDLE/payload holds more than one driver; extract the archive into an empty folder"
	DRIVER_VERSION=${version%/}
	DRIVER_VERSION=${DRIVER_VERSION##*/}
done
case ${DRIVER_VERSION:-*} in
"*" | *[!0-9.]*) die "$INSTALL_CORRUPT" "$BUNDLE is not a whole coreos-gpu bundle (no payload/<driver version>/); extract the whole archive" ;;
esac
[ -f "$BUNDLE/node/contents" ] && [ -f "$BUNDLE/SHA256SUMS" ] ||
	die "$INSTALL_CORRUPT" "$BUNDLE is not a whole coreos-gpu bundle (node/contents or SHA256SUMS is missing); extract the whole archive"
PAYLOAD=$BUNDLE/payload/$DRIVER_VERSION
# startup.sh switches only among folders of current's driver and flavour.
[ "$STAGE_ONLY" = 0 ] || [ -f "$ROOT$OPT/current/node/bundle.env" ] ||
	die "$USAGE" "--stage installs beside an installed driver, and none is installed under ${ROOT:-/}; run me without --stage"
# The bundle id: the first 12 hex digits of SHA256SUMS's sum (as the build names it).
SUM=$(sha256_of "$BUNDLE/SHA256SUMS") || die "$STEP_FAILED" "cannot read $BUNDLE/SHA256SUMS"
ID=${SUM%"${SUM#????????????}"}
case $ID in *[!0-9a-f]* | "") die "$STEP_FAILED" "sha256sum gave no sum for $BUNDLE/SHA256SUMS" ;; esac
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
	die "$INSTALL_CORRUPT" "the bundle in $BUNDLE is corrupt: $BAD; download and extract it again"
# Only now is anything read from the extracted folder: node/bundle.env is a regular file
# that node/contents lists (a FIFO there would have hung a read). What it says is checked
# again on the root-owned copy, with the sums, before anything lands.
check_fits_node
[ "$STAGE_ONLY" = 0 ] || check_stage_fits

check_space

# --- one transaction: any failure from here on leaves the node as it was (install-txn.sh) ----
# shellcheck source=install-txn.sh
. "${0%/*}/node/install-txn.sh" # coreos-gpu: inline

# Taking over from Flatcar's setup-nvidia, and starting the driver once installed.
# shellcheck source=install-recipe.sh
. "${0%/*}/node/install-recipe.sh" # coreos-gpu: inline
# shellcheck source=install-start.sh
. "${0%/*}/node/install-start.sh" # coreos-gpu: inline

LOCKING=1
lock
clean_leftovers
txn_begin

# --- the driver folder ----------------------------------------------------------------------
land_driver
SETTINGS=$FROM/node/bundle.env
# Both are never empty in a bundle (check_settings): empty here means the read failed.
AGENT_UNITS=$(bundle_value AGENT_UNITS "$SETTINGS") && [ -n "$AGENT_UNITS" ] &&
	KERNEL_RELEASES=$(bundle_value KERNEL_RELEASES "$SETTINGS") && [ -n "$KERNEL_RELEASES" ] ||
	die "$STEP_FAILED" "cannot read $SETTINGS"
[ "$STAGE_ONLY" = 0 ] || stage_driver
RUNNING=$(uname -r)
case " $KERNEL_RELEASES " in
*" $RUNNING "*) ;;
*) warn "this node runs kernel $RUNNING, but the bundle has modules only for $KERNEL_RELEASES: the driver will not load until the node boots one of those" ;;
esac
stop_recipe
find_flatcar_recipe
take_over_recipe

put_boot_files

# --- the switch: one rename -------------------------------------------------------------------
txn_save "$ROOT$OPT/current" "$ROOT$OPT/previous"
SWITCHED=1
switch_current "$NAME" || die "$STEP_FAILED" "cannot point $OPT/current at $NAME"

# --- after the switch: caches, units -----------------------------------------------------------
run_ldconfig || die "$STEP_FAILED" "ldconfig failed"
for dropin in "$UNITS"/*.d/"$DROPIN_NAME"; do
	ours "$dropin" || ours_file "$dropin" || continue
	unit=${dropin%/*}
	unit=${unit##*/}
	case " $AGENT_UNITS " in *" ${unit%.d} "*) continue ;; esac
	put_away "$dropin" || die "$STEP_FAILED" "cannot remove $dropin"
done
SYSTEMD_TOUCHED=1
[ -n "$ROOT" ] || systemctl_root daemon-reload || die "$STEP_FAILED" "systemctl daemon-reload failed"
if [ "$ENABLE" = 1 ]; then
	txn_units
	systemctl_root enable nvidia.service || die "$STEP_FAILED" "systemctl enable nvidia.service failed"
	for unit in $ENABLED_BUNDLE_UNITS; do
		[ ! -L "$UNITS/$unit" ] || systemctl_root enable "$unit" || die "$STEP_FAILED" "systemctl enable $unit failed"
	done
fi
txn_commit

# Keep the previous driver (a rollback is one install_nvidia.sh of its bundle away, and
# Flatcar may boot the previous release again) and the staged ones. The install is whole
# already: a folder that cannot go now goes at the next run.
drop_unbootable || warn "cannot remove the drivers no boot wants any more from $OPT; the next install tries again"
drop_recipe || warn "cannot remove Flatcar's setup-nvidia build from $OPT; the next install tries again"

[ "$START" = 0 ] || start_driver
if [ "$DRY" = 1 ]; then
	say "dry run: nothing was changed"
else
	say "done: driver $DRIVER_VERSION in $OPT/current"
fi
