"""End to end on a really booted kernel: a bundle made by `coreos-gpu build` installed in a
Debian VM (QEMU, TCG) with systemd and a stand-in for DC/OS's agent unit, across reboots,
on the kernel it was built for (6.1.0-50-amd64) and on another one (6.1.0-50-cloud-amd64).

One VM per module flavour, four boots each:
  1. amd64: the documented flow: the archive downloaded into /tmp (which holds other things),
     extracted there by an unprivileged user (umask 077), then `/tmp/install_nvidia.sh` as
     root (the agent stand-in was up first); the installed files are root's;
  2. amd64, a reboot: nvidia.service finished before the agent started; nvidia-doctor under
     real systemd; a forced load (no GPU here): the kernel accepts nvidia.ko, which then finds
     no GPU (ENODEV, "NVRM: No NVIDIA GPU found."), and startup.sh says exactly that (exit 8);
     then NVIDIA_FORCE_LOAD=1 goes into /etc/default/nvidia for the boots after, since without
     a GPU nothing is loaded on any kernel;
  3. amd64 booted with lockdown=integrity (as Flatcar under Secure Boot; Debian's kernel has
     the lockdown LSM): nvidia.service's startup.sh refuses before any insmod, naming the
     unsigned nvidia.ko (exit 4), and the agent starts without GPUs (proprietary bundle, the
     default policy) or stays down (open bundle, built with --on-driver-failure wait);
     nvidia-doctor's lockdown check fails; the kernel itself refuses a hand insmod of
     nvidia.ko ("Lockdown: insmod: unsigned module loading is restricted");
  4. cloud kernel, not locked down: nvidia.service's startup.sh refuses before any insmod,
     naming both kernels (exit 4), and the agent follows the policy as in boot 3;
     install_nvidia.sh run again there shows startup.sh's code through (10 + 4). Then the
     guard of the guard: a bundle whose modules were built for amd64 but which claims the
     cloud kernel gets "Invalid module format" from the kernel, and startup.sh reports a
     kernel mismatch (exit 4). Last, in the proprietary VM, a stand-in for Flatcar's NVIDIA
     sysext merged by systemd-sysext: startup.sh refuses (exit 9), install_nvidia.sh refuses
     (exit 8) and changes nothing, and nvidia-doctor's sysext check fails; then it is
     unmerged.

And one VM (proprietary) that follows an OS update from 3975.2.2 (amd64 kernel) to 4081.2.0
(cloud kernel) with bundles A and B published to a repository on the data disk, and looks
like a Flatcar GPU node where it matters: Flatcar's own nvidia.service (enabled) with a
setup-nvidia stand-in, nvidia-metadata, and a build setup-nvidia left at an earlier boot.
From boot 2 on nvidia.service loads with NVIDIA_FORCE_LOAD=1, so each boot's exit 8 ("No
NVIDIA GPU found") shows the running kernel accepted that boot's nvidia.ko:
  1. amd64: setup-nvidia is compiling when A is installed: the install stops it, takes over
     its current link, tools and ld.so.conf.d line, and removes its build; update-engine (a
     stand-in) already has 4081.2.0 waiting for the reboot, and the stage watcher the install
     started stages B by itself in this boot, from file:// (NVIDIA_REPOSITORY_URL in
     /etc/default/nvidia); from here on Flatcar's unit never runs (ours shadows it);
  2. cloud, nothing reachable at the bundles' repository URL: nvidia.service switches to the
     staged B, before the agent starts;
  3. amd64 again (a rollback): back to A, offline; then B is deleted and a busybox httpd on
     the guest's loopback serves the repository at the bundles' URL from the next boot on;
  4. cloud: nvidia.service fetches B over HTTP at boot, installs it and switches to it,
     before the agent starts.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import BuiltBundle, run_cli
from .nodetree import reseal
from .test_node_flatcar_recipe import FLATCAR_UNIT_TEXT
from .test_node_flatcar_recipe import THEIRS as FLATCAR_DRIVER
from .vm import AgentStart, Boot, Vm

pytestmark = pytest.mark.slow
KERNEL = "6.1.0-50-amd64"
CLOUD = "6.1.0-50-cloud-amd64"
VERSION = "535.261.03"
SCENARIO = r"""
set -u
r=/data/results
# What an install could change: where current points, and every path under /opt/nvidia with
# its kind, mode, size and modification time.
list_opt() {
	readlink /opt/nvidia/current
	find /opt/nvidia -printf '%y %m %s %T@ %p\n' | sort -k 5
}
# nvidia.service's result this boot, and the agent stand-in's unit (it may not have started).
record_units() {
	systemctl show -p ActiveState -p SubState dcos-mesos-slave.service >$r/agent-state-$1.txt
	journalctl -b -u nvidia.service --no-pager >$r/nvidia-journal-$1.txt 2>&1
}
case $1 in
1)
	# wget -O /tmp/nvidia.tar.gz …; tar xfz /tmp/nvidia.tar.gz -C /tmp (a user); sudo …
	echo 'echo provisioning' >/tmp/terraform_123.sh && mkdir -p /tmp/other/folder
	cp /data/nvidia.tar.gz /tmp/nvidia.tar.gz && chown nobody: /tmp/nvidia.tar.gz
	setpriv --reuid=65534 --regid=65534 --clear-groups sh -c \
		'umask 077 && tar xfz /tmp/nvidia.tar.gz -C /tmp' >$r/extract.log 2>&1
	/tmp/install_nvidia.sh >$r/install.log 2>&1
	echo $? >$r/install.rc
	stat -c '%u:%g %a %n' /tmp/startup.sh /opt/nvidia/current/startup.sh \
		/opt/nvidia/current/bin/nvidia-smi >$r/owners.txt 2>&1
	systemctl is-enabled nvidia.service >$r/enabled.txt 2>&1
	;;
