"""SIGKILL install_nvidia.sh at every external command it runs (before the command and
after it), then run it again.

Right after each kill the node has the old driver or the new one, complete — never a mix
and never a partial folder under a real name. After the re-run the node is exactly what an
uninterrupted install makes, with nothing left in temporary places.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .nodetree import Node, make_bundle, snapshot
from .test_bundle import VERSION

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")]

# Every external command install_nvidia.sh may run; each call is a kill point.
COMMANDS = ("cp", "mv", "ln", "rm", "mkdir", "rmdir", "mktemp", "sha256sum", "find", "sed",
            "awk", "sort", "head", "cut", "du", "df", "readlink", "dirname", "cat", "chmod",
            "chown", "stat", "xargs", "openssl", "nproc", "ls", "sync", "flock", "tr", "grep",
            "id", "uname", "ldconfig", "systemctl")
# A wrapper counts calls under a lock (pipelines run in parallel), and at call KILL_AT
# kills its whole process group — the install and everything it started — before or after
# running the real command.
KILLER = """#!/bin/sh
PATH=${PATH#*:}  # the wrappers' own folder is first
n=$(flock "$KILL_STATE.lock" /bin/sh -c \
    'n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 )); echo "$n" >"$1"; echo "$n"' _ "$KILL_STATE")
[ "$n" = "$KILL_AT" ] && [ "$KILL_WHEN" = before ] && kill -s KILL 0
"${0##*/}" "$@"
rc=$?
[ "$n" = "$KILL_AT" ] && [ "$KILL_WHEN" = after ] && kill -s KILL 0
exit "$rc"
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("faults")
    ko_dir = folder / "ko"
    ko_dir.mkdir()
    return make_bundle(folder / "old", ko_dir), make_bundle(folder / "new", ko_dir,
                                                            tool_version="0.2.0")


def bundle_name(bundle: Path) -> str:
    return f"{VERSION}-{hashlib.sha256((bundle / 'SHA256SUMS').read_bytes()).hexdigest()[:12]}"


def complete(root: Path, name: str) -> bool:
    """The installed folder holds every file of its bundle, intact."""
    folder = root / "opt/nvidia" / name
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return False
    for line in sums.read_text().splitlines():
        digest, path = line.split("  ", 1)
        target = folder / path.removeprefix(f"payload/{VERSION}/")
        if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != digest:
            return False
    return True


class Killer:
    def __init__(self, folder: Path, node: Node) -> None:
        self.bin = folder / "killer-bin"
        self.state = folder / "killer-count"
        self.bin.mkdir()
        for name in COMMANDS:
            (self.bin / name).write_text(KILLER)
            (self.bin / name).chmod(0o755)
        self.node = node

    def install(self, bundle: Path, root: Path, *, at: int = 0, when: str = "") -> int:
        self.state.write_text("0")
        env = {**self.node.env, "FAKE_ROOT": str(root), "KILL_STATE": str(self.state),
               "KILL_AT": str(at), "KILL_WHEN": when,
               "PATH": f"{self.bin}:{self.node.env['PATH']}"}
        proc = subprocess.Popen(["sh", bundle / "install_nvidia.sh", "--root", root], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the install and all it started
            raise

    def calls(self) -> int:
        return int(self.state.read_text())


def check_faults(tmp_path: Path, start: Path, bundle: Path, old: str | None) -> int:
    """Kill an install of bundle over the root `start` at every point; return how many."""
    node = Node(tmp_path / "node")
    killer = Killer(tmp_path, node)
    new = bundle_name(bundle)
    reference = tmp_path / "reference"
    shutil.copytree(start, reference, symlinks=True)
    assert killer.install(bundle, reference) == 0
    expected = snapshot(reference)
    total = killer.calls()
    points = 0
    for at in range(1, total + 1):
        for when in ("before", "after"):
            root = tmp_path / f"root-{at}-{when}"
            shutil.copytree(start, root, symlinks=True)
            code = killer.install(bundle, root, at=at, when=when)
            assert code == -signal.SIGKILL, (at, when, code)
            points += 1
            current = root / "opt/nvidia/current"
            # Right after the kill: the old driver or the new one, complete.
            if current.is_symlink():
                assert os.readlink(current) in (old, new), (at, when)
                assert complete(root, os.readlink(current)), (at, when)
            else:
                assert old is None, (at, when)
            for entry in (root / "opt/nvidia").glob(f"{VERSION}-*"):
                assert complete(root, entry.name), (at, when, entry.name)
            # Then a run to the end gives what an uninterrupted install gives.
            assert killer.install(bundle, root) == 0, (at, when)
            assert snapshot(root) == expected, (at, when)
            shutil.rmtree(root)
    return points


def test_killed_first_install(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    start = tmp_path / "empty"
    Node(start)  # the fake /sys, /proc, /dev
    points = check_faults(tmp_path, start / "root", bundles[0], old=None)
    assert points >= 50, points
    print(f"{points} kill points")


def test_killed_upgrade(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    node = Node(tmp_path / "before")
    assert node.install(bundles[0]).code == 0
    points = check_faults(tmp_path, node.root, bundles[1], old=bundle_name(bundles[0]))
    assert points >= 50, points
    print(f"{points} kill points")
