# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# install_nvidia.sh --uninstall (nvidia-uninstall).
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

# drop_opt: remove the lock, the record and the folders this script made, where nothing of
# a driver is left in them (the end of --uninstall; a first install refused midway).
drop_opt() {
	do_created=$(cat "$ROOT$OPT/.created-dirs" 2>/dev/null || true)
	act rm -f "$ROOT$OPT/.created-dirs" "$ROOT$OPT/.lock"
	act rmdir "$ROOT$OPT" 2>/dev/null
	# Folders it made (none inside $OPT), deepest first, where they are empty now.
	printf '%s\n' "$do_created" | sort -r | while read -r do_dir; do
		[ -n "$do_dir" ] && [ -d "$ROOT$do_dir" ] && act rmdir "$ROOT$do_dir" 2>/dev/null
	done
	return 0
}

uninstall() {
	lock
	clean_leftovers
	[ -L "$ROOT$OPT/current" ] || [ -e "$UNITS/nvidia.service" ] || [ -f "$LDCONF" ] ||
		say "no coreos-gpu driver is installed under ${ROOT:-/}; removing what is left, if anything"
	# First what activates the driver, then the driver: a stop midway leaves nothing that
	# points at a missing file for long, and a second --uninstall finishes the job.
	for unit in nvidia.service $BUNDLE_UNITS; do
		{ [ -L "$UNITS/$unit" ] && ours "$UNITS/$unit"; } || ours_file "$UNITS/$unit" || continue
		# A watcher left running would stage a driver into the $OPT this removes; the
		# persistence daemon runs from it.
		[ -n "$ROOT" ] || [ "$unit" = nvidia.service ] || systemctl_root stop "$unit" >/dev/null 2>&1 || true
		systemctl_root disable "$unit" >/dev/null 2>&1 || true
		act rm -f "$UNITS/$unit"
	done
	for dropin in "$UNITS"/*.d/"$DROPIN_NAME"; do
		ours "$dropin" || ours_file "$dropin" || continue
		act rm -f "$dropin"
	done
	for link in "$ROOT"/opt/bin/*; do
		ours "$link" && act rm -f "$link"
	done
	if [ -f "$LDCONF" ] && grep -q '^# coreos-gpu' "$LDCONF"; then
		act rm -f "$LDCONF"
	fi
	# Only what this script puts in /opt/nvidia (and startup.sh's CDI spec, which names the
	# driver folders that go): an earlier tool's files there stay. This script may run from
	# one of these folders: sh has it open already, so it reads on.
	for item in "$ROOT$OPT"/current "$ROOT$OPT"/previous "$ROOT$OPT"/startup.sh \
		"$ROOT$OPT"/nvidia-doctor "$ROOT$STAGED" "$ROOT$CDI_SPEC" \
		"$ROOT$OPT"/.fetch.* "$ROOT$OPT"/*/node/bundle.env; do
		[ -e "$item" ] || [ -L "$item" ] || continue
		case $item in */node/bundle.env) item=${item%/node/bundle.env} ;; esac
		act rm -rf "$item"
	done
	drop_opt
	run_ldconfig || warn "ldconfig failed; run it by hand"
	[ -n "$ROOT" ] || systemctl_root daemon-reload || true
	say "uninstalled; modules already loaded stay loaded until the next reboot"
	# Nothing of setup-nvidia's is left (an install removes it): unshadowed, it starts over.
	[ ! -f "$ROOT$FLATCAR_UNIT" ] ||
		say "Flatcar's own nvidia.service (setup-nvidia) is no longer shadowed: at the next boot it downloads, builds and loads NVIDIA's driver$(recipe_driver | sed 's/^./ &/') on a node with an NVIDIA GPU (systemctl mask nvidia.service keeps it from doing so)"
	exit 0
}