2)
	/opt/bin/nvidia-doctor --json >$r/doctor.json 2>$r/doctor.err
	/opt/nvidia/startup.sh --force-load >$r/forced.log 2>&1
	echo $? >$r/forced.rc
	# The VM has no GPU, and with none startup.sh loads nothing, rightly, on any kernel: from
	# the next boot on, nvidia.service loads as if there were one (the test-only switch).
	echo NVIDIA_FORCE_LOAD=1 >/etc/default/nvidia
	;;
3)
	# Booted with lockdown=integrity.
	cat /sys/kernel/security/lockdown >$r/lockdown.txt 2>&1
	record_units 3
	{ grep '^nvidia' /proc/modules; dmesg | grep -iE 'nvidia|insmod'; } >$r/locked-kernel.txt
	/opt/bin/nvidia-doctor --json >$r/locked-doctor.json 2>$r/locked-doctor.err
	# The kernel's own word on what startup.sh would not try.
	insmod /opt/nvidia/current/modules/6.1.0-50-amd64/nvidia.ko >$r/locked-insmod.log 2>&1
	echo $? >$r/locked-insmod.rc
	dmesg | grep -i lockdown >$r/locked-dmesg.txt
	readlink /opt/nvidia/current >$r/current-3.txt
	;;
4)
	record_units 4
	NVIDIA_FORCE_LOAD=1 /opt/nvidia/startup.sh >$r/mismatch.log 2>&1
	echo $? >$r/mismatch.rc
	{ grep '^nvidia' /proc/modules; dmesg | grep -i nvidia; } >$r/nvidia-in-kernel.txt
	mkdir -p /tmp/again && tar xzf /data/nvidia.tar.gz -C /tmp/again
	NVIDIA_FORCE_LOAD=1 /tmp/again/install_nvidia.sh >$r/again.log 2>&1
	echo $? >$r/again.rc
	mkdir -p /tmp/guard && tar xzf /data/guard.tar.gz -C /tmp/guard
	/tmp/guard/install_nvidia.sh --no-start >$r/guard-install.log 2>&1
	echo $? >$r/guard-install.rc
	NVIDIA_FORCE_LOAD=1 /opt/nvidia/startup.sh >$r/guard.log 2>&1
	echo $? >$r/guard.rc
	# A stand-in for Flatcar's NVIDIA sysext: its name and extension-release, no driver.
	# systemd-sysext (252) merges an extension whose ID is the host's and, with no
	# SYSEXT_LEVEL on either side, whose VERSION_ID is the host's too. In one VM of the two.
	[ -e /data/sysext ] || exit 0
	x=/run/extensions/flatcar-nvidia-drivers-570
	mkdir -p $x/usr/lib/extension-release.d $x/usr/share/coreos-gpu-test
	(. /etc/os-release && printf 'ID=%s\nVERSION_ID=%s\n' "$ID" "$VERSION_ID") \
		>$x/usr/lib/extension-release.d/extension-release.flatcar-nvidia-drivers-570
	echo 'merged from the sysext stand-in' >$x/usr/share/coreos-gpu-test/sysext.txt
	systemd-sysext merge >$r/sysext-merge.log 2>&1
	echo $? >$r/sysext-merge.rc
	{ systemd-sysext status; cat /usr/share/coreos-gpu-test/sysext.txt; } >$r/sysext-status.txt 2>&1
	NVIDIA_FORCE_LOAD=1 /opt/nvidia/startup.sh >$r/sysext-startup.log 2>&1
	echo $? >$r/sysext-startup.rc
	list_opt >$r/sysext-before.txt
	/tmp/again/install_nvidia.sh --no-start >$r/sysext-install.log 2>&1
	echo $? >$r/sysext-install.rc
	list_opt >$r/sysext-after.txt
	/opt/bin/nvidia-doctor --json >$r/sysext-doctor.json 2>$r/sysext-doctor.err
	systemd-sysext unmerge >$r/sysext-unmerge.log 2>&1
	echo $? >$r/sysext-unmerge.rc
	;;
