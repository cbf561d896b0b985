# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# install_nvidia.sh: the install's one transaction. Copied in where the transaction
# starts: from there on, die (below) rolls back before it says why.
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

# --- one transaction: any failure from here on leaves the node as it was -----------------------
# Before this run changes a path, the path is saved in $UNDO (.undo.* beside the drivers): a
# copy of the file or link there (cp -P keeps a link a link), or a note that there was none;
# each folder it makes is noted too. die (below) puts every one back, newest first, removes
# the driver folder it added, and only then says why. A run killed midway cannot do that: it
# leaves the old driver current, or the new one complete (see the top); the next run clears
# the journal it left.
UNDO=
UNDO_N=0
UNDO_SAVED=
SWITCHED=0
NL='
'
# What the last command that failed to change the node said (its last line): die adds it to
# its own line, so that the one line names the cause (a read-only file system, no space).
CAUSE=

# quietly CMD...: run CMD (a command, or a function whose changes are on disk only: it runs
# in a subshell), its words kept in CAUSE when it fails instead of printed; a dry run runs
# it as it is (what it would do is what it says).
quietly() {
	[ "$DRY" = 0 ] || { "$@"; return; }
	q_said=$("$@" 2>&1 >/dev/null) && return 0
	CAUSE=${q_said##*"$NL"}
	return 1
}

append_line() {
	printf '%s\n' "$1" >>"$2"
}

write_line() {
	printf '%s\n' "$1" >"$2"
}

txn_begin() {
	[ "$DRY" = 0 ] || return 0
	UNDO=$(mktemp -d "$ROOT$OPT/.undo.XXXXXX" 2>/dev/null) || {
		UNDO=
		die "$STEP_FAILED" "cannot create a folder in $ROOT$OPT for the journal; check that it is writable and has space"
	}
}

# txn_note KIND PATH: one journal entry (KIND saved: the copy is $UNDO/<n>; absent: remove
# PATH; made: a folder to rmdir; tree: a folder to remove whole; units: see txn_units).
txn_note() {
	UNDO_N=$((UNDO_N + 1))
	printf '%s %s\n' "$1" "$2" >"$UNDO/$UNDO_N.what" || die "$STEP_FAILED" "cannot write the journal in $UNDO"
}

# txn_save PATH...: before each PATH (a file or a link) changes; the first save of a path is
# the one that counts.
txn_save() {
	[ -n "$UNDO" ] || return 0
	for ts_path in "$@"; do
		case $NL$UNDO_SAVED in *"$NL$ts_path$NL"*) continue ;; esac
		UNDO_SAVED=$UNDO_SAVED$ts_path$NL
		if [ -e "$ts_path" ] || [ -L "$ts_path" ]; then
			quietly cp -pP "$ts_path" "$UNDO/$((UNDO_N + 1))" || die "$STEP_FAILED" "cannot save $ts_path in $UNDO"
			txn_note saved "$ts_path"
		else
			txn_note absent "$ts_path"
		fi
	done
}

# txn_units: before systemctl enables units, the links in *.wants and *.requires folders (and
# those folders) as they are, so that the ones it adds can go again.
txn_units() {
	[ -n "$UNDO" ] || return 0
	for tu_path in "$UNITS"/*.wants "$UNITS"/*.requires "$UNITS"/*.wants/* "$UNITS"/*.requires/*; do
		if [ -e "$tu_path" ] || [ -L "$tu_path" ]; then printf '%s\n' "$tu_path"; fi
	done >"$UNDO/$((UNDO_N + 1))" || die "$STEP_FAILED" "cannot write the journal in $UNDO"
	txn_note units "$UNITS"
}

# rollback: undo the journal, newest entry first (quietly: die says why; what cannot be put
# back is named in one warning).
rollback() {
	rb_failed=
	[ -z "$UNDO" ] || undo_journal
	# This run's temporary names, wherever a failed step left one.
	for rb_left in "$ROOT$OPT"/*.tmp."$$" "$ROOT/opt/bin"/*.tmp."$$" "$UNITS"/*.tmp."$$" "$UNITS"/*.d/*.tmp."$$" \
		"$LDCONF".tmp."$$"; do
		[ ! -e "$rb_left" ] && [ ! -L "$rb_left" ] || rm -f "$rb_left" 2>/dev/null || rb_failed="$rb_failed $rb_left"
	done
	# A first install leaves no /opt/nvidia behind (nor /opt, if it made that too).
	if [ "$LOCKING" = 1 ] && [ -d "$ROOT$OPT" ] && [ ! -e "$ROOT$OPT/current" ] && [ ! -L "$ROOT$OPT/current" ] &&
		! ls -d "$ROOT$OPT"/*/node/bundle.env >/dev/null 2>&1; then
		drop_opt
	elif [ "$LOCKING" = 1 ] && [ "$LOCK_MADE" = 1 ]; then
		rm -f "$ROOT$OPT/.lock"  # made by this run (it still holds it: see lock)
	fi
	if [ "$SWITCHED" = 1 ]; then
		run_ldconfig >/dev/null 2>&1 || rb_failed="$rb_failed ld.so.cache"
	fi
	if [ -z "$ROOT" ] && [ "$SYSTEMD_TOUCHED" = 1 ]; then
		systemctl daemon-reload >/dev/null 2>&1 || rb_failed="$rb_failed (systemctl daemon-reload)"
	fi
	# Flatcar's setup-nvidia, stopped by this run, builds its driver again.
	if [ "$RECIPE_STOPPED" = 1 ]; then
		systemctl start --no-block nvidia.service >/dev/null 2>&1 || rb_failed="$rb_failed (systemctl start nvidia.service)"
	fi
	[ -z "$rb_failed" ] || warn "could not put back:$rb_failed"
}

