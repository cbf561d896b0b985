# shellcheck shell=sh
# Its constants are for the scripts that source it; "A && B || C" means C when either fails.
# shellcheck disable=SC2034,SC2015
# Shared by install_nvidia.sh, startup.sh and nvidia-doctor; sourced, never run.
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

# Loaded module names in /proc/modules use underscores: nvidia-uvm is nvidia_uvm.
module_loaded() {
	grep -q "^$(printf '%s' "$1" | tr - _) " "$ROOT/proc/modules" 2>/dev/null
}

# NVIDIA display controllers on PCI, one "<bus id> <class>" line each. sysfs `class` is
# class, subclass and prog-if: 0x0300xx is VGA, 0x0302xx a 3D controller (most datacenter
# cards, e.g. on EC2). Audio, USB and bridge functions of the same card are not GPUs.
list_gpus() {
	for gpu_dev in "$ROOT"/sys/bus/pci/devices/*; do
		[ -r "$gpu_dev/vendor" ] && [ -r "$gpu_dev/class" ] || continue
		read -r gpu_vendor <"$gpu_dev/vendor" || continue
		read -r gpu_class <"$gpu_dev/class" || continue
		[ "$gpu_vendor" = "$NVIDIA_VENDOR" ] || continue
		case $gpu_class in
		0x0300?? | 0x0302??) printf '%s %s\n' "${gpu_dev##*/}" "$gpu_class" ;;
		esac
	done
}

# describe_gpus "$(list_gpus)": "2 NVIDIA GPU(s): 0000:00:1e.0 (3D controller) …".
describe_gpus() {
	printf '%s NVIDIA GPU(s): ' "$(printf '%s\n' "$1" | wc -l | tr -d ' ')"
	printf '%s\n' "$1" | while read -r dg_bus dg_class; do
		case $dg_class in
		0x0302*) printf '%s (3D controller) ' "$dg_bus" ;;
		*) printf '%s (VGA controller) ' "$dg_bus" ;;
		esac
	done
}

# act CMD...: every change to the node goes through here; with DRY=1 (install's --dry-run,
# startup's --check) it only says what it would run.
act() {
	if [ "${DRY:-0}" = 1 ]; then
		say "would run: $*"
	else
		"$@"
	fi
}