esac
"""


def make_guard(archive: Path, folder: Path) -> Path:
    """The bundle with its amd64 modules filed under the cloud kernel, and every claim
    (bundle.env, module-deps, MANIFEST.json, SHA256SUMS) saying they are for it."""
    tree = folder / "guard"
    tree.mkdir()
    subprocess.run(["tar", "xzf", archive, "-C", tree], check=True)
    payload = tree / "payload" / VERSION
    (payload / "modules" / KERNEL).rename(payload / "modules" / CLOUD)
    for name in ("node/bundle.env", "node/module-deps", "MANIFEST.json"):
        path = tree / name
        path.write_text(path.read_text().replace(KERNEL, CLOUD))
    reseal(tree)
    guard = folder / "guard.tar.gz"
    subprocess.run(["tar", "czf", guard, "-C", tree, "."], check=True)
    return guard


def result(boot: Boot, name: str) -> str:
    return (boot.results / name).read_text(errors="replace")


def read_doctor(boot: Boot, name: str) -> dict[str, dict[str, str]]:
    """`nvidia-doctor --json`'s checks, by name, from the file the scenario wrote."""
    return {check["check"]: check for check in json.loads(result(boot, name))["checks"]}


def check_agent_after_nvidia(boot: Boot) -> AgentStart:
    """The agent stand-in started once, after nvidia.service had finished successfully."""
    [start] = boot.agent_starts()
    nvidia = start.nvidia
    assert (nvidia["ActiveState"], nvidia["Result"], nvidia["ExecMainStatus"]) == (
        "active", "success", "0"), boot.describe()
    exited = int(nvidia["ExecMainExitTimestampMonotonic"])
    assert 0 < exited <= start.start_us, boot.describe()
    # The drop-in's EnvironmentFile: DC/OS's PATH plus the driver's tools.
    assert start.path == "/opt/mesosphere/bin:/usr/bin:/bin:/sbin:/opt/nvidia/current/bin"
    assert start.nvidia_smi == "/opt/nvidia/current/bin/nvidia-smi"
    assert start.devices == {}  # no GPU in this VM: nothing loaded, no nodes
    return start


def check_agent_after_refusal(boot: Boot, policy: str) -> None:
    """nvidia.service failed with startup.sh's 4 (the kernel does not take the modules): the
    agent stand-in started once after it (start-without-gpus, the default policy) or stayed
    down (wait: the drop-in's Requires=)."""
    starts = boot.agent_starts()
    if policy == "start-without-gpus":
        [start] = starts  # the agent starts anyway, after the failed nvidia.service
        assert (start.nvidia["ActiveState"], start.nvidia["ExecMainStatus"]) == (
            "failed", "4"), boot.describe()
        assert int(start.nvidia["ExecMainExitTimestampMonotonic"]) <= start.start_us
    else:
        assert starts == [], boot.describe()  # Requires=: the agent waits for the driver
        assert "ActiveState=inactive" in boot.read("agent-state")
        assert "Dependency failed for" in boot.read("journal"), boot.describe()


@pytest.mark.parametrize(("flavour", "policy"), [("proprietary", "start-without-gpus"),
                                                 ("open", "wait")])