undo_journal() {
	rb_undo=$UNDO
	UNDO=
	rb_n=$UNDO_N
	while [ "$rb_n" -gt 0 ]; do
		read -r rb_kind rb_path <"$rb_undo/$rb_n.what" || rb_kind=
		case $rb_kind in
		saved) mv -Tf "$rb_undo/$rb_n" "$rb_path" ;;
		absent) rm -f "$rb_path" ;;
		made) rmdir "$rb_path" ;;
		tree) rm -rf "$rb_path" ;;
		units)
			for rb_unit in "$rb_path"/*.wants/* "$rb_path"/*.requires/* "$rb_path"/*.wants "$rb_path"/*.requires; do
				[ -e "$rb_unit" ] || [ -L "$rb_unit" ] || continue
				grep -qxF "$rb_unit" "$rb_undo/$rb_n" || rm -f "$rb_unit" 2>/dev/null || rmdir "$rb_unit"
			done ;;
		*) false ;;
		esac 2>/dev/null || rb_failed="$rb_failed $rb_path"
		rb_n=$((rb_n - 1))
	done
	rm -rf "$rb_undo"
}
SYSTEMD_TOUCHED=0
RECIPE_STOPPED=0
LOCKING=0
LOCK_MADE=0

# From here, every failure undoes the journal before it says why.
die() {
	die_code=$1
	shift
	die_cause=$CAUSE
	rollback
	printf '%s: error: %s%s\n' "$PROG" "$*" "${die_cause:+ ($die_cause)}" >&2
	exit "$die_code"
}
trap 'die "$STEP_FAILED" "stopped by a signal; the node is as it was"' HUP INT TERM

# txn_commit: the change is whole; nothing to undo any more.
txn_commit() {
	[ -z "$UNDO" ] || rm -rf "$UNDO" 2>/dev/null ||
		warn "cannot remove the journal $UNDO (the change is whole: the next run removes it)"
	UNDO=
	LOCKING=0
	SWITCHED=0
	SYSTEMD_TOUCHED=0
	trap - HUP INT TERM
}

# put_link TARGET PATH, put_file TEXT PATH, put_copy FILE PATH MODE: make PATH so (in one
# rename), saved first; nothing when it is so already.
put_link() {
	[ "$(readlink "$2" 2>/dev/null)" = "$1" ] && return 0
	txn_save "$2" && quietly replace_link "$1" "$2" || { rm -f "$2.tmp.$$" 2>/dev/null; return 1; }
}

put_file() {
	[ -f "$2" ] && [ ! -L "$2" ] && [ "$(cat "$2")" = "$1" ] && return 0
	if [ "$DRY" = 1 ]; then
		say "would write $2"
		return 0
	fi
	txn_save "$2" && quietly write_line "$1" "$2.tmp.$$" && quietly mv -f "$2.tmp.$$" "$2" ||
		{ rm -f "$2.tmp.$$" 2>/dev/null; return 1; }
}

put_copy() {
	[ -f "$2" ] && [ ! -L "$2" ] && cmp -s "$1" "$2" && return 0
	if [ "$DRY" = 1 ]; then
		say "would write $2"
		return 0
	fi
	txn_save "$2" && quietly cp "$1" "$2.tmp.$$" && quietly chmod "$3" "$2.tmp.$$" &&
		quietly mv -f "$2.tmp.$$" "$2" ||
		{ rm -f "$2.tmp.$$" 2>/dev/null; return 1; }
}

# put_away PATH: remove PATH, saved first.
put_away() {
	txn_save "$1" && quietly act rm -f "$1"
}

# disable UNIT: systemctl disable, its links saved first.
disable() {
	txn_save "$UNITS"/*.wants/"$1" "$UNITS"/*.requires/"$1"
	SYSTEMD_TOUCHED=1
	systemctl_root disable "$1" >/dev/null 2>&1 || true
}