# The "Device Minor" of every GPU the driver knows, one per line. Minors do not follow bus
# order, and /dev/nvidia<N> must carry the driver's N, not a count.
gpu_minors() {
	for minor_info in "$ROOT"/proc/driver/nvidia/gpus/*/information; do
		[ -r "$minor_info" ] || continue
		sed -n 's/^Device Minor:[[:space:]]*\([0-9][0-9]*\)[[:space:]]*$/\1/p' "$minor_info"
	done | sort -n
}

# The major of a character device driver in /proc/devices, matched by its exact name and
# only in the "Character devices:" section; nvidia-uvm's is dynamic.
char_major() {
	awk -v name="$1" '
		/^Character devices:/ { chars = 1; next }
		/^[A-Za-z]/ { chars = 0 }
		chars && $2 == name { print $1; exit }
	' "$ROOT/proc/devices" 2>/dev/null
}

# The device nodes the contract asks for, one "<path> <major> <minor>" line each; a "?"
# major when nvidia-uvm's is not in /proc/devices.
expected_nodes() {
	printf '/dev/nvidiactl %s 255\n' "$NVIDIA_MAJOR"
	for nodes_minor in $(gpu_minors); do
		printf '/dev/nvidia%s %s %s\n' "$nodes_minor" "$NVIDIA_MAJOR" "$nodes_minor"
	done
	printf '/dev/nvidia-modeset %s 254\n' "$NVIDIA_MAJOR"
	nodes_uvm=$(char_major nvidia-uvm)
	printf '/dev/nvidia-uvm %s 0\n' "${nodes_uvm:-?}"
	printf '/dev/nvidia-uvm-tools %s 1\n' "${nodes_uvm:-?}"
}

# node_is PATH MAJOR MINOR: the path is a character device with these numbers.
node_is() {
	[ -c "$ROOT$1" ] || return 1
	node_numbers=$(stat -c '%t %T' "$ROOT$1" 2>/dev/null) || return 1
	[ "$node_numbers" = "$(printf '%x %x' "$2" "$3")" ]
}

# exists_on_node PATH: PATH exists on the node; absolute links resolve inside $ROOT.
exists_on_node() {
	eon_path=$ROOT$1
	eon_hops=0
	while [ -L "$eon_path" ] && [ "$eon_hops" -lt 16 ]; do
		eon_target=$(readlink "$eon_path")
		case $eon_target in
		/*) eon_path=$ROOT$eon_target ;;
		*) eon_path=$(dirname "$eon_path")/$eon_target ;;
		esac
		eon_hops=$((eon_hops + 1))
	done
	[ -e "$eon_path" ]
}

# The kernel releases a bundle or installation carries modules for.
kernel_releases_in() {
	for kr_dir in "$1"/modules/*/; do
		[ -d "$kr_dir" ] || continue
		kr_dir=${kr_dir%/}
		printf '%s ' "${kr_dir##*/}"
	done
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

# installed_folder NAME: NAME is an installed driver folder of $OPT (a plain name, a folder,
# with its node/bundle.env).
installed_folder() {
	case $1 in "" | */* | . | ..) return 1 ;; esac
	[ -d "$ROOT$OPT/$1" ] && [ ! -L "$ROOT$OPT/$1" ] && [ -f "$ROOT$OPT/$1/node/bundle.env" ]
}

# link_of PATH: the target of the link PATH ("" when PATH is not a link); fails when PATH is
# a link that cannot be read: a "" then would read as "no link" and lose what it names.
link_of() {
	[ -L "$1" ] || return 0
	lo_target=$(readlink "$1") && [ -n "$lo_target" ] || return 1
	printf '%s' "$lo_target"
}

# run_ldconfig: refresh the ld.so cache of the node (or of the tree under $ROOT).
run_ldconfig() {
	if [ -n "$ROOT" ]; then
		act ldconfig -r "$ROOT"
	else
		act ldconfig
	fi
}

# current_problem: why $OPT/current cannot be booted from, in a few words ("" when it can, or
# when there is no `current` at all). It must be a link to an installed driver folder of
# $OPT whose startup.sh can run: a hand-made link, a folder, or a folder half removed is not.
current_problem() {
	cp_link=$ROOT$OPT/current
	[ -e "$cp_link" ] || [ -L "$cp_link" ] || return 0
	if [ ! -L "$cp_link" ]; then
		printf '%s is not a link to a driver folder' "$OPT/current"
		return 0
	fi
	cp_name=$(readlink "$cp_link")
	if ! installed_folder "$cp_name"; then
		if [ -e "$cp_link" ]; then
			printf '%s points at %s, not a driver folder of %s' "$OPT/current" "$cp_name" "$OPT"
		else
			printf '%s points at %s, which is not there' "$OPT/current" "$cp_name"
		fi
	elif ! bootable "$cp_name"; then
		printf '%s points at %s, which lacks its startup.sh or node/lib.sh' "$OPT/current" "$cp_name"
	fi
}

# bootable NAME: NAME is an installed driver folder whose startup.sh can run.
bootable() {
	installed_folder "$1" && [ -x "$ROOT$OPT/$1/startup.sh" ] && [ -r "$ROOT$OPT/$1/node/lib.sh" ]
}

# switch_current NAME: point $OPT/current at the driver folder NAME in one rename. `previous`
# names the driver before the last switch: kept for a rollback, and set before the switch
# so that a run stopped after it keeps the same one. Only an installed folder becomes
# `previous`: a dangling or foreign `current` (an old tool's, a hand-made link) leaves the
# `previous` there was.
switch_current() {
	sc_was=$(link_of "$ROOT$OPT/current") || return 1
	if [ -n "$sc_was" ] && [ "$sc_was" != "$1" ]; then
		if installed_folder "$sc_was"; then
			replace_link "$sc_was" "$ROOT$OPT/previous" || return 1
		else
			warn "$OPT/current pointed at $sc_was, not an installed driver folder: $OPT/previous stays as it was"
		fi
	fi
	replace_link "$1" "$ROOT$OPT/current" || return 1
	[ "$sc_was" = "$1" ] || [ "${DRY:-0}" = 1 ] || say "$OPT/current is now $1${sc_was:+ (was $sc_was)}"
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

# --- staged drivers and what a node keeps ---------------------------------------------------
# $OPT/staged lists the driver folders installed beside `current` for a kernel the node has
# not booted yet (an OS update waiting for its reboot, or a fetch at boot just before the
# switch), one "<folder> <OS release or ->" line each.
STAGED=$OPT/staged

# record_staged NAME RELEASE: add (or replace) NAME's line, in one rename.
record_staged() {
	rs_file=$ROOT$STAGED
	{
		[ ! -f "$rs_file" ] || awk -v n="$1" '$1 != n' "$rs_file"
		printf '%s %s\n' "$1" "${2:--}"
	} >"$rs_file.tmp.$$" && mv -f "$rs_file.tmp.$$" "$rs_file"
}

# staged_for RELEASE: the staged folder recorded for that OS release, if it is still there.
staged_for() {
	[ -f "$ROOT$STAGED" ] || return 0
	awk -v r="$1" '$2 == r { print $1 }' "$ROOT$STAGED" | while read -r sf_name; do
		[ -f "$ROOT$OPT/$sf_name/node/bundle.env" ] && { printf '%s\n' "$sf_name"; break; }
	done
}

# installed_for KERNEL: an installed folder of this DRIVER_VERSION and FLAVOUR with modules
# for KERNEL (current's first), if any.
installed_for() {
	for if_dir in "$ROOT$OPT/current" "$ROOT$OPT"/*/; do
		if_dir=${if_dir%/}
		[ -d "$if_dir/modules/$1" ] && [ -r "$if_dir/node/bundle.env" ] || continue
		[ "$(bundle_value DRIVER_VERSION "$if_dir/node/bundle.env")" = "$DRIVER_VERSION" ] &&
			[ "$(bundle_value FLAVOUR "$if_dir/node/bundle.env")" = "$FLAVOUR" ] || continue
		if_dir=$(readlink -f "$if_dir")
		printf '%s\n' "${if_dir##*/}"
		return 0
	done
}

# drop_unbootable: remove the driver folders no boot of this node can want any more. Kept:
# `current` (the running kernel's), `previous` (the release before: Flatcar falls back to
# its USR partition when a boot fails) and the staged ones (the update waiting for its
# reboot). Staged lines for folders now in use, or gone, are dropped. Call it under the lock.
drop_unbootable() {
	du_current=$(link_of "$ROOT$OPT/current") && du_previous=$(link_of "$ROOT$OPT/previous") ||
		return 1
	du_keep=" $du_current $du_previous "
	if [ -f "$ROOT$STAGED" ]; then
		du_lines=$(while read -r du_name du_release; do
			[ "$du_name" != "$du_current" ] && [ -d "$ROOT$OPT/$du_name" ] &&
				printf '%s %s\n' "$du_name" "$du_release"
		done <"$ROOT$STAGED")
		du_keep="$du_keep$(printf '%s\n' "$du_lines" | cut -d' ' -f1 | tr '\n' ' ')"
		if [ "${DRY:-0}" = 1 ]; then
			:
		elif [ -n "$du_lines" ]; then
			printf '%s\n' "$du_lines" >"$ROOT$STAGED.tmp.$$" && mv -f "$ROOT$STAGED.tmp.$$" "$ROOT$STAGED" || return 1
		else
			rm -f "$ROOT$STAGED" || return 1
		fi
	fi
	for du_dir in "$ROOT$OPT"/*/; do
		du_dir=${du_dir%/}
		du_name=${du_dir##*/}
		case $du_keep in *" $du_name "*) continue ;; esac
		[ -L "$du_dir" ] || [ ! -f "$du_dir/node/bundle.env" ] && continue
		# Out of sight first (one rename), then removed: a stop midway leaves no partial
		# driver folder under a real name, only a .gone.* that the next run clears.
		if act mv -T "$du_dir" "$ROOT$OPT/.gone.$du_name.$$" && act rm -rf "$ROOT$OPT/.gone.$du_name.$$"; then
			[ "${DRY:-0}" = 1 ] || say "removed $OPT/$du_name: not the running, the previous or a staged driver"
		fi
	done
}

