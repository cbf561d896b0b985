#!/bin/sh
# Loads the NVIDIA driver for the running kernel and makes its device nodes: what
# nvidia.service runs at every boot, before the Mesos agent starts (/opt/nvidia/startup.sh).
#
# Exit codes (nvidia.service fails on any but 0): node/exit-codes.sh's STARTUP_* and
# USAGE, and fetch.sh's REPO_* passed on; made, as is docs/reference/exit-codes.md, from
# coreos-gpu's one table of them.
#
# Persistence (node/bundle.env's PERSISTENCE, the build's persistence setting): with legacy
# it turns the kernel's persistence mode on (nvidia-smi -pm 1); daemon leaves it to
# nvidia-persistenced.service, which starts after nvidia.service; off (and a bundle from
# before the setting) does neither.
#
# Settings from the environment (nvidia.service reads /etc/default/nvidia):
#   NVIDIA_PERSISTENCE_MODE=1  nvidia-smi -pm 1 whatever the bundle's setting: kept for the
#                              nodes that set it before the setting existed
#   NVIDIA_LOAD_DRM=1          also load nvidia-drm (needs drm_kms_helper); off for compute
#   NVIDIA_FORCE_LOAD=1        as --force-load (for tests on machines without a GPU)
#   NVIDIA_REPOSITORY_URL=URL  fetch from this repository instead of the bundle's (none: off)
#   NVIDIA_FETCH_TIMEOUT=S     bound a bundle's download to S seconds (default 180)
# "A && B || die …" means: die when either fails.
# shellcheck disable=SC2015
set -u
PROG=startup.sh

usage() {
	cat <<'EOF'
usage: startup.sh [--root DIR] [--check] [--force-load]
  --root DIR    act on the tree under DIR (/sys, /proc, /dev, /opt/nvidia) instead of /
  --check       change nothing: report what is there and what would be done
  --force-load  load the modules even when no NVIDIA GPU is on PCI (for testing)
EOF
}

# shellcheck source=options.sh
. "${0%/*}/options.sh" # coreos-gpu: inline
ROOT=
DRY=0  # --check: lib.sh's act only says what it would run
FORCE=${NVIDIA_FORCE_LOAD:-0}
while [ $# -gt 0 ]; do
	case $1 in
	--root | --root=*) option_value "$@"; ROOT=$VALUE; shift "$SHIFT" ;;
	--check) DRY=1 ;;
	--force-load) FORCE=1 ;;
	-h | --help) usage; exit 0 ;;
	*) printf '%s: error: unknown argument %s\n' "$PROG" "$1" >&2; usage >&2; exit "$USAGE" ;;
	esac
	shift
done

HERE=$(dirname "$(readlink -f "$0")")
# Only an installed driver folder, /opt/nvidia/<name>, is loaded from (or has anything of
# it sourced): not a copy elsewhere that a link or a hand-typed path leads to.
case ${ROOT:-/} in
/*) OPT_HERE=$(readlink -f "${ROOT%/}/opt/nvidia") ;;
*) OPT_HERE=$(readlink -f "$(pwd)/${ROOT%/}/opt/nvidia") ;;
esac
[ -n "$OPT_HERE" ] && [ "${HERE%/*}" = "$OPT_HERE" ] || {
	printf '%s: error: %s is not a driver folder of /opt/nvidia: startup.sh loads only an installed driver (install_nvidia.sh installs one; nvidia.service runs /opt/nvidia/startup.sh)\n' "$PROG" "$HERE" >&2
	exit "$STARTUP_INCOMPLETE"
}
[ -r "$HERE/node/lib.sh" ] || {
	printf '%s: error: %s/node/lib.sh is missing: the installation is incomplete; run install_nvidia.sh again\n' "$PROG" "$HERE" >&2
	exit "$STARTUP_INCOMPLETE"
}
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/node/lib.sh"
ROOT=$(parse_root "$ROOT")
[ -r "$HERE/node/bundle.env" ] ||
	die "$STARTUP_INCOMPLETE" "$HERE/node/bundle.env is missing: the installation is incomplete; run install_nvidia.sh again"
DRIVER_VERSION=$(bundle_value DRIVER_VERSION "$HERE/node/bundle.env")
FLAVOUR=$(bundle_value FLAVOUR "$HERE/node/bundle.env")
KERNEL_RELEASES=$(bundle_value KERNEL_RELEASES "$HERE/node/bundle.env")
PATH=$PATH:$HERE/bin
export PATH

# --- the folder for this kernel ----------------------------------------------------------
KERNEL=$(uname -r)
MODULES=$HERE/modules/$KERNEL
# Flatcar's own NVIDIA driver, as a sysext: two drivers never load on one node. Before
# anything changes (a switch of `current`, a fetch).
find_nvidia_sysext "$KERNEL"
[ -z "$SYSEXT" ] ||
	die "$STARTUP_OTHER_DRIVER" "$SYSEXT: its driver and coreos-gpu's must not both load, so nothing was loaded; to use coreos-gpu's, $SYSEXT_FIX; or keep the sysext and remove coreos-gpu's driver (nvidia-uninstall)"
# After an OS update, or a rollback to the previous release, another installed folder of
# this driver and flavour may have the modules for the running kernel: point `current` at
# it (one rename, under the install lock, as install_nvidia.sh does) and carry on with that
# folder's own startup.sh. No network needed.
# It is tried again after a fetch from the repository, below.
switch_to_installed() {
	OTHER=$(installed_for "$KERNEL")
	[ -n "$OTHER" ] && [ -x "$ROOT$OPT/$OTHER/startup.sh" ] || return 0
	OTHER=$ROOT$OPT/$OTHER
	if [ "$DRY" = 1 ]; then
		say "would point $OPT/current at ${OTHER##*/}, which has modules for kernel $KERNEL"
	else
		lock_install "$STARTUP_INCOMPLETE"
		clear_leftovers_in_opt
		switch_current "${OTHER##*/}" ||
			die "$STARTUP_INCOMPLETE" "cannot point $OPT/current at ${OTHER##*/}, which has modules for kernel $KERNEL"
		# What no boot can want any more goes (never the new current, the previous or a
		# staged one).
		drop_unbootable || warn "cannot tidy $OPT (drop_unbootable failed)"
		exec 9<&-
	fi
	set --
	[ -z "$ROOT" ] || set -- "$@" --root "$ROOT"
	[ "$DRY" = 0 ] || set -- "$@" --check
	[ "$FORCE" != 1 ] || set -- "$@" --force-load
	# shellcheck disable=SC2093 # on purpose: that folder's startup.sh takes over
	exec "$OTHER/startup.sh" "$@"
}
[ -d "$MODULES" ] || switch_to_installed
# A boot stopped between the switch to a staged folder and the tidying after it: tidy now.
if [ "$DRY" = 0 ] && [ -d "$MODULES" ] && [ -f "$ROOT$STAGED" ] &&
	grep -q "^$(readlink "$ROOT$OPT/current") " "$ROOT$STAGED" 2>/dev/null; then
	lock_install "$STARTUP_INCOMPLETE"
	clear_leftovers_in_opt
	drop_unbootable || warn "cannot tidy $OPT (drop_unbootable failed)"
	exec 9<&-
