# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# The node's locks: one helper takes each of them (lib.sh's theme).
# Copied in by the build (node.py inline_sources) at its line in lib.sh;
# never run or sourced by itself.

# Two locks, each a file in $OPT held with flock(1) on a fixed descriptor: $OPT/.lock on fd 9
# (install_nvidia.sh; startup.sh and fetch.sh for their own few changes to $OPT) and
# $OPT/.fetch.lock on fd 8 (fetch.sh). Nodes with older bundles take the same files the same
# way, so their locks and these keep excluding each other.

# check_lock_file FILE: die STEP_FAILED with one line when FILE cannot be opened to append. Tried in a
# subshell first: a failed `exec 9>>FILE` ends a POSIX shell at once (a redirection error of
# a special builtin), before any `|| die` runs, with only the shell's own words.
check_lock_file() {
	(: >>"$1") 2>/dev/null ||
		die "$STEP_FAILED" "cannot open the lock file $1 (a read-only file system, or something else in its place); make $(dirname "$1") writable and run me again"
}

# lock_file FD FILE SECONDS CODE BUSY [PREPARE]: hold the lock on FILE on descriptor FD (8 or
# 9) until the caller closes it (exec 9<&-), waiting up to SECONDS for another holder; else
# exit CODE saying BUSY. PREPARE, a command, runs before each try (install_nvidia.sh makes
# $OPT there). --uninstall (and a first install whose bundle fails its checks) removes the
# lock file while holding it, so a run that was waiting on it may wake up holding a lock on
# a file nobody else can open any more: it then locks the file that is there now instead.
# With CODE "": one try without waiting, in a subshell (a file that cannot be opened ends
# it, silently), that returns 1 when the lock is held elsewhere.
lock_file() {
	lf_tries=0
	while [ "$lf_tries" -lt 20 ]; do
		lf_tries=$((lf_tries + 1))
		[ -z "${6:-}" ] || "$6"
		if [ -z "$4" ]; then
			{ eval "exec $1>>\"\$2\""; } 2>/dev/null && flock -n "$1"
			return
		fi
		check_lock_file "$2"
		eval "exec $1>>\"\$2\""
		flock -w "$3" "$1" || die "$4" "$5"
		# The same file? (test -ef is not POSIX; /dev/fd/FD leads to the file even once removed)
		[ "$(stat -L -c %d:%i "$2" 2>/dev/null)" = "$(stat -L -c %d:%i "/dev/fd/$1")" ] &&
			return 0
	done
	case $2 in
	*/.fetch.lock) lf_other=fetch.sh ;;
	*) lf_other=install_nvidia.sh ;;
	esac
	die "$4" "$2 keeps being removed while this run waits for it; run me again when no other $lf_other runs"
}

# lock_install CODE: the install lock (install_nvidia.sh's), for the few changes startup.sh
# and fetch.sh make to $OPT themselves; fd 9 holds it until the caller closes it
# (exec 9<&-). Exit CODE after two minutes.
lock_install() {
	lock_file 9 "$ROOT$OPT/.lock" 120 "$1" \
		"another install_nvidia.sh holds $ROOT$OPT/.lock; run me again when it is done"
}

# clear_leftovers_in_opt: what a run killed midway left in $OPT, beside the drivers: half-made
# links and lists (current.tmp.PID, staged.tmp.PID), driver folders half removed (.gone.*)
# and, when no fetch.sh runs (its lock is free), a fetch's folder. Call it holding the
# install lock.
clear_leftovers_in_opt() {
	for cl_left in "$ROOT$OPT"/*.tmp.* "$ROOT$OPT"/.gone.* "$ROOT$OPT"/.undo.*; do
		[ -e "$cl_left" ] || [ -L "$cl_left" ] || continue
		act rm -rf "$cl_left"
	done
	[ -e "$ROOT$OPT/.fetch.lock" ] || return 0
	# A busy lock: leave it to the fetch that holds it.
	(lock_file 8 "$ROOT$OPT/.fetch.lock" 0 "" "" || exit 0
	for cl_left in "$ROOT$OPT"/.fetch.*; do
		[ "$cl_left" = "$ROOT$OPT/.fetch.lock" ] || ! [ -e "$cl_left" ] || act rm -rf "$cl_left"
	done)
}