def test_bundle_on_a_booted_kernel(vm_image, build_bundle, tmp_path: Path,  # type: ignore[no-untyped-def]
                                   flavour: str, policy: str) -> None:
    started = time.monotonic()
    built: BuiltBundle = build_bundle("--kernel-module-type", flavour,
                                      *(["--on-driver-failure", policy] if policy == "wait"
                                        else []))
    data = tmp_path / "data"
    data.mkdir()
    (data / "scenario.sh").write_text(SCENARIO)
    (data / "nvidia.tar.gz").hardlink_to(built.archive)
    make_guard(built.archive, data)
    if flavour == "proprietary":
        (data / "sysext").write_text("")  # boot 4 merges the sysext stand-in (one VM is enough)
    seconds = {"bundle": time.monotonic() - started}
    with Vm(vm_image, tmp_path / "vm") as vm:
        # 1. The original flow: extract, install (startup.sh finds no GPU: exit 0).
        first = vm.boot(KERNEL, data, timeout=600)  # two installs under TCG: minutes
        assert result(first, "install.rc").strip() == "0", (
            result(first, "install.log") + first.describe())
        install_log = result(first, "install.log")
        assert "no NVIDIA GPU on PCI" in install_log and "done: driver" in install_log
        assert result(first, "enabled.txt").strip() == "enabled", result(first, "enabled.txt")
        assert result(first, "owners.txt").splitlines() == [
            "65534:65534 700 /tmp/startup.sh", "0:0 755 /opt/nvidia/current/startup.sh",
            "0:0 755 /opt/nvidia/current/bin/nvidia-smi"], result(first, "owners.txt")
        [before] = first.agent_starts()
        assert before.nvidia["LoadState"] == "not-found"  # the agent was up before the install
        seconds["boot 1"] = first.seconds

        # 2. A reboot: the unit ordering under real systemd.
        second = vm.boot(KERNEL, data)
        check_agent_after_nvidia(second)
        checks = read_doctor(second, "doctor.json")
        for name in ("unit-ordering", "libraries", "agent-path", "lockdown", "sysext"):
            assert checks[name]["status"] == "PASS", (checks[name], result(second, "doctor.err"))
        assert checks["gpus"]["status"] == "FAIL"  # true: the VM has no GPU
        # 2b. Forced load: the kernel accepts nvidia.ko, and the driver finds no GPU.
        forced = result(second, "forced.log")
        assert result(second, "forced.rc").strip() == "8", forced + second.describe()
        assert "the kernel accepted nvidia.ko, but the driver found no usable NVIDIA GPU (No " \
               "such device)" in forced, forced
        dmesg = second.read("dmesg")
        assert "NVRM: No NVIDIA GPU found." in dmesg, dmesg[-3000:]
        assert "Invalid module format" not in forced and "disagrees" not in dmesg
        seconds["boot 2"] = second.seconds

        # 3. Locked down (as Flatcar under Secure Boot): Debian's kernel has the lockdown LSM
        #    and takes its mode from the command line. The bundle's modules are unsigned.
        third = vm.boot(KERNEL, data, cmdline=("lockdown=integrity",))
        assert result(third, "lockdown.txt").strip() == "none [integrity] confidentiality", (
            result(third, "lockdown.txt") + third.describe())
        current = third.read("current").strip()
        refusal = ("this kernel loads only signed modules (lockdown=integrity), and "
                   f"/opt/nvidia/{current}/modules/{KERNEL}/nvidia.ko is unsigned: driver "
                   f"{VERSION} cannot load here, and nothing was loaded")
        journal = third.read("nvidia-journal")
        assert refusal in journal and "status=4/" in journal, journal + third.describe()
        # Said before any insmod: the kernel saw no nvidia module, nor an insmod.
        assert result(third, "locked-kernel.txt") == "", result(third, "locked-kernel.txt")
        check_agent_after_refusal(third, policy)
        lockdown = read_doctor(third, "locked-doctor.json")["lockdown"]
        assert lockdown["status"] == "FAIL", lockdown
        assert (f"/opt/nvidia/current/modules/{KERNEL}/nvidia.ko is unsigned: driver {VERSION} "
                "cannot load here") in lockdown["detail"], lockdown
        # 3b. The kernel itself refuses the unsigned nvidia.ko (kernel/module/signing.c asks
        #     the lockdown LSM, which says so in dmesg): what startup.sh spared it.
        insmod = result(third, "locked-insmod.log")
        assert result(third, "locked-insmod.rc").strip() == "1", insmod
        assert "Operation not permitted" in insmod, insmod
        assert ("Lockdown: insmod: unsigned module loading is restricted; see man "
                "kernel_lockdown.7") in result(third, "locked-dmesg.txt"), result(
                    third, "locked-dmesg.txt")
        # (install_nvidia.sh's refusal there, before it changes anything: test_node_sysext_
        # lockdown, against sysroots; here the kernel's own word is the point.)
        seconds["boot 3"] = third.seconds

        # 4. The cloud kernel: refused before any insmod, both kernels named.
        cloud = vm.boot(CLOUD, data)
        journal = cloud.read("nvidia-journal")
        mismatch = result(cloud, "mismatch.log")
        for text in (journal, mismatch):
            assert (f"kernel mismatch: the running kernel is {CLOUD}, but this bundle has "
                    f"modules only for {KERNEL}") in text, text + cloud.describe()
        assert result(cloud, "mismatch.rc").strip() == "4"
        assert result(cloud, "nvidia-in-kernel.txt") == "", result(cloud, "nvidia-in-kernel.txt")
        check_agent_after_refusal(cloud, policy)
        again = result(cloud, "again.log")
        assert result(cloud, "again.rc").strip() == "14", again  # 10 + startup.sh's 4
        assert "(startup.sh exit 4)" in again, again
        # 4b. The guard of the guard: modules for amd64 claiming the cloud kernel.
        assert result(cloud, "guard-install.rc").strip() == "0", result(cloud,
                                                                         "guard-install.log")
        guard = result(cloud, "guard.log")
        assert result(cloud, "guard.rc").strip() == "4", guard + cloud.describe()
        assert (f"kernel mismatch: the running kernel {CLOUD} refused nvidia.ko") in guard, guard
        assert "Invalid module format" in guard, guard
        assert "disagrees about version of symbol module_layout" in cloud.read("dmesg")
        # 4c. Flatcar's NVIDIA sysext merged (a stand-in): startup.sh, install_nvidia.sh and
        #     nvidia-doctor name it, and nothing changes. One flavour is enough.
        if flavour == "proprietary":
            check_merged_sysext(cloud)
        seconds["boot 4"] = cloud.seconds
    seconds["total"] = time.monotonic() - started
    print(f"test_bundle_on_a_booted_kernel[{flavour}]:",
          ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))