fi

# --- GPUs -------------------------------------------------------------------------------
GPUS=$(list_gpus)
if [ -z "$GPUS" ]; then
	if [ "$FORCE" != 1 ]; then
		say "no NVIDIA GPU on PCI (vendor $NVIDIA_VENDOR, class 0x0300 or 0x0302): nothing to load"
		# A spec left from a GPU that is gone would offer containers devices that are not there.
		write_cdi_spec "$HERE" || warn "cannot remove the CDI spec $CDI_SPEC"
		exit 0
	fi
	say "no NVIDIA GPU on PCI; loading anyway (--force-load)"
else
	say "$(describe_gpus "$GPUS")"
fi

# --- kernel -----------------------------------------------------------------------------
# Never insmod a module built for another kernel: after an OS update the node boots a
# kernel the bundle may not have been built for. With a bundle repository, fetch the
# bundle for this kernel, stage it as install_nvidia.sh --stage does, and switch to it.
REPOSITORY=$(repository_url "$HERE")
if [ ! -d "$MODULES" ] && [ -n "$REPOSITORY" ]; then
	if [ "$DRY" = 1 ]; then
		say "would fetch the driver for kernel $KERNEL from $REPOSITORY"
		exit 0
	fi
	say "no installed driver has modules for kernel $KERNEL: fetching them from $REPOSITORY"
	set --
	[ -z "$ROOT" ] || set -- --root "$ROOT"
	"$HERE/node/fetch.sh" "$@" --kernel "$KERNEL"
	FETCHED=$?
	case $FETCHED in
	0) switch_to_installed ;;
	2[1-689]) exit "$FETCHED" ;;
	*) die "$STARTUP_FETCH_OTHER" "fetching the driver for kernel $KERNEL failed (node/fetch.sh exit $FETCHED, see above)" ;;
	esac
	die "$STARTUP_FETCH_OTHER" "node/fetch.sh staged no folder with modules for kernel $KERNEL"
fi
[ -d "$MODULES" ] ||
	die "$STARTUP_KERNEL_REFUSED" "kernel mismatch: the running kernel is $KERNEL, but this bundle has modules only for $KERNEL_RELEASES, and no other installed folder of driver $DRIVER_VERSION has any for it; build a bundle for this OS release (coreos-gpu build --release <the OS version>) and install it"

if [ -r "$ROOT/sys/module/nvidia/version" ]; then
	read -r LOADED <"$ROOT/sys/module/nvidia/version"
	[ "$LOADED" = "$DRIVER_VERSION" ] ||
		die "$STARTUP_OTHER_DRIVER" "NVIDIA driver $LOADED is loaded, but $DRIVER_VERSION is installed: reboot to switch to $DRIVER_VERSION"
fi

