"""persistence = daemon | legacy | off, from the build to the node.

The build refuses daemon for a driver without nvidia-persistenced before it fetches any image.
install_nvidia.sh links, enables and (on a node, after nvidia.service) starts the bundle's
nvidia-persistenced.service, and takes it away again with a bundle that has none or with
--uninstall; startup.sh runs `nvidia-smi -pm 1` with legacy (or NVIDIA_PERSISTENCE_MODE=1);
nvidia-doctor's persistence check follows the bundle's setting. The node scripts run under
bash, dash and busybox sh against sysroots (tests/nodetree.py).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from coreos_gpu import build as build_stage
from coreos_gpu.config import KernelModuleType, Persistence, load_config
from coreos_gpu.errors import CoreosGpuError, ExitCode

from .bundletools import KERNEL, PERSISTENCED, VERSION, make_package
from .nodetree import SHELLS, Node, NodeBundles, Result, reseal, snapshot
from .test_build_refusals import _tiny_run
from .test_node_install import on_the_running_system

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
UNIT = "nvidia-persistenced.service"
LINK_TARGET = f"/opt/nvidia/current/node/{UNIT}"
SOCKET = "/var/run/nvidia-persistenced/socket"
GPUS = ("0000:00:1e.0", "0000:00:1f.0")
DAEMON, LEGACY, OFF = Persistence.DAEMON, Persistence.LEGACY, Persistence.OFF


@pytest.fixture(scope="module")
def bundles(node_bundles: NodeBundles) -> dict[Persistence, Path]:
    """One driver, a bundle for each setting (daemon's package has nvidia-persistenced)."""
    return {p: node_bundles.make(p.value, persistence=p) for p in Persistence}


def unit_link(node: Node) -> Path:
    return node.root / "etc/systemd/system" / UNIT


def systemctl(node: Node, *args: str) -> list[str]:
    """A call of the stand-in as install_nvidia.sh --root makes it."""
    return ["systemctl", f"--root={node.root}", *args]


def uninstall(node: Node) -> Result:
    return node.run(node.root / "opt/nvidia/current/install_nvidia.sh", "--root",
                    str(node.root), "--uninstall")


# --- the build -------------------------------------------------------------------------------

def test_the_build_refuses_daemon_without_the_daemon_before_any_image(  # type: ignore[no-untyped-def]
        cli, tmp_path: Path) -> None:
    """The tiny .run has no nvidia-persistenced; the mirror is a closed port, so reaching it
    would be exit 6, not 2."""
    args = ("build", "--driver-url", _tiny_run(tmp_path), "--driver-version", "535.261.03",
            "--mirror", "http://127.0.0.1:9", "--release", "3975.2.2",
            "--output", tmp_path / "nvidia.tar.gz")
    result = cli(*args)
    assert result.code == ExitCode.CONFIG, result.stderr
    assert result.error_lines == [
        "coreos-gpu: error: persistence = daemon runs bin/nvidia-persistenced, which the "
        "compute profile of driver 535.261.03 does not ship",
        'coreos-gpu: hint: set persistence = "legacy" (nvidia-smi -pm 1 at boot) or "off" '
        "(--persistence), or use a driver .run that has nvidia-persistenced"]
    assert not (tmp_path / "cache/coreos-gpu/downloads").exists()
    # legacy needs no binary of its own: the build goes on, to the mirror.
    legacy = cli(*args, "--persistence", "legacy")
    assert legacy.code == ExitCode.DOWNLOAD, legacy.stderr


class _Assembled(Exception):
    """Raised by the stand-in bundle stage: build() got that far."""


@pytest.mark.parametrize("persistence", list(Persistence))
@pytest.mark.parametrize("has_daemon", [True, False])
def test_the_build_hands_the_setting_to_the_bundle(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, persistence: Persistence,
        has_daemon: bool) -> None:
    """build() with stand-ins for the stages (the real compile: test_build): the bundle stage
    gets the setting, and daemon without the daemon stops before any developer container."""
    package = make_package(tmp_path / "driver", extra=PERSISTENCED if has_daemon else "")
    containers: list[str] = []
    nodes: list[Any] = []

    def prepare(config: Any, version: str) -> Any:
        containers.append(version)
        # Cache entries as the stages leave them: the build holds each while it runs.
        entry = tmp_path / "cache/coreos-gpu/devcontainers" / ("2" * 64)
        (entry / "root").mkdir(parents=True, exist_ok=True)
        (entry / "devroot.json").write_text("{}")
        return SimpleNamespace(root=entry / "root", kernel_release=KERNEL,
                               image_sha256="2" * 64, release=(
            SimpleNamespace(os=SimpleNamespace(value="flatcar"),
                            channel=SimpleNamespace(value="stable"), version=version,
                            canonical_image_url="https://example.invalid/image")))

    def build_modules(*args: Any, **kwargs: Any) -> Any:
        folder = tmp_path / "cache/coreos-gpu/modules" / ("3" * 64)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "modules.json").write_text("{}")
        return SimpleNamespace(compiled=0, folder=folder)

    def assemble(**kwargs: Any) -> Any:
        nodes.append(kwargs["node"])
        raise _Assembled

    monkeypatch.setattr(build_stage, "read_driver",
                        lambda config: (package, KernelModuleType.PROPRIETARY))
    monkeypatch.setattr(build_stage, "prepare_devcontainer", prepare)
    monkeypatch.setattr(build_stage, "build_modules", build_modules)
    monkeypatch.setattr(build_stage, "assemble_bundle", assemble)
    config = load_config({"persistence": persistence.value, "releases": ["3975.2.2"],
                          "cache_dir": str(tmp_path / "cache")}, None)
    if persistence is DAEMON and not has_daemon:
        with pytest.raises(CoreosGpuError) as error:
            build_stage.build(config)
        assert error.value.code is ExitCode.CONFIG
        assert containers == [] and nodes == []
        return
    with pytest.raises(_Assembled):
        build_stage.build(config)
    assert containers == ["3975.2.2"]
    assert [n.persistence for n in nodes] == [persistence]


