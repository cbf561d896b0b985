"""Linters as tests for the node side: shellcheck and a parse by each shell for the
scripts, `systemd-analyze verify` for the units as a build renders them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from coreos_gpu.config import DriverFailurePolicy

from .nodetree import SHELLS, Node, make_bundle

NODE = Path(__file__).resolve().parents[1] / "src/coreos_gpu/resources/node"
SCRIPTS = ("install_nvidia.sh", "startup.sh", "boot.sh", "nvidia-doctor", "lib.sh", "fetch.sh",
           "repository.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: scripts/test installs it")
    result = subprocess.run(["shellcheck", "-x", "--shell=sh", script], cwd=NODE,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_shell_parses_it(shell: str, script: str) -> None:
    result = subprocess.run([*shell.split(), "-n", NODE / script], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0 and not result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
@pytest.mark.parametrize("policy", list(DriverFailurePolicy))
def test_systemd_analyze_verify(tmp_path: Path, policy: DriverFailurePolicy) -> None:
    """The unit and the drop-in (on a stand-in agent unit) as installed: verify warns on
    stderr about unknown keys and bad values, so any output fails the test."""
    ko_dir = tmp_path / "ko"
    ko_dir.mkdir()
    node = Node(tmp_path / "node")
    assert node.install(make_bundle(tmp_path / "b", ko_dir, policy=policy)).code == 0
    installed = (node.root / "opt/nvidia/current").resolve()
    units = tmp_path / "units"
    (units / "dcos-mesos-slave.service.d").mkdir(parents=True)
    (units / "dcos-mesos-slave.service").write_text(
        "[Unit]\nDescription=DC/OS agent stand-in\n[Service]\nExecStart=/bin/true\n"
        "EnvironmentFile=/etc/os-release\n[Install]\nWantedBy=multi-user.target\n")
    shutil.copy(installed / "node/agent-dropin.conf",
                units / "dcos-mesos-slave.service.d/coreos-gpu.conf")
    shutil.copy(installed / "nvidia.service", units)
    # ExecStart= must exist: the installed /opt in place of the host's, in a sandbox.
    result = subprocess.run(
        ["bwrap", "--dev-bind", "/", "/", "--bind", node.root / "opt", "/opt",
         "env", f"SYSTEMD_UNIT_PATH={units}:", "systemd-analyze", "verify",
         units / "nvidia.service", units / "dcos-mesos-slave.service"],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stdout + result.stderr, (
        result.stdout + result.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
def test_systemd_analyze_verify_the_repository_units(tmp_path: Path) -> None:
    """A bundle built with a repository: nvidia.service waits for the network, and the
    retry timer, its service and the staging watcher verify cleanly, as installed."""
    from coreos_gpu.keys import write_key_pair
    from coreos_gpu.repository import load_trust

    ko_dir = tmp_path / "ko"
    ko_dir.mkdir()
    keys = write_key_pair(tmp_path / "keys" / "repo.key")
    node = Node(tmp_path / "node")
    bundle = make_bundle(tmp_path / "b", ko_dir, repository=load_trust(
        "https://repository.example/gpu", str(keys.public)))
    assert node.install(bundle).code == 0
    installed = (node.root / "opt/nvidia/current").resolve()
    units = tmp_path / "units"
    units.mkdir()
    (units / "dcos-mesos-slave.service").write_text(
        "[Unit]\nDescription=DC/OS agent stand-in\n[Service]\nExecStart=/bin/true\n")
    names = ["nvidia-retry.timer", "nvidia-retry.service", "nvidia-stage.service"]
    shutil.copy(installed / "nvidia.service", units)
    for name in names:
        shutil.copy(installed / "node" / name, units)
    # The watcher's condition: update_engine_client exists on Flatcar, not here.
    result = subprocess.run(
        ["bwrap", "--dev-bind", "/", "/", "--bind", node.root / "opt", "/opt",
         "env", f"SYSTEMD_UNIT_PATH={units}:", "systemd-analyze", "verify",
         units / "nvidia.service", *(units / n for n in names)],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stdout + result.stderr, (
        result.stdout + result.stderr)
