# shellcheck shell=sh
# shellcheck disable=SC2034,SC2015 # variables for the script it is copied into; "A && B || C" means C when either fails
# install_nvidia.sh: taking over from Flatcar's own recipe (setup-nvidia).
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

# --- Flatcar's own recipe (lib.sh find_flatcar_recipe) -------------------------------------------
# setup-nvidia may be compiling into /opt/nvidia right now (a node provisioned at its first
# boot runs this script while Flatcar's nvidia.service runs too), or may have left a driver of
# its own. Two drivers must not share /opt/nvidia/current, /opt/bin and
# /etc/ld.so.conf.d/nvidia.conf: setup-nvidia's run is stopped, its `current` link and tools go
# (saved in the journal, like every change) and its ld.so.conf.d entry is replaced by ours;
# its driver folders and work folder go once the install is whole (drop_recipe). From then on
# our nvidia.service, of the same name in /etc/systemd/system, shadows Flatcar's.

# stop_recipe: stop Flatcar's nvidia.service while its setup-nvidia runs (on a node, while
# nvidia.service is still Flatcar's unit). systemd stops the compile with it; a rollback
# starts the unit again.
stop_recipe() {
	[ -z "$ROOT" ] && [ -f "$FLATCAR_UNIT" ] && command -v systemctl >/dev/null 2>&1 || return 0
	# systemd names the file by its unit folder: /lib/systemd/system on a split-/usr build.
	sr_fragment=$(systemctl show -p FragmentPath --value nvidia.service 2>/dev/null)
	[ -n "$sr_fragment" ] && [ "$(readlink -f "$sr_fragment")" = "$(readlink -f "$FLATCAR_UNIT")" ] &&
		[ "$(systemctl show -p ActiveState --value nvidia.service 2>/dev/null)" = activating ] || return 0
	sr_what="Flatcar's nvidia.service: its setup-nvidia is building NVIDIA's driver$(recipe_driver | sed 's/^./ &/') into $OPT, and coreos-gpu's nvidia.service replaces it"
	if [ "$DRY" = 1 ]; then
		say "would stop $sr_what"
		return 0
	fi
	say "stopping $sr_what"
	RECIPE_STOPPED=1
	quietly systemctl stop nvidia.service || die "$STEP_FAILED" "cannot stop Flatcar's nvidia.service (setup-nvidia)"
}

# take_over_recipe: setup-nvidia's `current` link and /opt/bin tools go (the switch and the
# tool links below put ours there), and its ld.so.conf.d entry is named (put_file below
# replaces it); one line says what.
take_over_recipe() {
	tr_what=
	if [ -n "$RECIPE_CURRENT" ]; then
		tr_what=" $OPT/current"
		put_away "$ROOT$OPT/current" || die "$STEP_FAILED" "cannot remove Flatcar's $OPT/current (setup-nvidia's)"
	fi
	for tr_tool in $RECIPE_TOOLS; do
		tr_what="$tr_what /opt/bin/$tr_tool"
		put_away "$ROOT/opt/bin/$tr_tool" || die "$STEP_FAILED" "cannot remove Flatcar's /opt/bin/$tr_tool (setup-nvidia's)"
	done
	tr_line=
	[ ! -f "$LDCONF" ] || read -r tr_line <"$LDCONF" || true
	[ "$tr_line" != "$OPT/current/usr/lib64" ] || tr_what="$tr_what ${LDCONF#"$ROOT"}"
	[ -n "$tr_what" ] || return 0
	say "taking over from Flatcar's setup-nvidia:$tr_what"
}

# drop_recipe: once the install is whole, setup-nvidia's driver folders (a few hundred MiB
# each) and its work folder (the ~6 GB developer container) go: coreos-gpu's driver replaces
# them, and left there they would mislead setup-nvidia itself after nvidia-uninstall (it
# skips the build for a kernel whose folder exists, then loads through a `current` that is
# gone). Out of sight first, one rename each, as drop_unbootable does.
drop_recipe() {
	[ -n "$RECIPE_TREES$RECIPE_WORK" ] || return 0
	dr_what=
	for dr_name in $RECIPE_TREES ${RECIPE_WORK:+workdir}; do
		act mv -T "$ROOT$OPT/$dr_name" "$ROOT$OPT/.gone.$dr_name.$$" &&
			act rm -rf "$ROOT$OPT/.gone.$dr_name.$$" || return 1
		dr_what="$dr_what $OPT/$dr_name"
	done
	[ "$DRY" = 1 ] ||
		say "removed Flatcar's setup-nvidia build:$dr_what (after nvidia-uninstall, Flatcar's nvidia.service builds its driver again at the next boot)"
}
