# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# GPUs on PCI, the driver's view of them, and their device nodes (lib.sh's theme).
# Copied in by the build (node.py inline_sources) at its line in lib.sh;
# never run or sourced by itself.

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
