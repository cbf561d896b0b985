# shellcheck shell=sh
# shellcheck disable=SC2034,SC2015 # variables for the script it is copied into; "A && B || C" means C when either fails
# The CDI spec container runtimes read (lib.sh's theme).
# Copied in by the build (node.py inline_sources) at its line in lib.sh;
# never run or sourced by itself.

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
