# shellcheck shell=sh
# shellcheck disable=SC2034,SC2015 # variables for the script it is copied into; "A && B || C" means C when either fails
# install_nvidia.sh: the node's files outside the driver folder that an install writes and
# --uninstall removes (units, drop-ins, /opt/bin links, ld.so.conf.d), and how it tells its own.
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

UNITS=$ROOT/etc/systemd/system
# Units a bundle may carry in node/, by its settings: with a repository, the retry timer (and
# the service it starts) and the watcher that stages the bundle for a downloaded OS update;
# with persistence = daemon, nvidia-persistenced.service.
BUNDLE_UNITS="nvidia-retry.timer nvidia-retry.service nvidia-stage.service nvidia-persistenced.service"
ENABLED_BUNDLE_UNITS="nvidia-retry.timer nvidia-stage.service nvidia-persistenced.service"
LDCONF=$ROOT/etc/ld.so.conf.d/nvidia.conf
LDCONF_TEXT="# coreos-gpu: the NVIDIA driver's libraries, found by the Mesos agent through ld.so.cache
$OPT/current/lib64"

# make_dir DIR: mkdir -p, and remember each folder made (in $OPT/.created-dirs, written
# first: a stop between the two leaves a record of a folder, never a folder without one),
# so --uninstall removes it again.
make_dir() {
	[ -d "$1" ] && return 0
	make_dir "$(dirname "$1")" || return 1
	if [ "$DRY" = 0 ] && ! grep -qxF "${1#"$ROOT"}" "$ROOT$OPT/.created-dirs" 2>/dev/null; then
		txn_save "$ROOT$OPT/.created-dirs" &&
			quietly append_line "${1#"$ROOT"}" "$ROOT$OPT/.created-dirs" || return 1
	fi
	quietly act mkdir "$1" || return 1
	[ -z "${UNDO:-}" ] || txn_note made "$1"
}

# ours PATH: a link this script made (it points into /opt/nvidia).
ours() {
	case $(readlink "$1" 2>/dev/null) in
	"$OPT"/* | current/*) return 0 ;;
	*) return 1 ;;
	esac
}

# ours_file PATH: a unit or drop-in this script wrote: a file of its own (not a link) whose
# first line the build wrote ("# Written by coreos-gpu …").
ours_file() {
	[ -f "$1" ] && [ ! -L "$1" ] || return 1
	case $(head -n 1 "$1" 2>/dev/null) in
	"# Written by coreos-gpu"*) return 0 ;;
	*) return 1 ;;
	esac
}

systemctl_root() {
	if [ -n "$ROOT" ]; then
		act systemctl --root="$ROOT" "$@"
	else
		act systemctl "$@"
	fi
}

# put_boot_files: what the boot runs, outside the switched folder; the rest points through
# current.
# The unit, its entry point (boot.sh: it runs current's startup.sh, or says what is wrong with
# current and falls back to previous), the agents' drop-ins and the doctor are files of their
# own: a broken `current` cannot take them with it.
put_boot_files() {
	put_copy "$FROM/node/boot.sh" "$ROOT$OPT/startup.sh" 0755 || die "$STEP_FAILED" "cannot write $OPT/startup.sh"
	put_copy "$FROM/node/nvidia-doctor" "$ROOT$OPT/nvidia-doctor" 0755 ||
		die "$STEP_FAILED" "cannot write $OPT/nvidia-doctor"
	make_dir "$ROOT/etc/ld.so.conf.d" && put_file "$LDCONF_TEXT" "$LDCONF" || die "$STEP_FAILED" "cannot write $LDCONF"
	make_dir "$UNITS" && put_copy "$FROM/nvidia.service" "$UNITS/nvidia.service" 0644 ||
		die "$STEP_FAILED" "cannot write $UNITS/nvidia.service"
	# The bundle's units come and go with its settings (repository, persistence).
	for unit in $BUNDLE_UNITS; do
		if [ -f "$FROM/node/$unit" ]; then
			put_link "$OPT/current/node/$unit" "$UNITS/$unit" || die "$STEP_FAILED" "cannot link $UNITS/$unit"
		elif [ -L "$UNITS/$unit" ] && ours "$UNITS/$unit"; then
			disable "$unit"
			put_away "$UNITS/$unit" || die "$STEP_FAILED" "cannot remove $UNITS/$unit"
		fi
	done
	for unit in $AGENT_UNITS; do
		make_dir "$UNITS/$unit.d" &&
			put_copy "$FROM/node/agent-dropin.conf" "$UNITS/$unit.d/$DROPIN_NAME" 0644 ||
			die "$STEP_FAILED" "cannot add the drop-in for $unit"
	done
	make_dir "$ROOT/opt/bin" || die "$STEP_FAILED" "cannot create /opt/bin"
	# /opt/bin links, for humans: the driver's tools, the doctor, and nvidia-uninstall (the
	# driver folder's copy of this script, which outlives the extracted bundle in /tmp).
	TOOLS=
	[ -d "$DEST" ] && TOOLS_FROM=$DEST || TOOLS_FROM=$PAYLOAD  # a dry run's first install
	for tool in "$TOOLS_FROM"/bin/*; do
		[ -e "$tool" ] && TOOLS="$TOOLS ${tool##*/}:current/bin/${tool##*/}"
	done
	for entry in $TOOLS nvidia-doctor:nvidia-doctor nvidia-uninstall:current/install_nvidia.sh; do
		tool=${entry%%:*}
		# setup-nvidia's went above (a dry run only said so); anyone else's stay.
		case " $RECIPE_TOOLS " in *" $tool "*) ;; *)
			if [ -e "$ROOT/opt/bin/$tool" ] && ! ours "$ROOT/opt/bin/$tool"; then
				warn "/opt/bin/$tool is not coreos-gpu's; leaving it"
				continue
			fi ;;
		esac
		put_link "$OPT/${entry#*:}" "$ROOT/opt/bin/$tool" || die "$STEP_FAILED" "cannot link /opt/bin/$tool"
	done
}