def check_merged_sysext(cloud: Boot) -> None:
    """Boot 4's end in the proprietary VM: the merged sysext stand-in is named and refused."""
    merged = result(cloud, "sysext-status.txt")
    assert result(cloud, "sysext-merge.rc").strip() == "0", result(cloud, "sysext-merge.log")
    assert "flatcar-nvidia-drivers-570" in merged, merged
    assert "merged from the sysext stand-in" in merged, merged  # /usr has its file
    sysext = ("Flatcar's NVIDIA driver sysext is enabled on this node (/run/extensions/"
              "flatcar-nvidia-drivers-570, /usr/lib/extension-release.d/extension-release."
              "flatcar-nvidia-drivers-570 (merged into /usr))")
    startup = result(cloud, "sysext-startup.log")
    assert result(cloud, "sysext-startup.rc").strip() == "9", startup
    assert f"{sysext}: its driver and coreos-gpu's must not both load" in startup, startup
    install = result(cloud, "sysext-install.log")
    assert result(cloud, "sysext-install.rc").strip() == "8", install
    assert f"{sysext}: its driver and this one must not both load, so nothing was " \
           "changed" in install, install
    assert result(cloud, "sysext-after.txt") == result(cloud, "sysext-before.txt")
    check = read_doctor(cloud, "sysext-doctor.json")["sysext"]
    assert check["status"] == "FAIL" and sysext in check["detail"], check
    assert result(cloud, "sysext-unmerge.rc").strip() == "0", result(cloud,
                                                                     "sysext-unmerge.log")


# --- following OS updates: stage before the reboot, switch at boot, roll back, fetch at boot --

