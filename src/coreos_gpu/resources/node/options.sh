# shellcheck shell=sh
# shellcheck disable=SC2034 # variables for the script it is copied into
# The node scripts' command-line helper, copied in before their option loop: lib.sh is
# not there yet (install_nvidia.sh and the doctor have it copied in after the loop;
# startup.sh and fetch.sh source it only once they know that their folder is an
# installed one).
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh,
# startup.sh, fetch.sh and nvidia-doctor;
# never run or sourced by itself.

# The exit codes (USAGE here; all the script's own), before anything can exit.
# shellcheck source=exit-codes.sh
. "${0%/*}/exit-codes.sh" # coreos-gpu: inline

# option_value "$@": the value of the option in $1, given as "--name VALUE" or "--name=VALUE":
# in VALUE, and in SHIFT the words it takes after $1 (1 or 0), for the loop to shift. With no
# VALUE after "--name": the usage on stderr, exit USAGE (bad command line).
option_value() {
	case $1 in
	--*=*)
		VALUE=${1#*=}
		SHIFT=0 ;;
	*)
		[ $# -ge 2 ] || { usage >&2; exit "$USAGE"; }
		VALUE=$2
		SHIFT=1 ;;
	esac
}
