# shellcheck shell=sh
# shellcheck disable=SC2034,SC2015 # variables for the script it is copied into; "A && B || C" means C when either fails
# Flatcar's own NVIDIA drivers (its sysext, its setup-nvidia recipe) and the modules a
# locked-down kernel takes (lib.sh's theme).
# Copied in by the build (node.py inline_sources) at its line in lib.sh;
# never run or sourced by itself.

# --- another driver, and the modules the kernel takes ---------------------------------------
# What every run asks is read with shell builtins (install_nvidia.sh asks before it changes
# anything, and each command it runs is one more point where it can fail or be killed); od,
# tail and grep run only on a kernel that loads signed modules alone.

# find_nvidia_sysext KERNEL: SYSEXT says what of a Flatcar NVIDIA driver sysext this node has
# ("" when none), SYSEXT_FIX how to disable it. Flatcar's official ones are nvidia-drivers-
# 535, -550, -570 and their -open (flatcar/scripts build_library/extra_sysexts.sh), with
# modules Flatcar signed. A name in /etc/flatcar/enabled-sysext.conf enables one (names split
# by blanks, "#" starts a comment; "-NAME" only disables a default of /usr's, and no NVIDIA
# one is); at each boot the initrd fetches /etc/flatcar/sysext/flatcar-NAME-<OS version>.raw
# if missing and links it as /etc/extensions/flatcar-NAME.raw, but never removes the link of
# a name no longer listed (flatcar/bootengine initrd-setup-root-after-ignition). Merged by
# systemd-sysext, it puts /usr/lib/extension-release.d/extension-release.flatcar-NAME
# (flatcar/scripts build_sysext) and its modules under /usr/lib/modules/<kernel>/video.
find_nvidia_sysext() {
	SYSEXT=
	SYSEXT_FIX=
	fs_conf=$ROOT/etc/flatcar/enabled-sysext.conf
	if [ -f "$fs_conf" ]; then  # a regular file: a FIFO would hang the read
		while IFS= read -r fs_line || [ -n "$fs_line" ]; do
			set -f
			# shellcheck disable=SC2086 # the names on the line, split as the initrd splits them
			for fs_name in ${fs_line%%#*}; do
				case $fs_name in nvidia-drivers-*)
					SYSEXT="$SYSEXT, $fs_name in /etc/flatcar/enabled-sysext.conf"
					SYSEXT_FIX="$SYSEXT_FIX remove the line $fs_name from /etc/flatcar/enabled-sysext.conf," ;;
				esac
			done
			set +f
		done <"$fs_conf"
	fi
	# systemd-sysext's folders on the root file system.
	for fs_link in "$ROOT"/etc/extensions/*nvidia-drivers-* "$ROOT"/run/extensions/*nvidia-drivers-* \
		"$ROOT"/var/lib/extensions/*nvidia-drivers-*; do
		[ -e "$fs_link" ] || [ -L "$fs_link" ] || continue
		SYSEXT="$SYSEXT, ${fs_link#"$ROOT"}"
		SYSEXT_FIX="$SYSEXT_FIX remove ${fs_link#"$ROOT"},"
	done
	for fs_merged in "$ROOT"/usr/lib/extension-release.d/extension-release.*nvidia-drivers-* \
		"$ROOT/usr/lib/modules/$1"/video/nvidia.ko*; do
		[ -e "$fs_merged" ] || continue
		SYSEXT="$SYSEXT, ${fs_merged#"$ROOT"} (merged into /usr)"
		[ -n "$SYSEXT_FIX" ] ||
			SYSEXT_FIX=" remove its image from /etc/extensions (systemd-sysext status names it),"
		break
	done
	[ -n "$SYSEXT" ] || return 0
	SYSEXT="Flatcar's NVIDIA driver sysext is enabled on this node (${SYSEXT#, })"
	SYSEXT_FIX="${SYSEXT_FIX# } then reboot (systemd-sysext refresh unmerges it, but a module it loaded stays loaded until a reboot)"
}

# What a locked-down kernel leaves an operator, for the line that says it cannot load ours.
LOCKDOWN_CHOICES="the choices: Flatcar's NVIDIA sysext, whose modules Flatcar signs, in place of this driver where its branches fit (a line nvidia-drivers-535, -550 or -570, each also -open, in /etc/flatcar/enabled-sysext.conf; Flatcar 4344.0.0 alpha and 4459.2.0 stable on, not LTS), Secure Boot off (then reboot), or modules signed with a key this kernel trusts (Flatcar's kernels trust only their own build key: an enrolled MOK does not help)"

# read_lockdown: LOCKDOWN says in a few words why this kernel loads only signed modules (""
# when it loads unsigned ones). /sys/kernel/security/lockdown lists the modes and brackets
# the one in force, "none [integrity] confidentiality" (security/lockdown/lockdown.c);
# integrity and confidentiality both refuse unsigned modules. No file: a kernel without the
# lockdown LSM (or a tree without it). module.sig_enforce=1 refuses them without lockdown.
# Flatcar locks down under Secure Boot (since 4152.2.0): the EFI variable SecureBoot says so
# in its 5th byte (efivarfs puts 4 bytes of attributes first), read only when it matters.
read_lockdown() {
	LOCKDOWN=
	rl_line=
	rl_file=$ROOT/sys/kernel/security/lockdown
	[ ! -f "$rl_file" ] || read -r rl_line 2>/dev/null <"$rl_file" || true
	case $rl_line in
	*"[confidentiality]"*) LOCKDOWN="lockdown=confidentiality" ;;
	*"[integrity]"*) LOCKDOWN="lockdown=integrity" ;;
	esac
	rl_line=
	rl_file=$ROOT/sys/module/module/parameters/sig_enforce
	[ -n "$LOCKDOWN" ] || [ ! -f "$rl_file" ] || read -r rl_line 2>/dev/null <"$rl_file" || true
	[ "$rl_line" != Y ] || LOCKDOWN="module.sig_enforce=1"
	rl_file=$ROOT/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
	[ -n "$LOCKDOWN" ] && [ -f "$rl_file" ] || return 0
	rl_line=$(od -An -tu1 -j4 -N1 "$rl_file" 2>/dev/null)
	[ "${rl_line##* }" != 1 ] || LOCKDOWN="$LOCKDOWN, Secure Boot on"
}

# first_unsigned FILE...: the first of these kernel modules that carries no signature ("" when
# all do). scripts/sign-file appends the signature and then the magic "~Module signature
# appended~\n", which the kernel looks for at the very end (MODULE_SIG_STRING,
# kernel/module/signing.c). Whether the kernel trusts the key is its own to say, at insmod.
first_unsigned() {
	for fu_ko in "$@"; do
		tail -c 28 "$fu_ko" 2>/dev/null | grep -qx '~Module signature appended~' && continue
		printf '%s' "$fu_ko"
		return 0
	done
}

# --- Flatcar's own recipe: setup-nvidia ---------------------------------------------------------
# Every Flatcar image ships /usr/lib/systemd/system/nvidia.service, enabled, whose
# /usr/lib/nvidia/bin/setup-nvidia compiles NVIDIA's driver at boot on a node with an NVIDIA
# GPU (coreos-overlay x11-drivers/nvidia-drivers-service): it lays the driver out in
# /opt/nvidia/<driver>/<kernel>/usr/{lib64,lib/modules/<kernel>/video}, links /opt/nvidia/current
# to <driver>/<kernel>, copies eight tools into /opt/bin (plain files), writes
# /etc/ld.so.conf.d/nvidia.conf (/opt/nvidia/current/usr/lib64) and keeps its downloads in
# /opt/nvidia/workdir. It skips the build when /opt/nvidia/<driver>/$(uname -r) is there, the
# driver version coming from /usr/share/flatcar/nvidia-metadata (/etc/flatcar/'s overrides).
# coreos-gpu's unit has the same name in /etc/systemd/system, so systemd runs ours instead.
FLATCAR_UNIT=/usr/lib/systemd/system/nvidia.service
FLATCAR_TOOLS="nvidia-debugdump nvidia-cuda-mps-control nvidia-xconfig nvidia-modprobe nvidia-smi nvidia-cuda-mps-server nvidia-persistenced nvidia-settings"

# find_flatcar_recipe: what a run of setup-nvidia left. RECIPE_TREES: its driver folders in
# $OPT (a version number, holding <kernel>/usr); RECIPE_CURRENT: 1 when $OPT/current is its
# link (it leads to a usr/ tree, not to a driver folder of ours); RECIPE_TOOLS: its tools in
# /opt/bin, files and not links, counted only beside a tree or current of its own (without
# one, a file there is someone else's); RECIPE_WORK: its work folder. Builtins only: every
# install asks.
find_flatcar_recipe() {
	RECIPE_TREES=
	for fr_dir in "$ROOT$OPT"/*/*/usr; do
		[ -d "$fr_dir" ] || continue
		fr_driver=${fr_dir%/*/usr}
		fr_driver=${fr_driver##*/}
		case $fr_driver in "" | *[!0-9.]*) continue ;; esac
		case " $RECIPE_TREES " in *" $fr_driver "*) ;; *) RECIPE_TREES="$RECIPE_TREES $fr_driver" ;; esac
	done
	RECIPE_TREES=${RECIPE_TREES# }
	RECIPE_CURRENT=
	[ -L "$ROOT$OPT/current" ] && [ -d "$ROOT$OPT/current/usr" ] && [ ! -e "$ROOT$OPT/current/node/bundle.env" ] &&
		RECIPE_CURRENT=1
	RECIPE_TOOLS=
	if [ -n "$RECIPE_TREES$RECIPE_CURRENT" ]; then
		for fr_tool in $FLATCAR_TOOLS; do
			[ -f "$ROOT/opt/bin/$fr_tool" ] && [ ! -L "$ROOT/opt/bin/$fr_tool" ] && RECIPE_TOOLS="$RECIPE_TOOLS $fr_tool"
		done
	fi
	RECIPE_TOOLS=${RECIPE_TOOLS# }
	RECIPE_WORK=
	[ ! -d "$ROOT$OPT/workdir" ] || [ -L "$ROOT$OPT/workdir" ] || RECIPE_WORK=$OPT/workdir
	return 0
}

# recipe_driver: the driver version Flatcar's recipe builds on this node (nvidia-metadata;
# "" when this OS has none).
recipe_driver() {
	for rd_file in "$ROOT/etc/flatcar/nvidia-metadata" "$ROOT/usr/share/flatcar/nvidia-metadata"; do
		rd_version=$(bundle_value NVIDIA_DRIVER_VERSION "$rd_file")
		rd_version=${rd_version#\"}  # a shell file: "…" is as good as bare
		rd_version=${rd_version%\"}
		[ -z "$rd_version" ] || { printf '%s' "$rd_version"; return 0; }
	done
}