REPOSITORY_PORT = 8080  # the guest's busybox httpd, on its loopback (the VM has no network)
REPOSITORY_URL = f"http://127.0.0.1:{REPOSITORY_PORT}"
# Flatcar's /usr/bin/update_engine_client as far as fetch.sh asks it: -status in
# update_engine_client.cc's shape (flatcar-update.md), glog's line on stderr. The update it
# reports waits for the reboot only in the boot that installed the stand-in; after that reboot
# the new release runs and update-engine is idle again. -watch_for_updates never returns.
UPDATE_ENGINE_CLIENT = r"""#!/bin/sh
state=/var/lib/update-engine-stand-in
case ${1-} in
-status)
	echo "I1202 10:00:00.000000 712 update_engine_client.cc:245] Querying Update Engine status" >&2
	if [ "$(cat /proc/sys/kernel/random/boot_id)" = "$(cat $state/boot_id)" ]; then
		op=UPDATE_STATUS_UPDATED_NEED_REBOOT version=@NEW_VERSION@ size=465371229
	else
		op=UPDATE_STATUS_IDLE version=0.0.0 size=0
	fi
	printf 'LAST_CHECKED_TIME=1733083200\nPROGRESS=0.000000\n'
	printf 'CURRENT_OP=%s\nNEW_VERSION=%s\nNEW_SIZE=%s\n' "$op" "$version" "$size" ;;
-watch_for_updates) exec sleep infinity ;;
*) echo "update_engine_client (test stand-in): only -status, -watch_for_updates" >&2; exit 1 ;;
esac
"""
# The bundle repository on the node's loopback, up before nvidia.service. Forking: busybox
# httpd listens before it daemonizes, so "started" means accepting connections.
REPOSITORY_UNIT = f"""[Unit]
Description=coreos-gpu test bundle repository on {REPOSITORY_URL}
Before=nvidia.service

[Service]
Type=forking
ExecStart=/bin/busybox httpd -p 127.0.0.1:{REPOSITORY_PORT} -h /srv/gpu-repository

[Install]
WantedBy=multi-user.target
"""
# A stand-in for setup-nvidia: like the real one it skips the build when
# /opt/nvidia/<driver>/<running kernel> is there, and otherwise downloads into
# /opt/nvidia/workdir and compiles for minutes; here it notes which in its log and "compiles"
# by sleeping, noting it if systemd stops it.
SETUP_NVIDIA = r"""#!/bin/sh
. /usr/share/flatcar/nvidia-metadata
log=/var/lib/setup-nvidia-stand-in/runs
mkdir -p "${log%/*}"
boot=$(cat /proc/sys/kernel/random/boot_id)
if [ -d "/opt/nvidia/$NVIDIA_DRIVER_VERSION/$(uname -r)" ]; then
	echo "$boot load" >>$log
	exit 0
fi
echo "$boot build" >>$log
trap 'echo "$boot stopped" >>$log; exit 143' TERM
mkdir -p /opt/nvidia/workdir && echo part >/opt/nvidia/workdir/flatcar_developer_container.bin.bz2
sleep 3600 &
wait $!
"""
UPDATE_SCENARIO = r"""
set -u
r=/data/results
n=$1
record() {
	readlink /opt/nvidia/current >$r/current-$n.txt
	cat /opt/nvidia/staged >$r/staged-$n.txt 2>/dev/null
	for d in /opt/nvidia/*/; do
		d=${d%/}
		[ -L "$d" ] || echo "${d##*/} $(ls "$d/modules" | tr '\n' ' ')"
	done >$r/folders-$n.txt
	journalctl -b -u nvidia.service -o cat --no-pager >$r/nvidia-$n.txt 2>&1
	systemctl show -p FragmentPath --value nvidia.service >$r/fragment-$n.txt
	cp /var/lib/setup-nvidia-stand-in/runs $r/setup-nvidia-runs.txt
}
case $n in
1)
	# Flatcar's recipe: its unit and setup-nvidia in /usr, enabled, and what it built at an
	# earlier boot (of the cloud kernel): the driver under /opt/nvidia/<driver>/<kernel>/usr,
	# `current` linked to it, its tools in /opt/bin, its ld.so.conf.d line.
	v=@FLATCAR_DRIVER@
	install -D -m 644 /data/flatcar/nvidia.service /usr/lib/systemd/system/nvidia.service
	mkdir -p /usr/lib/systemd/system/multi-user.target.wants
	ln -s ../nvidia.service /usr/lib/systemd/system/multi-user.target.wants/nvidia.service
	install -D -m 755 /data/flatcar/setup-nvidia /usr/lib/nvidia/bin/setup-nvidia
	mkdir -p /usr/share/flatcar && echo NVIDIA_DRIVER_VERSION=$v >/usr/share/flatcar/nvidia-metadata
	t=/opt/nvidia/$v/@CLOUD@/usr
	mkdir -p $t/lib64 $t/lib/modules/@CLOUD@/video /opt/bin /etc/ld.so.conf.d
	echo theirs >$t/lib64/libnvidia-ml.so.$v && echo theirs >$t/lib/modules/@CLOUD@/video/nvidia.ko
	ln -s $v/@CLOUD@ /opt/nvidia/current
	for tool in nvidia-smi nvidia-modprobe nvidia-persistenced nvidia-settings; do
		printf '#!/bin/sh\necho setup-nvidia\n' >/opt/bin/$tool && chmod 755 /opt/bin/$tool
	done
	echo /opt/nvidia/current/usr/lib64 >/etc/ld.so.conf.d/nvidia.conf
	# This boot runs the running kernel's build: setup-nvidia is compiling as the install runs.
	systemctl daemon-reload && systemctl start --no-block nvidia.service
	i=0
	until grep -q build /var/lib/setup-nvidia-stand-in/runs 2>/dev/null || [ $i -ge 60 ]; do
		sleep 1; i=$((i + 1))
	done
	systemctl is-active nvidia.service >$r/flatcar-state.txt
	# update-engine has downloaded the next release and waits for the reboot before the install
	# (the node was provisioned from an older image); the repository is file:// here.
	mkdir -p /var/lib/update-engine-stand-in
	cat /proc/sys/kernel/random/boot_id >/var/lib/update-engine-stand-in/boot_id
	install -m 755 /data/update_engine_client /usr/bin/update_engine_client
	update_engine_client -status >$r/update-status.txt
	echo NVIDIA_REPOSITORY_URL=file:///data/repository >/etc/default/nvidia
	mkdir -p /tmp/a && tar xzf /data/a.tar.gz -C /tmp/a
	/tmp/a/install_nvidia.sh >$r/install.log 2>&1
	echo $? >$r/install.rc
	# The install started the watcher and the retry timer, in this boot: the watcher stages
	# the update's driver by itself.
	systemctl is-active nvidia-retry.timer nvidia-stage.service >$r/timer.txt 2>&1
	i=0
	until [ -s /opt/nvidia/staged ] || [ $i -ge 240 ]; do sleep 1; i=$((i + 1)); done
	journalctl -b -u nvidia-stage.service -o cat --no-pager >$r/stage.log 2>&1
	readlink /opt/bin/nvidia-smi >$r/tools.txt
	ls /opt/bin >>$r/tools.txt
	cat /etc/ld.so.conf.d/nvidia.conf >$r/ldconf.txt
	record
	# From the next boot on, the bundle's own repository URL, where nothing listens yet.
	echo NVIDIA_FORCE_LOAD=1 >/etc/default/nvidia
	;;
2) record ;;
3)
	record
	# Forget the cloud kernel's driver; from the next boot on the repository is up.
	b=$(cat $r/current-2.txt)
	rm -rf "/opt/nvidia/$b" /opt/nvidia/staged
	mkdir -p /srv && cp -a /data/repository /srv/gpu-repository
	cp /data/gpu-repository.service /etc/systemd/system/
	systemctl enable gpu-repository.service 2>&1
	;;
4)
	record
	systemctl show -p ActiveEnterTimestampMonotonic gpu-repository.service >$r/order-4.txt
	systemctl show -p ExecMainStartTimestampMonotonic nvidia.service >>$r/order-4.txt
	;;
esac
"""


