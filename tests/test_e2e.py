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
  3. amd64, another reboot: the same ordering again;
  4. cloud kernel (with NVIDIA_FORCE_LOAD=1 in /etc/default/nvidia, set in boot 3, since
     without a GPU nothing is loaded on any kernel): nvidia.service's startup.sh refuses
     before any insmod, naming both kernels (exit 4), and the
     agent starts without GPUs (proprietary bundle, the default policy) or stays down (open
     bundle, built with --on-driver-failure wait); install_nvidia.sh run again there shows
     startup.sh's code through (10 + 4). Then the guard of the guard: a bundle
     whose modules were built for amd64 but which claims the cloud kernel gets "Invalid
     module format" from the kernel, and startup.sh reports a kernel mismatch (exit 4).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import BuiltBundle
from .nodetree import reseal
from .vm import AgentStart, Boot, Vm

pytestmark = pytest.mark.slow
KERNEL = "6.1.0-50-amd64"
CLOUD = "6.1.0-50-cloud-amd64"
VERSION = "535.261.03"
SCENARIO = r"""
set -u
r=/data/results
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
	;;
3)
	# The VM has no GPU, and with none startup.sh loads nothing, rightly, on any kernel: from
	# the next boot on, nvidia.service loads as if there were one (the test-only switch).
	echo NVIDIA_FORCE_LOAD=1 >/etc/default/nvidia
	;;
4)
	systemctl show -p ActiveState -p SubState dcos-mesos-slave.service >$r/agent-state.txt
	journalctl -b -u nvidia.service --no-pager >$r/nvidia-journal.txt 2>&1
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


@pytest.mark.parametrize(("flavour", "policy"), [("proprietary", "start-without-gpus"),
                                                 ("open", "wait")])
def test_bundle_on_a_booted_kernel(vm_image, build_bundle, tmp_path: Path,  # type: ignore[no-untyped-def]
                                   flavour: str, policy: str) -> None:
    built: BuiltBundle = build_bundle("--kernel-module-type", flavour,
                                      *(["--on-driver-failure", policy] if policy == "wait"
                                        else []))
    data = tmp_path / "data"
    data.mkdir()
    (data / "scenario.sh").write_text(SCENARIO)
    (data / "nvidia.tar.gz").hardlink_to(built.archive)
    make_guard(built.archive, data)
    with Vm(vm_image, tmp_path / "vm") as vm:
        # 1. The original flow: extract, install (startup.sh finds no GPU: exit 0).
        first = vm.boot(KERNEL, data)
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

        # 2. A reboot: the unit ordering under real systemd.
        second = vm.boot(KERNEL, data)
        check_agent_after_nvidia(second)
        doctor = json.loads(result(second, "doctor.json"))
        checks = {c["check"]: c for c in doctor["checks"]}
        for name in ("unit-ordering", "libraries", "agent-path"):
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

        # 3. Another reboot, the same ordering.
        check_agent_after_nvidia(vm.boot(KERNEL, data))

        # 4. The cloud kernel: refused before any insmod, both kernels named.
        cloud = vm.boot(CLOUD, data)
        journal = result(cloud, "nvidia-journal.txt")
        mismatch = result(cloud, "mismatch.log")
        for text in (journal, mismatch):
            assert (f"kernel mismatch: the running kernel is {CLOUD}, but this bundle has "
                    f"modules only for {KERNEL}") in text, text + cloud.describe()
        assert result(cloud, "mismatch.rc").strip() == "4"
        assert result(cloud, "nvidia-in-kernel.txt") == "", result(cloud, "nvidia-in-kernel.txt")
        starts = cloud.agent_starts()
        if policy == "start-without-gpus":
            [start] = starts  # the agent starts anyway, after the failed nvidia.service
            assert (start.nvidia["ActiveState"], start.nvidia["ExecMainStatus"]) == (
                "failed", "4"), cloud.describe()
            assert int(start.nvidia["ExecMainExitTimestampMonotonic"]) <= start.start_us
        else:
            assert starts == [], cloud.describe()  # Requires=: the agent waits for the driver
            assert "ActiveState=inactive" in result(cloud, "agent-state.txt")
            assert "Dependency failed for" in cloud.read("journal"), cloud.describe()
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
