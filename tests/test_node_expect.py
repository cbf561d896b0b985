"""install_nvidia.sh --expect-sha256 HEX: the bundle pinned by the sha256 of its SHA256SUMS,
the contents sha256 `coreos-gpu inspect` shows. A bundle whose files and SHA256SUMS were
rewritten to agree (which the sums alone cannot catch) is refused, and the node stays byte
for byte as it was. Runs the real script under bash, dash and busybox sh."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from coreos_gpu.inspection import inspect_bundle

from .bundletools import VERSION
from .nodetree import SHELLS, Node, reseal, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")


@pytest.fixture(scope="module")
def contents_sha256(bundle: Path) -> str:
    """What the operator reads from inspect, and gives the node."""
    report = inspect_bundle(bundle.parent / "nvidia.tar.gz")
    assert report.ok, report.problems
    return report.contents_sha256


@pytest.fixture(scope="module")
def resealed(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle with nvidia-smi replaced, and node/contents and SHA256SUMS rewritten to
    match: what someone who can write to the extracted folder makes of it."""
    other = tmp_path_factory.mktemp("resealed") / "bundle"
    subprocess.run(["cp", "-a", bundle, other], check=True)
    (other / f"payload/{VERSION}/bin/nvidia-smi").write_text("#!/bin/sh\nid >/tmp/owned\n")
    reseal(other)
    return other


def sums_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / "SHA256SUMS").read_bytes()).hexdigest()


def refusal(bundle: Path, found: str, expected: str) -> str:
    return (f"install_nvidia.sh: error: the extracted bundle in {bundle} is not the one you "
            f"expect: its SHA256SUMS has sha256 {found}, not {expected} (--expect-sha256); "
            "extract the archive again, where only root can write")


@pytest.mark.parametrize("shell", SHELLS)
def test_the_contents_sha256_inspect_shows_installs(tmp_path: Path, bundle: Path,
                                                    contents_sha256: str, shell: str) -> None:
    assert contents_sha256 == sums_sha256(bundle)
    node = Node(tmp_path, shell=shell)
    result = node.install(bundle, "--expect-sha256", contents_sha256)
    assert result.code == 0, result.stderr
    # The bundle id on the node is its first 12 digits.
    assert os.readlink(node.root / "opt/nvidia/current") == f"{VERSION}-{contents_sha256[:12]}"
    # Installed already: the installed folder's SHA256SUMS is what counts.
    before = snapshot(node.root)
    again = node.install(bundle, f"--expect-sha256={contents_sha256}")
    assert again.code == 0, again.stderr
    other = node.install(bundle, "--expect-sha256", "0" * 64)
    assert other.code == 4, other.stderr
    assert other.errors == [
        f"install_nvidia.sh: error: the bundle in {bundle} (installed already in "
        f"/opt/nvidia/{VERSION}-{contents_sha256[:12]}) is not the one you expect: its "
        f"SHA256SUMS has sha256 {contents_sha256}, not {'0' * 64} (--expect-sha256); extract "
        "the archive again, where only root can write"]
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
def test_a_bundle_resealed_with_other_files_is_refused_and_changes_nothing(
        tmp_path: Path, bundle: Path, resealed: Path, contents_sha256: str,
        shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    assert node.install(bundle).code == 0  # the driver in use
    before = snapshot(node.root)
    result = node.install(resealed, "--expect-sha256", contents_sha256)
    assert result.code == 4, result.stderr
    assert result.errors == [refusal(resealed, sums_sha256(resealed), contents_sha256)]
    assert snapshot(node.root) == before
    # Only the expected sha256 stood in its way: its sums hold, and without it, it installs.
    assert node.install(resealed).code == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_a_dry_run_checks_it_on_the_extracted_files(tmp_path: Path, bundle: Path,
                                                    resealed: Path, contents_sha256: str,
                                                    shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    before = snapshot(node.root)
    result = node.install(bundle, "--dry-run", "--expect-sha256", contents_sha256)
    assert result.code == 0, result.stderr
    assert "dry run: nothing was changed" in result.stderr
    refused = node.install(resealed, "--dry-run", "--expect-sha256", contents_sha256)
    assert refused.code == 4, refused.stderr
    assert refused.errors == [refusal(resealed, sums_sha256(resealed), contents_sha256)]
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
def test_a_value_that_is_no_sha256_is_a_bad_command_line(tmp_path: Path, bundle: Path,
                                                          contents_sha256: str,
                                                          shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    before = snapshot(node.root)
    for args in (["--expect-sha256", contents_sha256.upper()],
                 ["--expect-sha256", contents_sha256[:-1]],
                 [f"--expect-sha256={contents_sha256}0"],
                 ["--expect-sha256", "g" * 64], ["--expect-sha256="]):
        result = node.install(bundle, *args)
        assert result.code == 2, (args, result.stderr)
        [error] = result.errors
        assert error.endswith("is not a sha256: give the 64 lower-case hex digits "
                              "coreos-gpu inspect shows as contents sha256"), args
    missing = node.install(bundle, "--expect-sha256")
    assert missing.code == 2 and "usage: install_nvidia.sh" in missing.stderr
    uninstall = node.install(bundle, "--uninstall", "--expect-sha256", contents_sha256)
    assert uninstall.code == 2
    assert uninstall.errors == ["install_nvidia.sh: error: --expect-sha256 names a bundle to "
                                "install; --uninstall installs none"]
    assert snapshot(node.root) == before