def check_agent_after_failed_nvidia(boot: Boot, status: str) -> AgentStart:
    """The agent stand-in started once, after nvidia.service had exited with status (a forced
    load without a GPU fails, with 8)."""
    [start] = boot.agent_starts()
    nvidia = start.nvidia
    assert (nvidia["ActiveState"], nvidia["ExecMainStatus"]) == ("failed", status), (
        boot.describe())
    exited = int(nvidia["ExecMainExitTimestampMonotonic"])
    assert 0 < exited <= start.start_us, boot.describe()
    return start


def folders(boot: Boot) -> dict[str, list[str]]:
    """The driver folders in /opt/nvidia after the boot's scenario, with their kernels."""
    lines = boot.read("folders").splitlines()
    return {name: kernels for name, *kernels in map(str.split, lines)}


def check_forced_load(boot: Boot) -> str:
    """nvidia.service's journal: the kernel accepted nvidia.ko, which found no GPU (exit 8)."""
    journal = boot.read("nvidia")
    assert "the kernel accepted nvidia.ko, but the driver found no usable NVIDIA GPU" in journal, (
        journal + boot.describe())
    assert "status=8/" in journal, journal
    assert "NVRM: No NVIDIA GPU found." in boot.read("dmesg")
    assert "Invalid module format" not in journal and "disagrees" not in boot.read("dmesg")
    return journal


def check_flatcar_recipe_taken_over(boot: Boot, install_log: str) -> None:
    """Boot 1: the install stopped Flatcar's setup-nvidia (building for this kernel), took
    over its current, tools and ld.so.conf.d line, and removed its build; from then on
    nvidia.service is ours."""
    assert result(boot, "flatcar-state.txt").strip() == "activating", boot.describe()
    for line in (f"stopping Flatcar's nvidia.service: its setup-nvidia is building NVIDIA's "
                 f"driver {FLATCAR_DRIVER} into /opt/nvidia",
                 "taking over from Flatcar's setup-nvidia: /opt/nvidia/current "
                 "/opt/bin/nvidia-modprobe /opt/bin/nvidia-smi /opt/bin/nvidia-persistenced "
                 "/opt/bin/nvidia-settings /etc/ld.so.conf.d/nvidia.conf",
                 f"removed Flatcar's setup-nvidia build: /opt/nvidia/{FLATCAR_DRIVER} "
                 "/opt/nvidia/workdir"):
        assert line in install_log, install_log
    assert recipe_runs(boot) == [(boot.boot_id, "build"), (boot.boot_id, "stopped")]
    tools = result(boot, "tools.txt").split()
    assert tools[0] == "/opt/nvidia/current/bin/nvidia-smi", tools
    assert "nvidia-settings" not in tools  # another driver's tool, not in our bundle
    assert result(boot, "ldconf.txt").startswith("# coreos-gpu"), result(boot, "ldconf.txt")
    assert boot.read("fragment").strip() == "/etc/systemd/system/nvidia.service"


def check_shadowed(boot: Boot, first: Boot) -> None:
    """Flatcar's nvidia.service never ran again: ours shadows it at every boot."""
    assert recipe_runs(boot) == recipe_runs(first), boot.describe()
    assert boot.read("fragment").strip() == "/etc/systemd/system/nvidia.service"


def recipe_runs(boot: Boot) -> list[tuple[str, str]]:
    """setup-nvidia's runs on this node so far: (boot id, what it did)."""
    path = boot.results / "setup-nvidia-runs.txt"
    return [(line.split()[0], line.split()[1]) for line in path.read_text().splitlines()]


