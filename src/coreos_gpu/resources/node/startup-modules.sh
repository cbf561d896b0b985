# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# startup.sh: loading the driver's modules for the running kernel (insmod, their kernel
# dependencies by modprobe, their options from modprobe.d), each failure as startup.sh's
# exit code and one line.
# Copied in by the build (node.py inline_sources) at its line in startup.sh;
# never run or sourced by itself.

# Kernel modules each of ours needs, found by `modinfo -F depends` at build time.
depends_of() {
	awk -v k="$KERNEL" -v m="$1" '$1 == k && $2 == m && $3 != "-" { gsub(",", " ", $3); print $3 }' \
		"$HERE/node/module-deps" 2>/dev/null
}

# The kernel's reason, from insmod's message, as our exit code and one line.
load_failed() {
	lf_name=$1
	lf_error=$2
	lf_kernel=
	[ -n "$ROOT" ] || lf_kernel=$(dmesg 2>/dev/null | grep -E 'NVRM|nvidia' | tail -n 2 | tr '\n' ' ')
	case $lf_error in
	*"Invalid module format"* | *"Exec format error"*)
		die "$STARTUP_KERNEL_REFUSED" "kernel mismatch: the running kernel $KERNEL refused $lf_name.ko from $MODULES as built for another kernel (Invalid module format) ${lf_kernel}; build a bundle for kernel $KERNEL and install it" ;;
	*"No such device"*)
		die "$STARTUP_NO_GPU" "the kernel accepted $lf_name.ko, but the driver found no usable NVIDIA GPU (No such device) ${lf_kernel}; check that the GPU is supported by driver $DRIVER_VERSION and the ${FLAVOUR:-proprietary} modules" ;;
	# A signed module whose key the kernel does not trust: EKEYREJECTED where signatures are
	# enforced, EPERM from lockdown (kernel/module/signing.c).
	*"Key was rejected by service"*)
		die "$STARTUP_KERNEL_REFUSED" "the kernel refused the signature of $lf_name.ko from $MODULES ($lf_error) ${lf_kernel}: it loads only modules signed with a key it trusts; $LOCKDOWN_CHOICES" ;;
	*"Operation not permitted"*)
		[ -z "$LOCKDOWN" ] ||
			die "$STARTUP_KERNEL_REFUSED" "the kernel ($LOCKDOWN) refused $lf_name.ko from $MODULES ($lf_error) ${lf_kernel}: it loads only modules signed with a key it trusts; $LOCKDOWN_CHOICES"
		die "$STARTUP_LOAD_FAILED" "insmod $MODULES/$lf_name.ko failed: $lf_error ${lf_kernel}${MISSING_DEPS:+; these kernel modules it needs could not be loaded: $MISSING_DEPS}" ;;
	*)
		die "$STARTUP_LOAD_FAILED" "insmod $MODULES/$lf_name.ko failed: $lf_error ${lf_kernel}${MISSING_DEPS:+; these kernel modules it needs could not be loaded: $MISSING_DEPS}" ;;
	esac
}

# insmod reads no modprobe.d: each module's options (options nvidia NVreg_…=…, options
# nvidia-drm modeset=1) come from modprobe's own view of its configuration, read once.
if [ -n "$ROOT" ]; then
	OPTIONS=$(modprobe -c -C "$ROOT/etc/modprobe.d" 2>/dev/null | grep '^options ')
else
	OPTIONS=$(modprobe -c 2>/dev/null | grep '^options ')
fi
options_of() {
	printf '%s\n' "$OPTIONS" | awk -v m="$(printf '%s' "$1" | tr - _)" '
		{ name = $2; gsub("-", "_", name) }
		name == m { for (i = 3; i <= NF; i++) printf "%s%s", (found++ ? " " : ""), $i }'
}

# IPMI lets the driver talk to the board's management controller; absent on many kernels.
for dep in ipmi_msghandler ipmi_devintf; do
	module_loaded "$dep" || act modprobe -q "$dep" 2>/dev/null || true
done
for name in $WANTED; do
	[ -r "$MODULES/$name.ko" ] || die "$STARTUP_INCOMPLETE" "$MODULES/$name.ko is missing: the installation is incomplete; run install_nvidia.sh again"
	if module_loaded "$name"; then
		say "$name is loaded already"
		continue
	fi
	for dep in $(depends_of "$name"); do
		# Ours (nvidia-modeset needs nvidia) come in LOAD_ORDER; the kernel's by modprobe.
		[ -e "$MODULES/$(printf '%s' "$dep" | tr _ -).ko" ] && continue
		module_loaded "$dep" && continue
		# Go on without it: insmod then says what is wrong. A module built for another
		# kernel gets "Invalid module format" (a kernel mismatch, not a missing dependency),
		# one that needs the dependency "Unknown symbol".
		act modprobe "$dep" 2>/dev/null || {
			warn "cannot load the kernel module $dep, which $name needs (modprobe $dep failed)"
			MISSING_DEPS="${MISSING_DEPS:-}${MISSING_DEPS:+, }$dep"
		}
	done
	OPTS=$(options_of "$name")
	if [ "$DRY" = 1 ]; then
		say "would run: insmod $MODULES/$name.ko${OPTS:+ $OPTS}"
		continue
	fi
	# /lib/modules is read-only on these OSes: insmod by full path, not modprobe. The
	# options are split into words as modprobe would pass them (insmod joins them again;
	# the kernel reads quotes in them), with globbing off.
	# shellcheck disable=SC2086
	if ! ERROR=$(set -f; insmod "$MODULES/$name.ko" $OPTS 2>&1); then
		case $ERROR in
		*"File exists"*) say "$name was loaded meanwhile" ;;
		*) load_failed "$name" "$ERROR" ;;
		esac
	fi
	say "loaded $name${OPTS:+ ($OPTS)}"
done
