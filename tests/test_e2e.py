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

And one VM (proprietary) that follows an OS update from 3975.2.2 (amd64 kernel) to 4081.2.0
(cloud kernel) with bundles A and B published to a repository on the data disk; nvidia.service
loads with NVIDIA_FORCE_LOAD=1, so each boot's exit 8 ("No NVIDIA GPU found") shows the
running kernel accepted that boot's nvidia.ko:
  1. amd64: A installed; update-engine (a stand-in) has 4081.2.0 waiting for the reboot, and
     fetch.sh --update stages B from file:// (NVIDIA_REPOSITORY_URL in /etc/default/nvidia);
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
}
case $n in
1)
	mkdir -p /tmp/a && tar xzf /data/a.tar.gz -C /tmp/a
	/tmp/a/install_nvidia.sh >$r/install.log 2>&1
	echo $? >$r/install.rc
	# The install started the retry timer (in the boot it installs in, too). This boot tests
	# the staging run by hand below: the timer must not stage first.
	systemctl is-active nvidia-retry.timer >$r/timer.txt 2>&1
	systemctl stop nvidia-retry.timer
	# update-engine has downloaded the next release; the node stages its driver (file://).
	mkdir -p /var/lib/update-engine-stand-in
	cat /proc/sys/kernel/random/boot_id >/var/lib/update-engine-stand-in/boot_id
	install -m 755 /data/update_engine_client /usr/bin/update_engine_client
	update_engine_client -status >$r/update-status.txt
	url=file:///data/repository
	printf 'NVIDIA_FORCE_LOAD=1\nNVIDIA_REPOSITORY_URL=%s\n' $url >/etc/default/nvidia
	/opt/nvidia/current/node/fetch.sh --update >$r/stage.log 2>&1
	echo $? >$r/stage.rc
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
    (data / "scenario.sh").write_text(UPDATE_SCENARIO)
    (data / "a.tar.gz").hardlink_to(a.archive)
    (data / "update_engine_client").write_text(
        UPDATE_ENGINE_CLIENT.replace("@NEW_VERSION@", flatcar_release.update.version))
    (data / "gpu-repository.service").write_text(REPOSITORY_UNIT)
    seconds = {"bundles": time.monotonic() - started}
    with Vm(vm_image, tmp_path / "vm") as vm:
        # 1. amd64: install A; update-engine has 4081.2.0 waiting for the reboot: fetch.sh
        #    --update stages B (from file://, the override in /etc/default/nvidia) beside A.
        first = vm.boot(KERNEL, data, timeout=600)  # two installs under TCG: minutes
        assert result(first, "install.rc").strip() == "0", result(first, "install.log")
        assert result(first, "timer.txt").strip() == "active"  # started, not only enabled
        assert "CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT" in result(first, "update-status.txt")
        stage = result(first, "stage.log")
        assert result(first, "stage.rc").strip() == "0", stage + first.describe()
        a_folder = first.read("current").strip()
        [b_folder] = set(folders(first)) - {a_folder}
        assert folders(first) == {a_folder: [KERNEL], b_folder: [CLOUD]}
        assert first.read("staged").split() == [b_folder, flatcar_release.update.version]
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
        seconds["boot 2"] = second.seconds

        # 3. amd64 again (Flatcar's rollback to the previous USR partition): back to A, offline.
        third = vm.boot(KERNEL, data)
        assert third.read("current").strip() == a_folder, third.describe()
        journal = check_forced_load(third)
        assert f"/opt/nvidia/current is now {a_folder} (was {b_folder})" in journal, journal
        check_agent_after_failed_nvidia(third, "8")
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
        seconds["boot 4"] = fourth.seconds
    seconds["total"] = time.monotonic() - started
    print("test_a_node_follows_os_updates:",
          ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))