# repository_url FOLDER: the bundle repository the driver in FOLDER fetches from, "" when it
# has none: the bundle's REPOSITORY_URL, or NVIDIA_REPOSITORY_URL from the environment or
# /etc/default/nvidia (a mirror; "none" turns fetching off). Only with the bundle's key.
repository_url() {
	if [ -n "${NVIDIA_REPOSITORY_URL+set}" ]; then
		ru_url=$NVIDIA_REPOSITORY_URL
	elif [ -f "$ROOT/etc/default/nvidia" ] &&  # a regular file: a FIFO would hang the boot
		grep -q '^NVIDIA_REPOSITORY_URL=' "$ROOT/etc/default/nvidia" 2>/dev/null; then
		ru_url=$(sed -n 's/^NVIDIA_REPOSITORY_URL=//p' "$ROOT/etc/default/nvidia" | tail -n 1 |
			sed "s/^\"\\(.*\\)\"\$/\\1/; s/^'\\(.*\\)'\$/\\1/")
	else
		ru_url=$(bundle_value REPOSITORY_URL "$1/node/bundle.env")
	fi
	[ "$ru_url" != none ] && [ -r "$1/node/repository.pub" ] || return 0
	printf '%s' "${ru_url%/}"
}

# pending_release: NEW_VERSION when update-engine has an update waiting for its reboot.
pending_release() {
	command -v update_engine_client >/dev/null 2>&1 || return 0
	update_engine_client -status 2>/dev/null | awk -F= '
		$1 == "CURRENT_OP" { op = $2 } $1 == "NEW_VERSION" { v = $2 }
		END { if (op == "UPDATE_STATUS_UPDATED_NEED_REBOOT" && v ~ /^[0-9]+\.[0-9]+\.[0-9]+/ && v != "0.0.0") print v }'
}

