# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# nvidia-doctor's checks 7 to 10: what runs on the driver (cgroups, nvidia-smi,
# persistence, CDI) and what the node boots next (the repository, an OS update).
# Copied in by the build (node.py inline_sources) at its line in nvidia-doctor;
# never run or sourced by itself.

# --- 7. cgroup v1 devices hierarchy, and what this OS release can boot ----------------------------
# Released Mesos (1.11, the last; DC/OS's) isolates GPUs through the cgroup v1 `devices`
# controller; only unreleased Mesos master controls devices on cgroup v2. Flatcar boots cgroup
# v2 by default since 2969.0.0; the flatcar-postinst of 4187 and later refuses to update a
# node that is not on cgroup v2 alone (flatcar/update_engine), and from 4230 on (systemd 256)
# Flatcar cannot boot cgroup v1 at all. LTS 4081 (systemd 255) is the last line that boots
# cgroup v1 and still gets updates. The argument is the one Flatcar's own postinst writes.
V1_ARGS="systemd.unified_cgroup_hierarchy=0 systemd.legacy_systemd_cgroup_controller"
MESOS="released Mesos (1.11, DC/OS's) cannot isolate GPUs"
V2_MESOS="a Mesos built with cgroup v2 device control (unreleased Mesos master) or another orchestrator (through CDI)"
OS_ID=$(os_release ID)
OS_VERSION=$(os_release VERSION_ID)
# v1: this release boots cgroup v1 and gets updates; blocked: it boots v1, but no update
# follows on v1; gone: it cannot boot v1; "": not Flatcar or CoreOS, or no release to read.
case $OS_ID:${OS_VERSION%%.*} in
coreos:*) CGROUP_LINE=v1 ;;
flatcar: | flatcar:*[!0-9]*) CGROUP_LINE= ;;
flatcar:*)
	if [ "${OS_VERSION%%.*}" -ge 4230 ]; then
		CGROUP_LINE=gone
	elif [ "${OS_VERSION%%.*}" -ge 4187 ]; then
		CGROUP_LINE=blocked
	else
		CGROUP_LINE=v1
	fi ;;
*) CGROUP_LINE= ;;
esac
case $OS_ID in flatcar) OS_NAME="Flatcar $OS_VERSION" ;; *) OS_NAME="CoreOS $OS_VERSION" ;; esac
DEVICES_CGROUP=$(awk '$3 == "cgroup" && $4 ~ /(^|,)devices(,|$)/ { print $2; exit }' "$ROOT/proc/mounts" 2>/dev/null)
if [ -n "$DEVICES_CGROUP" ] && [ "$OS_ID" = flatcar ]; then
	report cgroups PASS "cgroup v1 devices hierarchy at $DEVICES_CGROUP ($OS_NAME); on cgroup v1 Flatcar's updates stop below 4187 (flatcar-postinst refuses later ones): the LTS channel's 4081 line is the last that boots cgroup v1"
elif [ -n "$DEVICES_CGROUP" ]; then
	report cgroups PASS "cgroup v1 devices hierarchy at $DEVICES_CGROUP"
elif [ "$CGROUP_LINE" = v1 ]; then
	V1_FIX="add the kernel arguments $V1_ARGS and reboot (a line set linux_append=\"\$linux_append $V1_ARGS\" in the OEM partition's grub.cfg)"
	[ "$OS_ID" = coreos ] ||
		V1_FIX="$V1_FIX; on cgroup v1 Flatcar's updates stop below 4187 (flatcar-postinst refuses later ones): follow the LTS channel, whose 4081 line boots cgroup v1 and gets updates"
	report cgroups FAIL "no cgroup v1 devices hierarchy is mounted (cgroup v2 only): $MESOS; $OS_NAME can boot cgroup v1" "$V1_FIX"
elif [ "$CGROUP_LINE" = blocked ]; then
	report cgroups FAIL "no cgroup v1 devices hierarchy is mounted (cgroup v2 only): $MESOS; $OS_NAME still boots cgroup v1, but the flatcar-postinst of every later release refuses to update a cgroup v1 node, and from 4230 on Flatcar cannot boot cgroup v1" \
		"the choice: cgroup v1 here (kernel arguments $V1_ARGS) and no more OS updates for this node; or reprovision it from Flatcar's LTS channel (4081: cgroup v1, with updates); or keep cgroup v2 with $V2_MESOS"
elif [ "$CGROUP_LINE" = gone ]; then
	report cgroups FAIL "no cgroup v1 devices hierarchy is mounted (cgroup v2 only): $MESOS, and $OS_NAME (systemd 256 or later) cannot boot cgroup v1" \
		"run $V2_MESOS; or reprovision the node from Flatcar's LTS channel (4081, systemd 255: the last line that boots cgroup v1)"
