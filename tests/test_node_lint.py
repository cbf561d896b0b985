"""Linters as tests for the node side: shellcheck and a parse by each shell for the
scripts (each file as it is in the package, and each shipped script as the build joins its
parts), files small enough to hold in one's head, `systemd-analyze verify` for the units as
a build renders them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from coreos_gpu.config import DriverFailurePolicy
from coreos_gpu.node import InlineError, default_node_files, inline_sources

from .nodetree import SHELLS, Node, make_bundle

RESOURCES = Path(__file__).resolve().parents[1] / "src/coreos_gpu/resources"
NODE = RESOURCES / "node"
PROVISION = RESOURCES / "provision"
# Every file of the node side, units and settings included.
NODE_FILES = sorted(p for folder in (NODE, PROVISION) for p in folder.iterdir() if p.is_file())
# The sh among them: a script (#!/bin/sh) or a part of one (*.sh, sourced or copied in).
SCRIPTS = [p for p in NODE_FILES if p.suffix == ".sh" or p.read_bytes().startswith(b"#!/bin/sh")]
# What a bundle or `coreos-gpu render` ships with its parts joined by the build; lib.sh is
# what startup.sh and fetch.sh source on the node.
SHIPPED = ("install_nvidia.sh", "boot.sh", "nvidia-doctor", "startup.sh", "fetch.sh", "lib.sh")
# Shellcheck's findings that a part's own file-wide directives settle, and that lose their
# file-wide reach once the part is copied into the middle of a script: variables for the
# includer (SC2034), "A && B || C" (SC2015), names another part defines (SC2153); also a
# file sourced at run time (SC1091) and lib.sh's functions a script does not call (SC2317).
JOINED_EXCLUDE = "SC2034,SC2015,SC2153,SC1091,SC2317"
MAX_LINES = 300


def _shellcheck(script: Path, *options: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: scripts/test installs it")
    return subprocess.run(["shellcheck", "--shell=sh", *options, script.name], cwd=script.parent,
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    result = _shellcheck(script, "-x")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_shell_parses_it(shell: str, script: Path) -> None:
    result = subprocess.run([*shell.split(), "-n", script], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0 and not result.stderr, result.stderr


def _shipped(name: str, folder: Path) -> Path:
    """The script as the build joins it (node.py inline_sources), written into folder."""
    source = PROVISION / name if name == "provision.sh" else NODE / name
    joined = folder / name
    joined.write_bytes(inline_sources(source.read_bytes(), default_node_files(),
                                      name=None if name == "provision.sh" else name))
    assert b"# coreos-gpu: inline" not in joined.read_bytes()
    return joined


@pytest.mark.parametrize("name", [*SHIPPED, "provision.sh"])
def test_the_shipped_script_passes_shellcheck_and_every_shell(name: str, tmp_path: Path) -> None:
    joined = _shipped(name, tmp_path)
    result = _shellcheck(joined, f"--exclude={JOINED_EXCLUDE}")
    assert result.returncode == 0, result.stdout + result.stderr
    for shell in SHELLS:
        parsed = subprocess.run([*shell.split(), "-n", joined], capture_output=True, text=True,
                                check=False)
        assert parsed.returncode == 0 and not parsed.stderr, (shell, parsed.stderr)


def _too_long(paths: list[Path]) -> list[str]:
    """Each file over MAX_LINES lines, with its count."""
    counts = {p: len(p.read_bytes().splitlines()) for p in paths}
    return [f"{p.name}: {n} lines" for p, n in counts.items() if n > MAX_LINES]


def test_every_node_file_fits_in_one_head() -> None:
    """No node file over 300 lines (STYLE.md: files small enough to hold in your head): a
    script that grows splits into parts by job, joined by the build's inline."""
    assert _too_long(NODE_FILES) == []


def test_a_file_over_the_limit_is_found(tmp_path: Path) -> None:
    (tmp_path / "fits.sh").write_text("x\n" * MAX_LINES)
    (tmp_path / "long.sh").write_text("x\n" * (MAX_LINES + 1))
    assert _too_long(sorted(tmp_path.iterdir())) == [f"long.sh: {MAX_LINES + 1} lines"]


# --- the build-time inline (node.py inline_sources) ------------------------------------------

def _line(name: str) -> str:
    return f'. "${{0%/*}}/{name}" # coreos-gpu: inline\n'


def test_inline_is_recursive_and_copies_each_part_once(tmp_path: Path) -> None:
    (tmp_path / "a.sh").write_text("A=1\n" + _line("c.sh"))
    (tmp_path / "b.sh").write_text("B=1\n" + _line("c.sh") + _line("a.sh"))
    (tmp_path / "c.sh").write_text("C=1\n")
    joined = inline_sources(("#!/bin/sh\n" + _line("a.sh") + _line("b.sh") + "echo end\n").encode(),
                            tmp_path, name="main.sh").decode()
    assert [line for line in joined.splitlines() if not line.startswith("# ")] == [
        "#!/bin/sh", "A=1", "C=1", "B=1", "echo end"]
    assert "coreos-gpu: inline" not in joined
    assert joined.count("# --- node/c.sh, copied in by coreos-gpu ---") == 1


@pytest.mark.parametrize(("parts", "error"), [
    ({"a.sh": _line("b.sh"), "b.sh": _line("a.sh")},
     "node/main.sh inlines a.sh inlines b.sh inlines a.sh: a cycle"),
    ({"a.sh": _line("a.sh")}, "node/main.sh inlines a.sh inlines a.sh: a cycle"),
    ({"a.sh": _line("main.sh"), "main.sh": ""},
     "node/main.sh inlines a.sh inlines main.sh: a cycle"),
    ({"a.sh": _line("gone.sh")}, "node/a.sh inlines node/gone.sh, which is missing"),
])
def test_inline_refuses_a_cycle_or_a_missing_part(tmp_path: Path, parts: dict[str, str],
                                                   error: str) -> None:
    for name, text in parts.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(InlineError, match=error):
        inline_sources(_line("a.sh").encode(), tmp_path, name="main.sh")


def test_every_shipped_script_joins(tmp_path: Path) -> None:
    """The package's own parts: none missing, no cycle, each copied in once."""
    for name in [*SHIPPED, "provision.sh"]:
        text = _shipped(name, tmp_path).read_text()
        parts = re.findall(r"^# --- node/(\S+), copied in by coreos-gpu ---$", text, re.M)
        assert parts and len(parts) == len(set(parts)), (name, parts)


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
