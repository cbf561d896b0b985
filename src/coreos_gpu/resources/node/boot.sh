#!/bin/sh
# The boot's entry point: nvidia.service runs /opt/nvidia/startup.sh, which install_nvidia.sh
# makes a copy of this script (a file of its own, not a link through `current`), so that it
# runs even when `current` is broken: a link to nothing, to a folder half removed, or not a
# link at all. It then hands over to the startup.sh of the driver `current` points at, with
# the same arguments (startup.sh's usage and exit codes). When `current` is broken, it says
# so in one line and falls back to `previous`, when that is a whole driver folder: it points
# `current` there (under the install lock, as install_nvidia.sh switches) and starts it.
# Otherwise it exits 3, as startup.sh does for an incomplete installation.
set -u
# shellcheck disable=SC2034 # lib.sh's say, warn and die print it
PROG=startup.sh

ROOT=
DRY=0
prev_arg=
for arg in "$@"; do
	case $prev_arg:$arg in
	--root:*) ROOT=$arg ;;
	*:--root=*) ROOT=${arg#--root=} ;;
	*:--check) DRY=1 ;;
	esac
	prev_arg=$arg
done

# shellcheck source=lib.sh
. "${0%/*}/lib.sh" # coreos-gpu: inline
ROOT=$(parse_root "$ROOT")

CURRENT=$(readlink "$ROOT$OPT/current" 2>/dev/null || true)
PROBLEM=$(current_problem)
if [ -z "$PROBLEM" ] && [ -n "$CURRENT" ]; then
	exec "$ROOT$OPT/$CURRENT/startup.sh" "$@"
fi
[ -n "$PROBLEM" ] ||
	die "$STARTUP_INCOMPLETE" "no driver is installed ($OPT/current is missing); extract a bundle and run its install_nvidia.sh"
PREVIOUS=$(readlink "$ROOT$OPT/previous" 2>/dev/null || true)
bootable "$PREVIOUS" ||
	die "$STARTUP_INCOMPLETE" "$PROBLEM, and there is no whole previous driver to fall back to; extract a bundle and run its install_nvidia.sh"
if [ "$DRY" = 1 ]; then
	warn "$PROBLEM: would point it at the previous driver, $PREVIOUS, and start that"
else
	warn "$PROBLEM: pointing it at the previous driver, $PREVIOUS, and starting that"
	lock_install "$STARTUP_INCOMPLETE"
	# Looked at again under the lock: an install may have repaired it meanwhile.
	if [ -n "$(current_problem)" ]; then
		# A folder or file in its place (an earlier tool's?) is kept, out of the way.
		if [ ! -L "$ROOT$OPT/current" ] && [ -e "$ROOT$OPT/current" ]; then
			mv -T "$ROOT$OPT/current" "$ROOT$OPT/current.not-a-link.$$" ||
				die "$STARTUP_INCOMPLETE" "cannot move $OPT/current out of the way; move it out of $OPT and run me again"
			say "moved $OPT/current to $OPT/current.not-a-link.$$"
		fi
		replace_link "$PREVIOUS" "$ROOT$OPT/current" ||
			die "$STARTUP_INCOMPLETE" "cannot point $OPT/current at $PREVIOUS; run install_nvidia.sh from a bundle"
		# The ld.so cache names the libraries through current: the same paths, now there.
		run_ldconfig || warn "ldconfig failed; run it by hand"
	fi
	exec 9<&-
	PREVIOUS=$(readlink "$ROOT$OPT/current")
fi
exec "$ROOT$OPT/$PREVIOUS/startup.sh" "$@"