WANTED=$LOAD_ORDER
[ "${NVIDIA_LOAD_DRM:-0}" != 1 ] || WANTED="$WANTED nvidia-drm"
# --- what the kernel takes --------------------------------------------------------------
# A locked-down kernel (Secure Boot on Flatcar) loads only modules signed with a key it
# trusts: said in one line before any insmod, unless the modules still to load are signed.
read_lockdown
if [ -n "$LOCKDOWN" ]; then
	set --
	for name in $WANTED; do
		[ ! -r "$MODULES/$name.ko" ] || module_loaded "$name" || set -- "$@" "$MODULES/$name.ko"
	done
	UNSIGNED=$(first_unsigned "$@")
	[ -z "$UNSIGNED" ] ||
		die "$STARTUP_KERNEL_REFUSED" "this kernel loads only signed modules ($LOCKDOWN), and ${UNSIGNED#"$ROOT"} is unsigned: driver $DRIVER_VERSION cannot load here, and nothing was loaded; $LOCKDOWN_CHOICES"
fi

# --- firmware ---------------------------------------------------------------------------
# The GSP firmware is requested from <path>/nvidia/<version>/; /lib/firmware is read-only
# here, so point the kernel's one extra search path at this version's copy (the resolved
# folder: a later install flipping `current` must not change a loaded driver's firmware).
if [ -d "$HERE/firmware" ]; then
	FIRMWARE=${HERE#"$ROOT"}/firmware
	PARAM=$ROOT/sys/module/firmware_class/parameters/path
	OLD=$(cat "$PARAM" 2>/dev/null || true)
	if [ "$OLD" != "$FIRMWARE" ]; then
		[ -z "$OLD" ] || warn "the firmware search path was $OLD; it is now $FIRMWARE"
		if [ "$DRY" = 1 ]; then
			say "would set the firmware search path to $FIRMWARE"
		else
			printf '%s' "$FIRMWARE" >"$PARAM" ||
				die "$STARTUP_LOAD_FAILED" "cannot set the firmware search path ($PARAM): the GPU's GSP firmware could not load"
		fi
	fi
fi

# --- modules (startup-modules.sh) ------------------------------------------------------
# shellcheck source=startup-modules.sh
. "${0%/*}/startup-modules.sh" # coreos-gpu: inline

# --- device nodes -----------------------------------------------------------------------
MINORS=$(gpu_minors)
[ "$DRY" = 1 ] || [ -n "$MINORS" ] ||
	die "$STARTUP_NO_GPU" "the driver is loaded but lists no GPU in /proc/driver/nvidia/gpus; see dmesg for NVRM messages"
ON_PCI=$(printf '%s\n' "$GPUS" | grep -c .)
SEEN=$(printf '%s\n' "$MINORS" | grep -c .)
[ -z "$GPUS" ] || [ "$SEEN" = "$ON_PCI" ] ||
	warn "$ON_PCI NVIDIA GPU(s) on PCI, but the driver sees $SEEN; see dmesg for NVRM messages"
expected_nodes | while read -r path major minor; do
	if [ "$major" = "?" ]; then
		[ "$DRY" = 1 ] && { say "would make $path once nvidia-uvm is loaded"; continue; }
		die "$STARTUP_NO_DEVICE_NODES" "nvidia-uvm is loaded but not in $ROOT/proc/devices: cannot make $path"
	fi
	if node_is "$path" "$major" "$minor"; then
		# The contract's mode: containers open these as any user.
		[ "$(stat -c %a "$ROOT$path")" = 666 ] || act chmod 0666 "$ROOT$path" ||
			die "$STARTUP_NO_DEVICE_NODES" "cannot make $path readable and writable by all (chmod 0666)"
		continue
	fi
	if [ -e "$ROOT$path" ] || [ -L "$ROOT$path" ]; then
		warn "$path is not the character device $major:$minor; replacing it"
		act rm -f "$ROOT$path" || die "$STARTUP_NO_DEVICE_NODES" "cannot remove the wrong $path"
	fi
	act mknod -m 0666 "$ROOT$path" c "$major" "$minor" ||
		die "$STARTUP_NO_DEVICE_NODES" "cannot make the device node $path (c $major $minor)"
	[ "$DRY" = 1 ] || say "made $path (c $major $minor)"
done || exit $?

# --- persistence and a last check ---------------------------------------------------------
if [ "$(bundle_value PERSISTENCE "$HERE/node/bundle.env")" = legacy ] ||
	[ "${NVIDIA_PERSISTENCE_MODE:-0}" = 1 ]; then
	act nvidia-smi -pm 1 >/dev/null || warn "could not turn persistence mode on (nvidia-smi -pm 1)"
fi
if ! SMI=$(nvidia-smi -L 2>&1); then
	die "$STARTUP_NO_ANSWER" "nvidia-smi does not answer: $(printf '%s' "$SMI" | tail -n 2 | tr '\n' ' ')"
fi
# --- CDI: what containerd, CRI-O, Podman and Docker hand to containers (lib.sh) -----------------
write_cdi_spec "$HERE" ||
	warn "cannot write the CDI spec $CDI_SPEC: containers that ask for $CDI_KIND devices get none (nvidia-doctor's cdi check)"
say "driver $DRIVER_VERSION is ready: $(printf '%s\n' "$SMI" | grep -c '^GPU ') GPU(s) answer nvidia-smi"