# --- install_nvidia.sh -------------------------------------------------------------------------

@as_root
@pytest.mark.parametrize("shell", SHELLS)
def test_a_daemon_bundle_links_and_enables_its_unit(
        tmp_path: Path, bundles: dict[Persistence, Path], shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    result = node.install(bundles[DAEMON])
    assert result.code == 0, result.stderr
    assert os.readlink(unit_link(node)) == LINK_TARGET
    unit = (node.root / LINK_TARGET.lstrip("/")).read_text()
    assert unit.startswith(f"# Written by coreos-gpu for NVIDIA driver {VERSION}; ")
    env = (node.root / "opt/nvidia/current/node/bundle.env").read_text().splitlines()
    assert "PERSISTENCE=daemon" in env
    calls = node.calls("systemctl")
    assert calls.index(systemctl(node, "enable", "nvidia.service")) < calls.index(
        systemctl(node, "enable", UNIT))
    # Into a tree (--root), nothing starts.
    assert not [c for c in calls if "start" in c or "restart" in c]
    # What it runs is in the bundle.
    assert os.access(node.root / "opt/nvidia/current/bin/nvidia-persistenced", os.X_OK)


@as_root
@pytest.mark.parametrize("persistence", [LEGACY, OFF])
def test_without_the_daemon_there_is_no_unit(
        tmp_path: Path, bundles: dict[Persistence, Path], persistence: Persistence) -> None:
    node = Node(tmp_path)
    assert node.install(bundles[persistence]).code == 0
    assert not os.path.lexists(unit_link(node))
    assert not (node.root / LINK_TARGET.lstrip("/")).exists()
    assert not [c for c in node.calls("systemctl") if UNIT in c]
    env = (node.root / "opt/nvidia/current/node/bundle.env").read_text().splitlines()
    assert f"PERSISTENCE={persistence.value}" in env


@as_root
@pytest.mark.parametrize("shell", SHELLS)
def test_a_later_bundle_without_the_daemon_takes_its_unit_away(
        tmp_path: Path, bundles: dict[Persistence, Path], shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    assert node.install(bundles[DAEMON]).code == 0
    result = node.install(bundles[OFF])
    assert result.code == 0, result.stderr
    assert not os.path.lexists(unit_link(node))
    assert systemctl(node, "disable", UNIT) in node.calls()
    assert systemctl(node, "enable", UNIT) not in node.calls()
    # And back.
    assert node.install(bundles[DAEMON]).code == 0
    assert os.readlink(unit_link(node)) == LINK_TARGET


@as_root
@pytest.mark.parametrize(("first", "then"), [(DAEMON, OFF), (OFF, DAEMON)])
def test_an_upgrade_that_fails_leaves_the_unit_as_it_was(
        tmp_path: Path, bundles: dict[Persistence, Path], first: Persistence,
        then: Persistence) -> None:
    """systemctl enable fails after the unit's link came or went: the rollback puts it back."""
    node = Node(tmp_path)
    assert node.install(bundles[first]).code == 0
    before = snapshot(node.root)
    result = node.install(bundles[then], env={"FAKE_SYSTEMCTL_RC": "1"})
    assert result.code == 1, result.stderr
    assert result.errors == [
        "install_nvidia.sh: error: systemctl enable nvidia.service failed"], result.stderr
    assert snapshot(node.root) == before


@as_root
@pytest.mark.parametrize("shell", SHELLS)
def test_uninstall_removes_the_unit(tmp_path: Path, bundles: dict[Persistence, Path],
                                    shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    before = snapshot(node.root)
    assert node.install(bundles[DAEMON]).code == 0
    result = uninstall(node)
    assert result.code == 0, result.stderr
    assert systemctl(node, "disable", UNIT) in node.calls()
    assert snapshot(node.root) == before


@as_root
@pytest.mark.parametrize(("args", "fail", "code", "daemon_starts"), [
    ((), "", 0, True),
    ((), UNIT, 0, True),
    # The driver did not start: the daemon's Requires= would start nvidia.service again.
    ((), "nvidia.service", 20, False),
    (("--no-start",), "", 0, False),
], ids=["started", "the daemon will not start", "nvidia.service will not start", "--no-start"])
def test_on_a_node_the_daemon_starts_after_the_driver(
        tmp_path: Path, bundles: dict[Persistence, Path], args: tuple[str, ...], fail: str,
        code: int, daemon_starts: bool) -> None:
    """Without --root, as on a node (no GPU on its PCI: startup.sh loads nothing, and
    succeeds; on a real node the unit's ConditionPathExists=/dev/nvidiactl then skips it)."""
    node = Node(tmp_path)
    result = on_the_running_system(node, bundles[DAEMON] / "install_nvidia.sh", *args,
                                   env={"FAKE_START_FAIL": fail})
    assert result.code == code, result.stderr
    calls = [c[1:] for c in node.calls("systemctl")]
    assert ["enable", UNIT] in calls
    started = [c for c in calls if c[0] in ("start", "restart")]
    if args:
        assert started == []
    elif daemon_starts:
        assert started == [["start", "nvidia.service"], ["start", "--no-block", UNIT]]
    else:
        assert started == [["start", "nvidia.service"]]
    warnings = [line for line in result.stderr.splitlines() if ": warning: " in line]
    if fail == UNIT:
        assert warnings == [
            f"install_nvidia.sh: warning: cannot start {UNIT} (Failed to start {UNIT}: Unit "
            f"{UNIT} is masked.); it starts at the next boot, or now with: systemctl start "
            f"{UNIT}"]
    else:
        assert warnings == []


@as_root
def test_on_a_node_uninstall_stops_the_daemon_before_it_removes_it(
        tmp_path: Path, bundles: dict[Persistence, Path]) -> None:
    node = Node(tmp_path)
    assert on_the_running_system(node, bundles[DAEMON] / "install_nvidia.sh").code == 0
    gone = on_the_running_system(node, node.root / "opt/nvidia/current/install_nvidia.sh",
                                 "--uninstall")
    assert gone.code == 0, gone.stderr
    calls = [c[1:] for c in node.calls("systemctl")]
    assert calls.index(["stop", UNIT]) < calls.index(["disable", UNIT]), calls
    assert not os.path.lexists(unit_link(node))


@as_root
@pytest.mark.parametrize("value", ["sometimes", "", None], ids=["sometimes", "empty", "missing"])
def test_install_checks_the_persistence_in_bundle_env(
        tmp_path: Path, bundles: dict[Persistence, Path], value: str | None) -> None:
    """A bundle whose sums agree (resealed) but whose bundle.env has a PERSISTENCE the build
    never writes is refused whole; a bundle of this installer always has one."""
    node = Node(tmp_path)
    before = snapshot(node.root)
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-a", bundles[DAEMON], bad], check=True)
    env = bad / "node/bundle.env"
    env.write_text("".join(
        (f"PERSISTENCE={shlex.quote(value)}\n" if value is not None else "")
        if line.startswith("PERSISTENCE=") else line
        for line in env.read_text().splitlines(keepends=True)))
    reseal(bad)
    result = node.install(bad)
    assert result.code == 4, result.stderr
    shown = {"sometimes": "sometimes", "": "", None: ""}[value]
    assert result.errors == [
        f"install_nvidia.sh: error: the bundle in {bad} is unsafe: node/bundle.env: "
        f"PERSISTENCE={shown} is not a valid value; rebuild it with coreos-gpu build"]
    assert snapshot(node.root) == before


@as_root
def test_systemd_analyze_verify_the_daemons_unit(tmp_path: Path,
                                                bundles: dict[Persistence, Path]) -> None:
    """As installed, beside nvidia.service and an agent stand-in: any output fails."""
    node = Node(tmp_path / "node")
    assert node.install(bundles[DAEMON]).code == 0
    installed = (node.root / "opt/nvidia/current").resolve()
    units = tmp_path / "units"
    units.mkdir()
    for agent in ("dcos-mesos-slave.service", "dcos-mesos-slave-public.service"):
        (units / agent).write_text(
            "[Unit]\nDescription=DC/OS agent stand-in\n[Service]\nExecStart=/bin/true\n")
    shutil.copy(installed / "nvidia.service", units)
    shutil.copy(installed / "node" / UNIT, units)
    result = subprocess.run(
        ["bwrap", "--dev-bind", "/", "/", "--bind", node.root / "opt", "/opt",
         "env", f"SYSTEMD_UNIT_PATH={units}:", "systemd-analyze", "verify",
         units / "nvidia.service", units / UNIT],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stdout + result.stderr, (
        result.stdout + result.stderr)


# --- startup.sh --------------------------------------------------------------------------------

@as_root
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("persistence", "env", "runs_pm"), [
    (LEGACY, {}, True),
    (DAEMON, {}, False),
    (OFF, {}, False),
    # Kept for the nodes that set it before the setting: it works whatever the bundle says.
    (OFF, {"NVIDIA_PERSISTENCE_MODE": "1"}, True),
])
def test_startup_turns_persistence_mode_on_for_legacy(
        tmp_path: Path, bundles: dict[Persistence, Path], shell: str,
        persistence: Persistence, env: dict[str, str], runs_pm: bool) -> None:
    node = Node(tmp_path, shell=shell)
    assert node.install(bundles[persistence]).code == 0
    node.add_gpu(GPUS[0], 0)
    result = node.startup(env=env)
    assert result.code == 0, result.stderr
    assert (["nvidia-smi", "-pm", "1"] in node.calls("nvidia-smi")) is runs_pm


# --- nvidia-doctor -----------------------------------------------------------------------------

def started(tmp_path: Path, bundle: Path, shell: str = "sh") -> Node:
    """Installed, two GPUs, the driver loaded."""
    node = Node(tmp_path, shell=shell)
    assert node.install(bundle).code == 0
    for minor, bus in enumerate(GPUS):
        node.add_gpu(bus, minor)
    assert node.startup().code == 0
    return node


def persistence_check(node: Node) -> dict[str, str]:
    """The doctor's persistence check, as --json gives it; the text form says the same."""
    result = node.doctor("--json")
    checks = [c for c in json.loads(result.stdout)["checks"] if c["check"] == "persistence"]
    assert len(checks) == 1, result.stdout
    text = node.doctor().stdout.splitlines()
    line = f"{checks[0]['status']} persistence: {checks[0]['detail']}"
    assert line in text, text
    if checks[0]["status"] == "FAIL":
        assert text[text.index(line) + 1] == f"     fix: {checks[0]['fix']}"
    return {k: checks[0][k] for k in ("status", "detail", "fix")}


def daemon_running(node: Node, *, state: str = "active", socket: bool = True) -> None:
    """What systemd says of the unit, and the daemon's socket (/var/run is /run on Flatcar)."""
    folder = node.root / ".systemd" / UNIT
    folder.mkdir(parents=True)
    (folder / "ActiveState").write_text(f"{state}\n")
    (node.root / "var/run").symlink_to("../run")
    if socket:
        (node.root / "run/nvidia-persistenced").mkdir()
        # Bound by its relative name: a Unix socket's path is limited to 107 bytes.
        subprocess.run([sys.executable, "-c", "import socket; "
                        "socket.socket(socket.AF_UNIX).bind('socket')"],
                       cwd=node.root / "run/nvidia-persistenced", check=True)


def answer_query(node: Node, *modes: str) -> None:
    """nvidia-smi -q as NVIDIA's prints it: a Persistence Mode line for each GPU."""
    smi = node.bin / "nvidia-smi"
    anchor = '[ "$1" = -L ] || exit 0\n'
    assert anchor in smi.read_text()
    smi.write_text(smi.read_text().replace(
        anchor, f'[ "$1" = -q ] && {{ cat "$FAKE_ROOT/.smi-query"; exit 0; }}\n{anchor}'))
    (node.root / ".smi-query").write_text(
        "\n==============NVSMI LOG==============\n\n"
        f"Driver Version                            : {VERSION}\n"
        f"Attached GPUs                             : {len(modes)}\n" + "".join(
            f"GPU 00000000:00:1{'ef'[i]}.0\n"
            "    Product Name                          : Tesla V100-SXM2-16GB\n"
            "    Display Mode                          : Disabled\n"
            f"    Persistence Mode                      : {mode}\n"
            "    Accounting Mode                       : Disabled\n"
            for i, mode in enumerate(modes)))


NOT_ACTIVE_FIX = ("systemctl status nvidia-persistenced.service says why; then systemctl start "
                  "nvidia-persistenced.service")
LEGACY_FIX = ("nvidia-smi -pm 1; startup.sh runs it at every boot, and journalctl -u "
              "nvidia.service says why it did not take")


@as_root
@pytest.mark.parametrize("shell", SHELLS)
def test_doctor_daemon_active_with_its_socket_passes(
        tmp_path: Path, bundles: dict[Persistence, Path], shell: str) -> None:
    node = started(tmp_path, bundles[DAEMON], shell)
    daemon_running(node)
    assert persistence_check(node) == {
        "status": "PASS", "fix": "",
        "detail": f"daemon (bundle setting): {UNIT} is active, its socket is {SOCKET}"}


@as_root
@pytest.mark.parametrize(("state", "socket", "detail", "fix"), [
    ("inactive", False, f"{UNIT} is inactive, so the driver tears each GPU down between jobs",
     NOT_ACTIVE_FIX),
    ("failed", True, f"{UNIT} is failed, so the driver tears each GPU down between jobs",
     NOT_ACTIVE_FIX),
    ("active", False, f"{UNIT} is active, but its socket {SOCKET} is missing",
     f"systemctl restart {UNIT}; systemctl status {UNIT} says why it does not listen"),
])
def test_doctor_daemon_down_fails_with_its_fix(
        tmp_path: Path, bundles: dict[Persistence, Path], state: str, socket: bool,
        detail: str, fix: str) -> None:
    node = started(tmp_path, bundles[DAEMON])
    daemon_running(node, state=state, socket=socket)
    assert persistence_check(node) == {
        "status": "FAIL", "detail": f"daemon (bundle setting): {detail}", "fix": fix}
    assert node.doctor().code == 1


@as_root
@pytest.mark.parametrize("persistence", [DAEMON, LEGACY])
def test_doctor_without_the_driver_says_so(
        tmp_path: Path, bundles: dict[Persistence, Path], persistence: Persistence) -> None:
    """Not loaded: the daemon cannot run and nvidia-smi cannot answer; the check names the
    cause, as device-nodes does, rather than a stopped daemon or a failed query."""
    node = Node(tmp_path)
    assert node.install(bundles[persistence]).code == 0
    node.add_gpu(GPUS[0], 0)
    assert persistence_check(node) == {
        "status": "FAIL", "fix": "systemctl restart nvidia.service",
        "detail": f"{persistence.value} (bundle setting): the nvidia module is not loaded, so "
                  "persistence cannot be checked"}


@as_root
@pytest.mark.parametrize("shell", SHELLS)
def test_doctor_legacy_reads_nvidia_smi(tmp_path: Path, bundles: dict[Persistence, Path],
                                        shell: str) -> None:
    node = started(tmp_path, bundles[LEGACY], shell)
    answer_query(node, "Enabled", "Enabled")
    assert persistence_check(node) == {
        "status": "PASS", "fix": "",
        "detail": "legacy (bundle setting): persistence mode is Enabled on 2 GPU(s) "
                  "(nvidia-smi -q)"}
    answer_query(node, "Enabled", "Disabled")
    assert persistence_check(node) == {
        "status": "FAIL", "fix": LEGACY_FIX,
        "detail": "legacy (bundle setting): persistence mode is not Enabled on 1 of 2 GPU(s) "
                  "(nvidia-smi -q)"}
    answer_query(node)
    assert persistence_check(node) == {
        "status": "FAIL", "fix": LEGACY_FIX,
        "detail": "legacy (bundle setting): nvidia-smi -q shows no GPU's Persistence Mode"}


@as_root
def test_doctor_legacy_when_nvidia_smi_fails(tmp_path: Path,
                                            bundles: dict[Persistence, Path]) -> None:
    node = started(tmp_path, bundles[LEGACY])
    result = node.doctor("--json", env={"FAKE_SMI_FAIL": "1"})
    [check] = [c for c in json.loads(result.stdout)["checks"] if c["check"] == "persistence"]
    assert check["status"] == "FAIL"
    assert check["detail"].startswith("legacy (bundle setting): nvidia-smi -q failed: NVIDIA-SMI "
                                      "has failed")


@as_root
def test_doctor_off(tmp_path: Path, bundles: dict[Persistence, Path]) -> None:
    node = started(tmp_path, bundles[OFF])
    assert persistence_check(node) == {"status": "PASS", "detail": "off (bundle setting)",
                                       "fix": ""}
    # A bundle from before the setting has no PERSISTENCE: off.
    env = node.root / "opt/nvidia/current/node/bundle.env"
    env.write_text("".join(line for line in env.read_text().splitlines(keepends=True)
                           if not line.startswith("PERSISTENCE=")))
    assert persistence_check(node)["detail"] == "off (bundle setting)"
    # NVIDIA_PERSISTENCE_MODE=1 makes startup.sh run nvidia-smi -pm 1: checked as legacy.
    (node.root / "etc/default").mkdir()
    (node.root / "etc/default/nvidia").write_text('NVIDIA_PERSISTENCE_MODE="1"\n')
    answer_query(node, "Enabled", "Enabled")
    assert persistence_check(node) == {
        "status": "PASS", "fix": "",
        "detail": "legacy (NVIDIA_PERSISTENCE_MODE=1 in /etc/default/nvidia): persistence "
                  "mode is Enabled on 2 GPU(s) (nvidia-smi -q)"}