# check_lock_file FILE: die 1 with one line when FILE cannot be opened to append. Tried in a
# subshell first: a failed `exec 9>>FILE` ends a POSIX shell at once (a redirection error of
# a special builtin), before any `|| die` runs, with only the shell's own words.
check_lock_file() {
	(: >>"$1") 2>/dev/null ||
		die 1 "cannot open the lock file $1 (a read-only file system, or something else in its place); make $(dirname "$1") writable and run me again"
}

# lock_install CODE: the install lock (install_nvidia.sh's), for the few changes startup.sh
# and fetch.sh make to $OPT themselves; fd 9 holds it until the caller closes it
# (exec 9<&-). Exit CODE after two minutes.
lock_install() {
	check_lock_file "$ROOT$OPT/.lock"
	exec 9>>"$ROOT$OPT/.lock"
	flock -w 120 9 ||
		die "$1" "another install_nvidia.sh holds $ROOT$OPT/.lock; run me again when it is done"
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
	# shellcheck disable=SC2015 # a busy lock: leave it to the fetch that holds it
	(exec 8>>"$ROOT$OPT/.fetch.lock" && flock -n 8 || exit 0
	for cl_left in "$ROOT$OPT"/.fetch.*; do
		[ "$cl_left" = "$ROOT$OPT/.fetch.lock" ] || ! [ -e "$cl_left" ] || act rm -rf "$cl_left"
	done)
}

# --- CDI: the spec container runtimes read ----------------------------------------------------
# The Container Device Interface (github.com/cncf-tags/container-device-interface, SPEC.md) is
# how containerd (1.7 with enable_cdi, on by default from 2.0), CRI-O, Podman (4.1 on) and
# Docker (25 on) hand devices to containers (`--device nvidia.com/gpu=all`). They read specs
# from /etc/cdi and /var/run/cdi; startup.sh writes this one at each driver load into /run/cdi
# (/var/run links to /run on Flatcar and CoreOS, as on every systemd OS), a tmpfs, so it goes
# with the boot. Named as CDI's GenerateSpecName names a vendor's class.
# cdiVersion 0.5.0 is the lowest with all it uses: device names that begin with a digit (the
# index ones) came in 0.5.0 (a runtime refuses a spec that uses what is newer than its
# cdiVersion), and Podman 4.3 (CDI 0.5) refuses cdiVersion 0.6.0.
CDI_VERSION=0.5.0
CDI_KIND=nvidia.com/gpu
CDI_SPEC=/run/cdi/nvidia.com-gpu.json
# Where a container finds the driver. No environment edit: CDI's env entries replace the
# variable (runtime-tools' AddMultipleProcessEnv), after the image's and the user's, so an
# LD_LIBRARY_PATH or PATH of ours would wipe the image's own. No ldconfig hook: it runs a host
# binary as root on the container's root file system (nvidia-ctk's update-ldcache, in Go) and
# needs the OCI state's JSON read; nothing for musl images, and a read-only root fails it.
# Instead the driver's lib64 and bin go where Mesos's GPU isolator and nvidia-docker 1 put
# them, /usr/local/nvidia/{lib64,bin}, which NVIDIA's CUDA images (and every image built on
# them) name in LD_LIBRARY_PATH and PATH; each tool also at /usr/bin, on every image's PATH.
# Other images add LD_LIBRARY_PATH=/usr/local/nvidia/lib64 themselves (docs/reference/node.md, "CDI").
CDI_LIBS=/usr/local/nvidia/lib64
CDI_BINS=/usr/local/nvidia/bin
CDI_SOCKET=/var/run/nvidia-persistenced/socket
CDI_MOUNT_OPTIONS='["ro", "nosuid", "nodev", "bind"]'

