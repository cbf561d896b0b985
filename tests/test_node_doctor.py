"""nvidia-doctor against a fake node: every contract point PASSes on a healthy node, and
each breakage FAILs its own check, with a fix."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from .bundletools import CLOUD
from .nodetree import CGROUP_V1_MOUNTS, CGROUP_V2_MOUNTS, SHELLS, Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
CHECKS = ["gpus", "modules", "sysext", "lockdown", "flatcar-recipe", "device-nodes", "libraries",
          "agent-path", "unit-ordering", "cgroups", "nvidia-smi", "persistence", "cdi"]
AGENTS = ("dcos-mesos-slave.service", "dcos-mesos-slave-public.service")
MISSING_TOOLS = ("nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
                 "nvidia-cuda-mps-server")


def set_unit(node: Node, unit: str, **properties: str) -> None:
    folder = node.root / ".systemd" / unit
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in properties.items():
        (folder / key).write_text(f"{value}\n")


def healthy(tmp_path: Path, bundle: Path, shell: str = "sh") -> Node:
    """Installed and started, with what systemd would say of the units."""
    node = Node(tmp_path, shell=shell)
    assert node.install(bundle).code == 0
    node.add_gpu("0000:00:1e.0", 0)
    node.add_gpu("0000:00:1f.0", 1)
    assert node.startup().code == 0
    # The test .run's compute profile has only nvidia-smi of the five Mesos tools.
    bin_dir = (node.root / "opt/nvidia/current/bin").resolve()
    for tool in MISSING_TOOLS:
        shutil.copy(bin_dir / "nvidia-smi", bin_dir / tool)
    (node.root / ".ldcache").write_text(
        "4 libs found in cache `/etc/ld.so.cache'\n"
        "\tlibnvidia-ml.so.1 (libc6,x86-64) => /opt/nvidia/current/lib64/libnvidia-ml.so.1\n"
        "\tlibcuda.so.1 (libc6,x86-64) => /opt/nvidia/current/lib64/libcuda.so.1\n")
    (node.root / ".systemd").mkdir()
    (node.root / ".systemd/Version").write_text("252.39-1~deb12u2\n")  # the manager's
    set_unit(node, "nvidia.service", Type="oneshot", RemainAfterExit="yes",
             UnitFileState="enabled", Before=" ".join(AGENTS))
    for unit in AGENTS:
        set_unit(node, unit, LoadState="loaded", After="network.target nvidia.service",
                 Wants="nvidia.service")
    return node


def statuses(result_stdout: str) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line.split()[0] for line in result_stdout.splitlines()
            if line.startswith(("PASS ", "FAIL "))}


@pytest.mark.parametrize("shell", SHELLS)
def test_a_healthy_node_passes_every_check(tmp_path: Path, bundle: Path, shell: str) -> None:
    node = healthy(tmp_path, bundle, shell)
    result = node.doctor()
    assert result.code == 0, result.stdout + result.stderr
    assert statuses(result.stdout) == dict.fromkeys(CHECKS, "PASS")
    assert "PASS device-nodes: /dev/nvidiactl /dev/nvidia0 /dev/nvidia1 " in result.stdout
    as_json = node.doctor("--json")
    assert as_json.code == 0
    report = json.loads(as_json.stdout)
    assert report["ok"] is True
    assert [(c["check"], c["status"]) for c in report["checks"]] == [
        (c, "PASS") for c in CHECKS]


def _unload(node: Node) -> None:
    (node.root / "proc/modules").write_text("drm 1 0 - Live 0x0\n")


def _wrong_minor(node: Node) -> None:
    (node.root / "dev/nvidia1").unlink()
    os.mknod(node.root / "dev/nvidia1", 0o20666, os.makedev(195, 9))


def _no_nvml(node: Node) -> None:
    (node.root / ".ldcache").write_text("\tlibc.so.6 (libc6,x86-64) => /lib/libc.so.6\n")


def _other_nvml(node: Node) -> None:
    lib = node.root / "usr/lib64"
    lib.mkdir(parents=True)
    (lib / "libnvidia-ml.so.470.256.02").write_text("old")
    (lib / "libnvidia-ml.so.1").symlink_to("libnvidia-ml.so.470.256.02")
    (node.root / ".ldcache").write_text(
        "\tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib64/libnvidia-ml.so.1\n")


def _no_tool(node: Node) -> None:
    (node.root / "opt/nvidia/current/bin/nvidia-cuda-mps-server").unlink()


def _not_oneshot(node: Node) -> None:
    set_unit(node, "nvidia.service", Type="simple")


def _agent_not_after(node: Node) -> None:
    set_unit(node, AGENTS[0], After="network.target")


def _no_dropin(node: Node) -> None:
    (node.root / f"etc/systemd/system/{AGENTS[1]}.d/coreos-gpu.conf").unlink()


def _cgroup_v2(node: Node) -> None:
    (node.root / "proc/mounts").write_text(CGROUP_V2_MOUNTS)


def _no_gpu(node: Node) -> None:
    shutil.rmtree(node.root / "sys/bus/pci/devices")
    (node.root / "sys/bus/pci/devices").mkdir()


BREAKAGES: dict[str, tuple[Callable[[Node], None], dict[str, str], str, str]] = {
    # name: (break it, extra env, the check that fails, words of its detail)
    "no gpu": (_no_gpu, {}, "gpus", "no NVIDIA display controller on PCI"),
    "not loaded": (_unload, {}, "modules", "not loaded: nvidia nvidia-modeset nvidia-uvm"),
    "other kernel": (lambda n: None, {"FAKE_KERNEL": CLOUD}, "modules",
                     f"the running kernel is {CLOUD}"),
    "other driver loaded": (
        lambda n: (n.root / "sys/module/nvidia/version").write_text("470.256.02\n"), {},
        "modules", "driver 470.256.02 is loaded, but 535.261.03 is installed"),
    "missing node": (lambda n: (n.root / "dev/nvidia-uvm-tools").unlink(), {}, "device-nodes",
                     "missing or wrong: /dev/nvidia-uvm-tools (c 508 1)"),
    "wrong minor": (_wrong_minor, {}, "device-nodes", "/dev/nvidia1 (c 195 1)"),
    "no nvml": (_no_nvml, {}, "libraries", "libnvidia-ml.so.1 is not in the ld.so cache"),
    "other nvml": (_other_nvml, {}, "libraries", "is libnvidia-ml.so.470.256.02, not driver"),
    "no tool": (_no_tool, {}, "agent-path", "does not find: nvidia-cuda-mps-server"),
    "not oneshot": (_not_oneshot, {}, "unit-ordering", "nvidia.service is not Type=oneshot"),
    "agent not after": (_agent_not_after, {}, "unit-ordering",
                        f"{AGENTS[0]} is not After=nvidia.service"),
    "no drop-in": (_no_dropin, {}, "unit-ordering", f"{AGENTS[1]} has no coreos-gpu drop-in"),
    "no systemd": (lambda n: (n.root / ".systemd/Version").unlink(), {}, "unit-ordering",
                   "systemd cannot be asked about the units"),
    "cgroup v2": (_cgroup_v2, {}, "cgroups", "no cgroup v1 devices hierarchy is mounted"),
    "smi fails": (lambda n: None, {"FAKE_SMI_FAIL": "1"}, "nvidia-smi", "nvidia-smi -L failed"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_breakage_fails_its_check_with_a_fix(tmp_path: Path, bundle: Path,
                                                  breakage: str) -> None:
    node = healthy(tmp_path, bundle)
    damage, env, check, words = BREAKAGES[breakage]
    damage(node)
    result = node.doctor(env=env)
    assert result.code == 1, result.stdout + result.stderr
    assert statuses(result.stdout)[check] == "FAIL", result.stdout
    lines = result.stdout.splitlines()
    line = next(i for i, text in enumerate(lines) if text.startswith(f"FAIL {check}:"))
    assert words in lines[line], lines[line]
    assert lines[line + 1].startswith("     fix: ") and len(lines[line + 1]) > 15
    report = json.loads(node.doctor("--json", env=env).stdout)
    assert report["ok"] is False
    [failed] = [c for c in report["checks"] if c["check"] == check]
    assert failed["status"] == "FAIL" and words in failed["detail"] and failed["fix"]


def test_agent_units_not_installed_yet(tmp_path: Path, bundle: Path) -> None:
    node = healthy(tmp_path, bundle)
    for unit in AGENTS:
        set_unit(node, unit, LoadState="not-found", After="", Wants="")
    result = node.doctor()
    assert statuses(result.stdout)["unit-ordering"] == "PASS", result.stdout
    assert "(not installed yet)" in result.stdout


def test_json_escapes_what_it_quotes(tmp_path: Path, bundle: Path) -> None:
    node = healthy(tmp_path, bundle)
    smi = node.bin / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho \'a "quoted"\tback\\\\slash\'\nexit 3\n')
    report = json.loads(node.doctor("--json").stdout)
    [failed] = [c for c in report["checks"] if c["check"] == "nvidia-smi"]
    assert 'a "quoted"\tback\\slash' in failed["detail"]


def test_exit_codes_have_one_meaning_each(tmp_path: Path, bundle: Path) -> None:
    """0 all pass, 1 a check failed, 2 bad command line, 3 the installation is broken."""
    node = healthy(tmp_path, bundle)
    assert node.doctor().code == 0
    assert node.doctor("--bogus").code == 2
    (node.bin / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    assert node.doctor().code == 1
    (node.root / "opt/nvidia/current/node/lib.sh").unlink()
    incomplete = node.doctor()
    assert incomplete.code == 3, incomplete
    assert "FAIL modules: /opt/nvidia/current points at" in incomplete.stdout, incomplete
    assert "which lacks its startup.sh or node/lib.sh" in incomplete.stdout, incomplete


# --- cgroups: what the OS release can boot decides the advice ----------------------------------

V1_ARGS = "systemd.unified_cgroup_hierarchy=0 systemd.legacy_systemd_cgroup_controller"


def write_os_release(node: Node, ident: str | None, version: str = "",
                     *, quoted: bool = False) -> None:
    """/etc/os-release as Flatcar ships it (a link to /usr/lib/os-release) or CoreOS's, in
    the shapes of shared/reference/flatcar-update.md; ident None: none at all."""
    for path in (node.root / "etc/os-release", node.root / "usr/lib/os-release"):
        path.unlink(missing_ok=True)
    if ident is None:
        return
    v = f'"{version}"' if quoted else version
    text = {"flatcar": (
        f'NAME="Flatcar Container Linux by Kinvolk"\nID=flatcar\nID_LIKE=coreos\nVERSION={v}\n'
        f'VERSION_ID={v}\nBUILD_ID=2024-10-23-2058\nSYSEXT_LEVEL=1.0\n'
        f'PRETTY_NAME="Flatcar Container Linux by Kinvolk {version} (Oklo)"\n'
        'FLATCAR_BOARD="amd64-usr"\n'), "coreos": (
        f'NAME="Container Linux by CoreOS"\nID=coreos\nVERSION={v}\nVERSION_ID={v}\n'
        f'PRETTY_NAME="Container Linux by CoreOS {version} (Rhyolite)"\n'
        'COREOS_BOARD="amd64-usr"\n')}[ident]
    (node.root / "usr/lib").mkdir(parents=True, exist_ok=True)
    (node.root / "usr/lib/os-release").write_text(text)
    (node.root / "etc/os-release").symlink_to("../usr/lib/os-release")


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Node:
    """One healthy node for the cgroup cases: each sets the release and the mounts it needs."""
    return healthy(tmp_path_factory.mktemp("cgroups"), bundle)


ADVICE = "cgroup v2 device control (unreleased Mesos master) or another orchestrator"
CGROUP_CASES: dict[str, tuple[tuple[str | None, str, bool], bool, str, list[str], list[str],
                              list[str]]] = {
    # name: ((os, VERSION_ID, quoted), v1 mounted, status, words of the detail, words of the
    # fix, words the fix must not have)
    "flatcar 3975, v2 only": (("flatcar", "3975.2.2", False), False, "FAIL",
                              ["released Mesos (1.11, DC/OS's) cannot isolate GPUs",
                               "Flatcar 3975.2.2 can boot cgroup v1"],
                              [V1_ARGS, "grub.cfg", "stop below 4187",
                               "LTS channel, whose 4081 line"], []),
    "flatcar LTS 4081, v2 only": (("flatcar", "4081.3.6", False), False, "FAIL",
                                  ["Flatcar 4081.3.6 can boot cgroup v1"], [V1_ARGS], []),
    "flatcar 4186, v2 only": (("flatcar", "4186.1.0", False), False, "FAIL",
                              ["Flatcar 4186.1.0 can boot cgroup v1"], [V1_ARGS], []),
    "flatcar 4187, v2 only": (("flatcar", "4187.0.0", False), False, "FAIL",
                              ["Flatcar 4187.0.0 still boots cgroup v1, but the flatcar-postinst "
                               "of every later release refuses to update a cgroup v1 node"],
                              ["the choice: cgroup v1 here", V1_ARGS, "no more OS updates",
                               "LTS channel (4081", ADVICE], []),
    "flatcar 4229, v2 only": (("flatcar", "4229.1.0", True), False, "FAIL",
                              ["Flatcar 4229.1.0 still boots cgroup v1"], ["the choice"], []),
    "flatcar 4230, v2 only": (("flatcar", "4230.2.0", False), False, "FAIL",
                              ["Flatcar 4230.2.0 (systemd 256 or later) cannot boot cgroup v1"],
                              [ADVICE, "LTS channel (4081, systemd 255"],
                              ["unified_cgroup_hierarchy"]),
    "flatcar 4593 (stable 2026), quoted, v2 only": (
        ("flatcar", "4593.2.0", True), False, "FAIL",
        ["Flatcar 4593.2.0 (systemd 256 or later) cannot boot cgroup v1"], [ADVICE],
        ["unified_cgroup_hierarchy"]),
    "coreos 1855, v2 only": (("coreos", "1855.4.0", False), False, "FAIL",
                             ["CoreOS 1855.4.0 can boot cgroup v1"], [V1_ARGS], ["4187", "LTS"]),
    "no os-release, v2 only": ((None, "", False), False, "FAIL",
                               ["no cgroup v1 devices hierarchy is mounted (cgroup v2 only)"],
                               ["Flatcar below 4230", V1_ARGS, ADVICE], []),
    "flatcar LTS 4081, v1": (("flatcar", "4081.3.6", False), True, "PASS",
                             ["cgroup v1 devices hierarchy at /sys/fs/cgroup/devices "
                              "(Flatcar 4081.3.6)", "updates stop below 4187"], [], []),
    "coreos 1855, v1": (("coreos", "1855.4.0", False), True, "PASS",
                        ["cgroup v1 devices hierarchy at /sys/fs/cgroup/devices"], [], ["4187"]),
}


@pytest.mark.parametrize("case", CGROUP_CASES)
def test_the_cgroup_check_follows_the_os_release(one_node: Node, case: str) -> None:
    (ident, version, quoted), v1, status, detail, fix, not_in_fix = CGROUP_CASES[case]
    write_os_release(one_node, ident, version, quoted=quoted)
    (one_node.root / "proc/mounts").write_text(CGROUP_V1_MOUNTS if v1 else CGROUP_V2_MOUNTS)
    report = json.loads(one_node.doctor("--json").stdout)
    [check] = [c for c in report["checks"] if c["check"] == "cgroups"]
    assert check["status"] == status, check
    for words in detail:
        assert words in check["detail"], check["detail"]
    for words in fix:
        assert words in check["fix"], check["fix"]
    for words in not_in_fix:
        assert words not in check["fix"] and words not in check["detail"], check
    if status == "PASS":  # the one line stays one line
        text = one_node.doctor().stdout
        assert f"PASS cgroups: {check['detail']}\n" in text