def test_a_node_follows_os_updates(vm_image, build_bundle, flatcar_release,  # type: ignore[no-untyped-def]
                                   tmp_path: Path) -> None:
    """One node across an OS update to a release on another kernel, its rollback, and a boot
    whose driver must come from the repository, under real systemd (see the boots below)."""
    started = time.monotonic()
    key = tmp_path / "repo.key"
    assert run_cli("keygen", "--output", key, cwd=tmp_path).code == 0
    repository = ("--kernel-module-type", "proprietary", "--repository", REPOSITORY_URL,
                  "--repository-key", f"{key}.pub")
    a = build_bundle(*repository)
    b = build_bundle(*repository, release=flatcar_release.update.version)
    data = tmp_path / "data"
    data.mkdir()
    published = run_cli("publish", a.archive, b.archive, "--to", data / "repository", "--key",
                        key, cwd=tmp_path)
    assert published.code == 0, published.stderr
    (data / "scenario.sh").write_text(
        UPDATE_SCENARIO.replace("@FLATCAR_DRIVER@", FLATCAR_DRIVER).replace("@CLOUD@", CLOUD))
    (data / "flatcar").mkdir()
    (data / "flatcar/nvidia.service").write_text(FLATCAR_UNIT_TEXT)
    (data / "flatcar/setup-nvidia").write_text(SETUP_NVIDIA)
    (data / "a.tar.gz").hardlink_to(a.archive)
    (data / "update_engine_client").write_text(
        UPDATE_ENGINE_CLIENT.replace("@NEW_VERSION@", flatcar_release.update.version))
    (data / "gpu-repository.service").write_text(REPOSITORY_UNIT)
    seconds = {"bundles": time.monotonic() - started}
    with Vm(vm_image, tmp_path / "vm") as vm:
        # 1. amd64: install A; update-engine has 4081.2.0 waiting for the reboot: fetch.sh
        #    --update stages B (from file://, the override in /etc/default/nvidia) beside A.
        first = vm.boot(KERNEL, data, timeout=600)  # two installs under TCG: minutes
        install_log = result(first, "install.log")
        assert result(first, "install.rc").strip() == "0", install_log + first.describe()
        check_flatcar_recipe_taken_over(first, install_log)
        # The install started the retry timer and the watcher, which staged B by itself.
        assert result(first, "timer.txt").split() == ["active", "active"], result(first,
                                                                               "timer.txt")
        assert "CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT" in result(first, "update-status.txt")
        stage = result(first, "stage.log")
        a_folder = first.read("current").strip()
        [b_folder] = set(folders(first)) - {a_folder}
        assert folders(first) == {a_folder: [KERNEL], b_folder: [CLOUD]}
        assert first.read("staged").split() == [b_folder, flatcar_release.update.version], (
            stage + first.describe())
        assert "file:///data/repository" in stage, stage
        seconds["boot 1"] = first.seconds

        # 2. The cloud kernel, no repository reachable: nvidia.service switches to the staged
        #    B, whose nvidia.ko the kernel accepts (exit 8: no GPU), before the agent starts.
        second = vm.boot(CLOUD, data)
        assert second.read("current").strip() == b_folder, second.describe()
        assert set(folders(second)) == {a_folder, b_folder}  # A stays: a rollback needs it
        assert b_folder not in second.read("staged")  # in use now, no longer staged
        journal = check_forced_load(second)
        assert f"/opt/nvidia/current is now {b_folder} (was {a_folder})" in journal, journal
        check_agent_after_failed_nvidia(second, "8")
        check_shadowed(second, first)
        seconds["boot 2"] = second.seconds

        # 3. amd64 again (Flatcar's rollback to the previous USR partition): back to A, offline.
        third = vm.boot(KERNEL, data)
        assert third.read("current").strip() == a_folder, third.describe()
        journal = check_forced_load(third)
        assert f"/opt/nvidia/current is now {a_folder} (was {b_folder})" in journal, journal
        check_agent_after_failed_nvidia(third, "8")
        check_shadowed(third, first)
        seconds["boot 3"] = third.seconds

        # 4. The cloud kernel with B gone and the repository up on http: nvidia.service fetches
        #    B at boot, installs it and loads it, before the agent starts.
        fourth = vm.boot(CLOUD, data, timeout=600)  # a download and an install
        assert fourth.read("current").strip() == b_folder, fourth.describe()  # B's name again
        journal = check_forced_load(fourth)
        for line in (f"fetching them from {REPOSITORY_URL}",
                     f"fetching the driver for kernel {CLOUD}: {REPOSITORY_URL}/bundles/",
                     f"installed driver {VERSION} (", f"/opt/nvidia/current is now {b_folder} "
                     f"(was {a_folder})"):
            assert line in journal, journal
        check_agent_after_failed_nvidia(fourth, "8")
        order = dict(line.split("=", 1) for line in fourth.read("order").split())
        assert 0 < int(order["ActiveEnterTimestampMonotonic"]) <= int(
            order["ExecMainStartTimestampMonotonic"]), order  # the repository was up first
        check_shadowed(fourth, first)
        seconds["boot 4"] = fourth.seconds
    seconds["total"] = time.monotonic() - started
    print("test_a_node_follows_os_updates:",
          ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))