# gpu_table: "<minor> <uuid>" for each GPU the driver lists, by minor. The uuid is "-" where
# the driver gives none (its information file leaves the line out when it cannot read it),
# one that is no CDI device name, or one another GPU has already.
gpu_table() {
	set --
	for gt_info in "$ROOT"/proc/driver/nvidia/gpus/*/information; do
		[ -r "$gt_info" ] && set -- "$@" "$gt_info"
	done
	[ $# -gt 0 ] || return 0
	awk -F: '
		function flush() {
			gsub(/[ \t\r]/, "", minor)
			gsub(/[ \t\r]/, "", uuid)
			if (uuid !~ /^GPU-[0-9A-Za-z-]+$/ || uuid in seen) uuid = "-"
			seen[uuid] = 1
			if (minor ~ /^[0-9]+$/) print minor, uuid
			minor = ""
			uuid = ""
		}
		FNR == 1 && NR > 1 { flush() }
		$1 == "Device Minor" { minor = $2 }
		$1 == "GPU UUID" { uuid = $2 }
		END { flush() }' "$@" | sort -n
}

# cdi_names TABLE: the spec's device names for a gpu_table, in the spec's order: each GPU's
# index (its minor, as /dev/nvidia<N>) and UUID, then "all"; nothing for no GPU.
cdi_names() {
	[ -n "$1" ] || return 0
	printf '%s\n' "$1" | awk '{ print $1; if ($2 != "-") print $2 } END { print "all" }'
}

# cdi_spec_names FILE: the device names the spec FILE lists (one device a line, as
# cdi_spec writes it).
cdi_spec_names() {
	sed -n 's/^    {"name": "\([^"]*\)".*/\1/p' "$1" 2>/dev/null
}

# cdi_string S: S as a JSON string; json_string's fork only for what is not a plain path.
cdi_string() {
	case $1 in
	*[!A-Za-z0-9/._-]*) json_string "$1" ;;
	*) printf '"%s"' "$1" ;;
	esac
}

# cdi_node PATH: a device node, at the same path on the node (no hostPath) and with no type
# or numbers: the runtime reads them from the node itself when it starts a container.
cdi_node() {
	printf '{"path": '
	cdi_string "$1"
	printf '}'
}

# cdi_mount HOST CONTAINER: a read-only bind mount.
cdi_mount() {
	printf '      {"hostPath": '
	cdi_string "$1"
	printf ', "containerPath": '
	cdi_string "$2"
	printf ', "options": %s}' "$CDI_MOUNT_OPTIONS"
}

