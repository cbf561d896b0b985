# shellcheck shell=sh
# Its constants are for the scripts that source it; "A && B || C" means C when either fails.
# shellcheck disable=SC2034,SC2015
# Shared by install_nvidia.sh, startup.sh, fetch.sh, boot.sh and nvidia-doctor; sourced, never
# run. Its themes are files of their own, joined to it by the build (its `coreos-gpu:
# inline` lines): the lib.sh a bundle carries is whole, and is what startup.sh and
# fetch.sh source; this file alone is not.
# POSIX sh: it must work under bash (CoreOS/Flatcar's /bin/sh), dash and busybox sh, so no
# `local`, no arrays, no [[ ]]. Function variables carry a prefix of their function instead.
#
# Every path on the node goes through $ROOT ("" on a real node, a folder with --root), so
# the scripts can prepare an image or run against a test tree.

NVIDIA_MAJOR=195  # fixed by the driver: nvidia<N> is 195:N, nvidiactl 195:255
NVIDIA_VENDOR=0x10de
OPT=/opt/nvidia  # as seen on the node; prefix with $ROOT to touch it
LOAD_ORDER="nvidia nvidia-modeset nvidia-uvm"  # nvidia-drm only on request
# What the Mesos GPU isolator looks up with `which` on the agent's PATH.
MESOS_TOOLS="nvidia-smi nvidia-debugdump nvidia-persistenced nvidia-cuda-mps-control nvidia-cuda-mps-server"
AGENT_DEFAULT_PATH=/opt/mesosphere/bin:/usr/bin:/bin:/sbin  # DC/OS's agent PATH
DROPIN_NAME=coreos-gpu.conf
# The exit codes its functions and their callers die with (STEP_FAILED, …).
# shellcheck source=exit-codes.sh
. "${0%/*}/exit-codes.sh" # coreos-gpu: inline

say() {
	printf '%s: %s\n' "$PROG" "$*" >&2
}

warn() {
	printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# die CODE MESSAGE: one line that says what, which value and what to do; then exit CODE.
die() {
	die_code=$1
	shift
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit "$die_code"
}

# need_tools CODE TOOL...: fail before changing anything when a tool is missing.
need_tools() {
	need_code=$1
	shift
	for need_tool in "$@"; do
		command -v "$need_tool" >/dev/null 2>&1 ||
			die "$need_code" "the command $need_tool is missing on this node; install it or run from a full OS image"
	done
}

# The root argument: "" for /, else an absolute path without a trailing slash.
parse_root() {
	case $1 in
	/ | "") printf '' ;;
	/*) printf '%s' "${1%/}" ;;
	*) printf '%s' "$(pwd)/${1%/}" ;;
	esac
}

# --- the themes, each copied in here by the build (node.py inline_sources) -------------
# shellcheck source=sha256.sh
. "${0%/*}/sha256.sh" # coreos-gpu: inline
# shellcheck source=lib-gpus.sh
. "${0%/*}/lib-gpus.sh" # coreos-gpu: inline

# act CMD...: every change to the node goes through here; with DRY=1 (install's --dry-run,
# startup's --check) it only says what it would run.
act() {
	if [ "${DRY:-0}" = 1 ]; then
		say "would run: $*"
	else
		"$@"
	fi
}

# JSON string escaping for the doctor's --json: backslash, quote and control characters.
json_string() {
	printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g; s/	/\\t/g' | tr '\n\r' '  ')"
}

# replace_link TARGET PATH: make PATH a symlink to TARGET in one rename (ln -sf is not
# atomic: it unlinks first). mv -T keeps mv from moving into a linked folder.
replace_link() {
	[ "$(readlink "$2" 2>/dev/null)" = "$1" ] && return 0
	act ln -s "$1" "$2.tmp.$$" && act mv -Tf "$2.tmp.$$" "$2" || {
		rm -f "$2.tmp.$$" 2>/dev/null
		return 1
	}
}

# The awk that reads node/bundle.env, never sourced (a `$(…)` in a sourced value would run
# as root at every boot): values[KEY], each as the build wrote it. The build quotes each
# value as Python's shlex.quote does: bare when it has only safe characters, else in '…', a
# ' inside written as '"'"'. The first line of a key counts.
# shellcheck disable=SC2016 # an awk program: its $0 is awk's
BUNDLE_ENV_AWK='
	function unquote(v) {
		if (v ~ /^'"'"'.*'"'"'$/) {
			v = substr(v, 2, length(v) - 2)
			gsub(/'"'"'"'"'"'"'"'"'/, "'"'"'", v)
		}
		return v
	}
	{
		eq = index($0, "=")
		if (eq > 1 && !(substr($0, 1, eq - 1) in values))
			values[substr($0, 1, eq - 1)] = unquote(substr($0, eq + 1))
	}'

# bundle_value KEY FILE: a value of node/bundle.env ("" when it has none). Only a regular
# file is read (a FIFO would hang the read).
bundle_value() {
	[ -f "$2" ] || return 0
	awk -v key="$1" "$BUNDLE_ENV_AWK"' END { if (key in values) print values[key] }' "$2"
}

# os_release KEY: KEY's value in the node's os-release (/etc's, else /usr/lib's, which
# /etc's links to on Flatcar), its quotes dropped; "" when there is none.
os_release() {
	for or_file in "$ROOT/etc/os-release" "$ROOT/usr/lib/os-release"; do
		[ -f "$or_file" ] || continue
		sed -n "s/^$1=//p" "$or_file" | tr -d "\"'" | head -n 1
		return 0
	done
}

# shellcheck source=lib-state.sh
. "${0%/*}/lib-state.sh" # coreos-gpu: inline
# shellcheck source=lib-flatcar.sh
. "${0%/*}/lib-flatcar.sh" # coreos-gpu: inline
# shellcheck source=lib-lock.sh
. "${0%/*}/lib-lock.sh" # coreos-gpu: inline
# shellcheck source=lib-cdi.sh
. "${0%/*}/lib-cdi.sh" # coreos-gpu: inline