else
	report cgroups FAIL "no cgroup v1 devices hierarchy is mounted (cgroup v2 only): $MESOS" \
		"boot cgroup v1 where the OS still can (systemd 255 or older; Flatcar below 4230): kernel arguments $V1_ARGS; or run $V2_MESOS"
fi

# --- 8. nvidia-smi answers ------------------------------------------------------------------------
if SMI=$(nvidia-smi -L 2>&1); then
	report nvidia-smi PASS "$(printf '%s\n' "$SMI" | grep -c '^GPU ') GPU(s): $(printf '%s\n' "$SMI" | head -n 1)"
else
	report nvidia-smi FAIL "nvidia-smi -L failed: $(printf '%s' "$SMI" | tail -n 2 | tr '\n' ' ')" \
		"journalctl -u nvidia.service; the checks above say what is missing"
fi

# --- 8b. the GPUs stay initialised between jobs: the bundle's persistence setting ------------------
# daemon: nvidia-persistenced.service; legacy: startup.sh's nvidia-smi -pm 1, which
# NVIDIA_PERSISTENCE_MODE=1 in /etc/default/nvidia also asks for; a bundle from before the
# setting has none: off.
PERSISTENCE=$(bundle_value PERSISTENCE "$INSTALLED/node/bundle.env")
PM_WHY="bundle setting"
PM_ASKED=
if [ -f "$ROOT/etc/default/nvidia" ]; then  # a regular file: a FIFO would hang the doctor
	PM_ASKED=$(sed -n 's/^NVIDIA_PERSISTENCE_MODE=//p' "$ROOT/etc/default/nvidia" | tail -n 1 | tr -d "\"'")
fi
case $PERSISTENCE in
daemon | legacy) ;;
*)
	PERSISTENCE=off
	[ "$PM_ASKED" != 1 ] || { PERSISTENCE=legacy; PM_WHY="NVIDIA_PERSISTENCE_MODE=1 in /etc/default/nvidia"; } ;;
esac
PM_SOCKET=/var/run/nvidia-persistenced/socket
if [ "$PERSISTENCE" = off ]; then
	report persistence PASS "off ($PM_WHY)"
elif ! module_loaded nvidia; then
	report persistence FAIL "$PERSISTENCE ($PM_WHY): the nvidia module is not loaded, so persistence cannot be checked" \
		"systemctl restart nvidia.service"
elif [ "$PERSISTENCE" = daemon ]; then
	PM_STATE=$(unit_property nvidia-persistenced.service ActiveState)
	if [ "$PM_STATE" != active ]; then
		report persistence FAIL "daemon ($PM_WHY): nvidia-persistenced.service is ${PM_STATE:-not known to systemd}, so the driver tears each GPU down between jobs" \
			"systemctl status nvidia-persistenced.service says why; then systemctl start nvidia-persistenced.service"
	elif [ ! -S "$ROOT$PM_SOCKET" ]; then
		report persistence FAIL "daemon ($PM_WHY): nvidia-persistenced.service is active, but its socket $PM_SOCKET is missing" \
			"systemctl restart nvidia-persistenced.service; systemctl status nvidia-persistenced.service says why it does not listen"
	else
		report persistence PASS "daemon ($PM_WHY): nvidia-persistenced.service is active, its socket is $PM_SOCKET"
	fi
