"""A node never ends worse than it began: inputs and node states that must be refused with
one line of ours (not the shell's), a distinct exit code, and the root as it was. Each runs
the real scripts under bash, dash and busybox sh against a sysroot (tests/nodetree.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from coreos_gpu.keys import write_key_pair
from coreos_gpu.repository import load_trust

from .nodetree import SHELLS, Node, make_bundle, snapshot
from .test_bundle import CLOUD

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One driver with a repository (never reached): for KERNEL, and for CLOUD."""
    folder = tmp_path_factory.mktemp("refusals")
    (folder / "ko").mkdir()
    keys = write_key_pair(folder / "keys/repo.key")
    trust = load_trust("http://127.0.0.1:9/repo", str(keys.public))
    return (make_bundle(folder / "a", folder / "ko", repository=trust),
            make_bundle(folder / "b", folder / "ko", kernels=(CLOUD,), repository=trust))


@pytest.fixture
def bundle(bundles: tuple[Path, Path]) -> Path:
    return bundles[0]


def installed(tmp_path: Path, bundle: Path, shell: str) -> Node:
    """A node with the bundle's driver installed and working."""
    node = Node(tmp_path, shell=shell)
    assert node.install(bundle).code == 0
    return node


def copy_of(bundle: Path, where: Path) -> Path:
    subprocess.run(["cp", "-a", bundle, where], check=True)
    return where


@pytest.mark.parametrize("shell", SHELLS)
def test_a_half_extracted_bundle_is_incomplete_never_an_installed_driver(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    """tar stopped midway (a truncated download): install_nvidia.sh and node/ are there,
    payload/ is not. The advice used to be --uninstall, which removes the working driver."""
    node = installed(tmp_path, bundle, shell)
    before = snapshot(node.root)
    half = copy_of(bundle, tmp_path / "half")
    subprocess.run(["rm", "-rf", half / "payload"], check=True)
    result = node.install(half)
    assert result.code == 4, result.stderr
    assert result.errors == [
        f"install_nvidia.sh: error: {half} is not a whole coreos-gpu bundle (no "
        "payload/<driver version>/); extract the whole archive"]
    assert "uninstall" not in result.stderr
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
def test_stage_reads_nothing_before_the_bundles_structure_is_checked(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    """A FIFO as node/bundle.env used to hang the root-run --stage forever."""
    node = installed(tmp_path, bundle, shell)
    before = snapshot(node.root)
    bad = copy_of(bundle, tmp_path / "bad")
    (bad / "node/bundle.env").unlink()
    os.mkfifo(bad / "node/bundle.env")
    result = node.install(bad, "--stage")  # Node.run gives up after 120 s
    assert result.code == 4, result.stderr
    assert result.errors == [
        f"install_nvidia.sh: error: the bundle in {bad} is corrupt: node/bundle.env: not a "
        "regular file; download and extract it again"]
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("script", ["install", "fetch", "startup"])
def test_a_lock_file_that_cannot_be_opened_is_one_line_of_ours(
        tmp_path: Path, bundles: tuple[Path, Path], shell: str, script: str) -> None:
    """`exec 9>>LOCK || die` cannot work in a POSIX shell: the failed redirection of a special
    builtin ends the script before `die` (dash exits 2, bash as sh and busybox 1), with only
    the shell's words. Something in the lock file's place (here a folder) is one way; a
    read-only /opt/nvidia is another."""
    bundle, cloud = bundles
    node = installed(tmp_path, bundle, shell)
    # The other kernel's folder staged beside it: a boot into that kernel switches to it.
    assert node.install(cloud, "--stage").code == 0
    lock = node.root / "opt/nvidia" / (".fetch.lock" if script == "fetch" else ".lock")
    lock.unlink(missing_ok=True)
    lock.mkdir()
    before = snapshot(node.root)
    if script == "install":
        result = node.install(bundle)
    elif script == "fetch":  # a fetch takes the fetch lock before anything else
        result = node.fetch("--kernel", CLOUD)
    else:  # a boot into the other kernel takes the install lock to switch `current`
        result = node.startup(env={"FAKE_KERNEL": CLOUD})
    assert result.errors == [
        f"{result.errors[0].split(':')[0]}: error: cannot open the lock file {lock} (a "
        "read-only file system, or something else in its place); make "
        f"{lock.parent} writable and run me again"], result.stderr
    assert result.code == 1
    assert [line for line in result.stderr.splitlines() if str(lock) in line
            and ": error: " not in line] == [], "the shell's own words"
    assert snapshot(node.root) == before