# cdi_spec FOLDER [TABLE]: the spec for the GPUs of TABLE (gpu_table's) and the driver in
# FOLDER. Every path is the node's, $ROOT left out, as startup.sh's firmware path: a tree
# prepared with --root gets the spec of the node it becomes, and the same bytes whatever
# folder it sits in.
cdi_spec() {
	cs_table=${2-$(gpu_table)}
	printf '{\n  "cdiVersion": "%s",\n  "kind": "%s",\n  "devices": [\n' "$CDI_VERSION" "$CDI_KIND"
	while read -r cs_minor cs_uuid; do
		[ -n "$cs_minor" ] || continue
		for cs_name in "$cs_minor" "$cs_uuid"; do
			[ "$cs_name" != - ] || continue
			printf '    {"name": "%s", "containerEdits": {"deviceNodes": [' "$cs_name"
			cdi_node "/dev/nvidia$cs_minor"
			printf ']}},\n'
		done
	done <<EOT
$cs_table
EOT
	printf '    {"name": "all", "containerEdits": {"deviceNodes": ['
	cs_sep=
	for cs_minor in $(printf '%s\n' "$cs_table" | cut -d' ' -f1); do
		printf '%s' "$cs_sep"
		cdi_node "/dev/nvidia$cs_minor"
		cs_sep=", "
	done
	printf ']}}\n  ],\n  "containerEdits": {\n    "deviceNodes": ['
	# What every GPU needs: nvidiactl, uvm, uvm-tools, modeset (expected_nodes' others) and
	# the MIG capabilities nvidia-modprobe makes in /dev/nvidia-caps, each where present.
	cs_sep=
	for cs_path in $(expected_nodes | cut -d' ' -f1) "$ROOT"/dev/nvidia-caps/*; do
		cs_path=${cs_path#"$ROOT"}
		case $cs_path in /dev/nvidia[0-9]*) continue ;; esac
		[ -c "$ROOT$cs_path" ] || continue
		printf '%s' "$cs_sep"
		cdi_node "$cs_path"
		cs_sep=", "
	done
	printf '],\n    "mounts": [\n'
	cs_sep=
	for cs_pair in "lib64 $CDI_LIBS" "bin $CDI_BINS"; do
		[ -d "$1/${cs_pair%% *}" ] || continue
		printf '%s' "$cs_sep"
		cdi_mount "${1#"$ROOT"}/${cs_pair%% *}" "${cs_pair#* }"
		cs_sep=",
"
	done
	for cs_tool in $MESOS_TOOLS; do
		[ -f "$1/bin/$cs_tool" ] && [ -x "$1/bin/$cs_tool" ] || continue
		printf '%s' "$cs_sep"
		cdi_mount "${1#"$ROOT"}/bin/$cs_tool" "/usr/bin/$cs_tool"
		cs_sep=",
"
	done
	if [ -S "$ROOT$CDI_SOCKET" ]; then
		printf '%s' "$cs_sep"
		cdi_mount "$CDI_SOCKET" "$CDI_SOCKET"
	fi
	printf '\n    ]\n  }\n}\n'
}

# write_cdi_spec FOLDER: write the spec for the GPUs the driver lists and the driver in FOLDER
# (the resolved /opt/nvidia/<name>, not `current`: a later install that flips `current` must
# not change the libraries of a running container), 0644, in one rename from a temporary file
# beside it whose name a runtime skips (not *.json); with no GPU, remove it. A temporary
# file a killed run left goes first.
write_cdi_spec() {
	wc_table=$(gpu_table)
	wc_spec=$ROOT$CDI_SPEC
	for wc_left in "${wc_spec%/*}/.${wc_spec##*/}".tmp.*; do
		[ ! -e "$wc_left" ] || act rm -f "$wc_left"
	done
	if [ -z "$wc_table" ]; then
		[ -e "$wc_spec" ] || [ -L "$wc_spec" ] || return 0
		act rm -f "$wc_spec" || return 1
		[ "${DRY:-0}" = 1 ] || say "removed $CDI_SPEC: the driver lists no GPU"
		return 0
	fi
	# "nvidia.com/gpu=0 1 (and by UUID), all": the line stays short on a host of 8 GPUs.
	wc_names="$CDI_KIND=$(printf '%s\n' "$wc_table" | cut -d' ' -f1 | tr '\n' ' ')(and by UUID), all"
	if [ "${DRY:-0}" = 1 ]; then
		cdi_spec "$1" "$wc_table" | cmp -s - "$wc_spec" || say "would write $CDI_SPEC: $wc_names"
		return 0
	fi
	wc_tmp=${wc_spec%/*}/.${wc_spec##*/}.tmp.$$
	mkdir -p "${wc_spec%/*}" && cdi_spec "$1" "$wc_table" >"$wc_tmp" && chmod 0644 "$wc_tmp" &&
		mv -f "$wc_tmp" "$wc_spec" || {
		rm -f "$wc_tmp" 2>/dev/null
		return 1
	}
	say "wrote $CDI_SPEC: $wc_names"
}