elif PM_QUERY=$(nvidia-smi -q 2>&1); then
	# "    Persistence Mode                      : Enabled", once per GPU.
	PM_COUNT=$(printf '%s\n' "$PM_QUERY" | awk -F: '
		$1 ~ /^[ \t]*Persistence Mode[ \t]*$/ { n++; v = $2; gsub(/[ \t\r]/, "", v); if (v != "Enabled") off++ }
		END { print n + 0, off + 0 }')
	PM_GPUS=${PM_COUNT% *}
	PM_OFF=${PM_COUNT#* }
	if [ "$PM_GPUS" -gt 0 ] && [ "$PM_OFF" = 0 ]; then
		report persistence PASS "legacy ($PM_WHY): persistence mode is Enabled on $PM_GPUS GPU(s) (nvidia-smi -q)"
	else
		PM_DETAIL="persistence mode is not Enabled on $PM_OFF of $PM_GPUS GPU(s) (nvidia-smi -q)"
		[ "$PM_GPUS" -gt 0 ] || PM_DETAIL="nvidia-smi -q shows no GPU's Persistence Mode"
		report persistence FAIL "legacy ($PM_WHY): $PM_DETAIL" \
			"nvidia-smi -pm 1; startup.sh runs it at every boot, and journalctl -u nvidia.service says why it did not take"
	fi
else
	report persistence FAIL "legacy ($PM_WHY): nvidia-smi -q failed: $(printf '%s' "$PM_QUERY" | tail -n 2 | tr '\n' ' ')" \
		"journalctl -u nvidia.service; the checks above say what is missing"
fi

# --- 8c. the CDI spec container runtimes read (startup.sh writes it at each driver load) ------------
# One read of the driver's GPUs: the spec's names and the PASS line's minors come from it.
CDI_TABLE=$(gpu_table)
CDI_WANT=$(cdi_names "$CDI_TABLE" | tr '\n' ' ')
CDI_HAVE=$(cdi_spec_names "$ROOT$CDI_SPEC" | tr '\n' ' ')
CDI_MINORS=$(printf '%s\n' "$CDI_TABLE" | cut -d' ' -f1 | tr '\n' ' ')
if ! module_loaded nvidia; then
	report cdi FAIL "the nvidia module is not loaded, so no CDI spec ($CDI_SPEC) can name its GPUs" \
		"systemctl restart nvidia.service"
elif [ -z "$CDI_WANT" ] && [ ! -e "$ROOT$CDI_SPEC" ]; then
	report cdi PASS "the driver lists no GPU, and there is no CDI spec ($CDI_SPEC)"
elif [ ! -f "$ROOT$CDI_SPEC" ]; then
	report cdi FAIL "$CDI_SPEC is missing: containerd, CRI-O, Podman and Docker cannot hand this node's GPUs to containers" \
		"systemctl restart nvidia.service (startup.sh writes it)"
elif [ "$CDI_HAVE" != "$CDI_WANT" ]; then
	report cdi FAIL "$CDI_SPEC lists $CDI_KIND=${CDI_HAVE% }, but the driver lists ${CDI_WANT:+$CDI_KIND=}${CDI_WANT:-no GPU}" \
		"systemctl restart nvidia.service (startup.sh writes it again)"
else
	report cdi PASS "$CDI_SPEC: $(printf '%s' "$CDI_HAVE" | wc -w | tr -d ' ') devices for the $(printf '%s' "$CDI_MINORS" | wc -w | tr -d ' ') GPU(s) the driver lists ($CDI_KIND=${CDI_MINORS}by index and UUID, and all)"
fi

# --- 9. the bundle repository (a bundle built with --repository) ---------------------------------
REPOSITORY=
[ ! -d "$INSTALLED" ] || REPOSITORY=$(repository_url "$INSTALLED")
if [ -n "$REPOSITORY" ]; then
	set --
	[ -z "$ROOT" ] || set -- --root "$ROOT"
	if INDEX=$(NVIDIA_FETCH_TIMEOUT=${NVIDIA_FETCH_TIMEOUT:-100} "$INSTALLED/node/fetch.sh" "$@" --index 2>&1); then
		report repository PASS "$REPOSITORY: $(printf '%s\n' "$INDEX" | tail -n 1)"
	else
		report repository FAIL "$(printf '%s\n' "$INDEX" | sed -n 's/^fetch.sh: error: //p' | tail -n 1)" \
			"check the network and NVIDIA_REPOSITORY_URL in /etc/default/nvidia; after an OS update this node fetches its driver from there"
	fi
fi

# --- 10. the next boot: an OS update waiting for its reboot -----------------------------------------
if command -v update_engine_client >/dev/null 2>&1; then
	PENDING=$(pending_release)
	STAGED_FOR=
	[ -z "$PENDING" ] || STAGED_FOR=$(staged_for "$PENDING")
	if [ -z "$PENDING" ]; then
		report next-boot PASS "no OS update is waiting for a reboot"
	elif [ -n "$STAGED_FOR" ]; then
		report next-boot PASS "OS release $PENDING is waiting for its reboot, and its driver is staged in $OPT/$STAGED_FOR: the next boot keeps its GPUs"
	elif [ -n "$REPOSITORY" ]; then
		report next-boot FAIL "OS release $PENDING is waiting for its reboot, and no driver is staged for it: the next boot must fetch one from $REPOSITORY" \
			"$OPT/current/node/fetch.sh --update (nvidia-stage.service does it by itself; see journalctl -u nvidia-stage.service)"
	else
		report next-boot FAIL "OS release $PENDING is waiting for its reboot, and no driver is staged for it: the next boot has no GPUs" \
			"build a bundle for release $PENDING (coreos-gpu build --release $PENDING) and install it with install_nvidia.sh --stage --release $PENDING"
	fi
fi
