"""`coreos-gpu build` refuses a driver before it fetches any image: a flavour the driver lacks,
a .run that is not the pinned one (driver_sha256). Fast: a tiny .run and a closed mirror."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from coreos_gpu.errors import ExitCode
from testinputs.nvidia_run import write_run

from .test_manifest import NEW_HEADER


def _tiny_run(tmp_path: Path) -> Path:
    """A .run of NVIDIA's shape with only kernel/ (no kernel-open/) and one library."""
    tree = tmp_path / "tree"
    (tree / "kernel").mkdir(parents=True)
    (tree / "kernel/Makefile").write_text("modules:\n")
    (tree / "libnvidia-ml.so.535.261.03").write_text("elf\n")
    (tree / ".manifest").write_text(
        NEW_HEADER + "kernel/Makefile 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman\n"
        "libnvidia-ml.so.535.261.03 0755 UTILITY_LIB NATIVE MODULE:nvml\n"
        "libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.535.261.03 "
        "MODULE:nvml\n")
    run_file = tmp_path / "NVIDIA-Linux-x86_64-535.261.03.run"
    write_run(tree, run_file)
    return run_file


def test_open_flavour_of_a_driver_without_kernel_open_is_refused_before_any_image(
        cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The mirror is a closed port: touching it would be exit 6, not 2.
    result = cli("build", "--driver-url", _tiny_run(tmp_path), "--driver-version", "535.261.03",
                 "--kernel-module-type", "open", "--mirror", "http://127.0.0.1:9",
                 "--release", "3975.2.2", "--output", tmp_path / "nvidia.tar.gz")
    assert result.code == ExitCode.CONFIG, result.stderr
    assert result.error_lines == [
        "coreos-gpu: error: driver 535.261.03 has no open kernel modules (kernel-open/)",
        "coreos-gpu: hint: use --kernel-module-type proprietary"]
    assert not (tmp_path / "cache/coreos-gpu/downloads").exists()


def test_a_run_that_is_not_the_pinned_one_builds_nothing(cli, http_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run_file = _tiny_run(tmp_path)
    (http_dir.root / run_file.name).write_bytes(run_file.read_bytes())
    url = f"{http_dir.url}/{run_file.name}"
    result = cli("build", "--driver-url", url, "--driver-version", "535.261.03",
                 "--driver-sha256", "0" * 64, "--mirror", "http://127.0.0.1:9",
                 "--release", "3975.2.2", "--output", tmp_path / "nvidia.tar.gz")
    assert result.code == ExitCode.DIGEST, result.stderr
    digest = hashlib.sha256(run_file.read_bytes()).hexdigest()
    assert result.error_lines[0] == (
        f"coreos-gpu: error: {run_file.name} has sha256 {digest}, not the pinned "
        f"driver_sha256 {'0' * 64}")
    assert list((tmp_path / "cache/coreos-gpu/downloads/sha256").iterdir()) == []
    assert not (tmp_path / "cache/coreos-gpu/drivers").exists()
    assert not (tmp_path / "nvidia.tar.gz").exists()
    # The pin that matches reads it, and the same check guards `driver inspect`.
    inspect = cli("driver", "inspect", url, "--driver-sha256", digest, "--json")
    assert inspect.code == 0, inspect.stderr
    assert cli("driver", "inspect", url, "--driver-sha256", "1" * 64).code == ExitCode.DIGEST


@pytest.mark.parametrize("which", ["no key", "bad key"])
def test_a_repository_without_a_usable_key_is_refused_before_any_download(
        cli, tmp_path: Path, which: str) -> None:  # type: ignore[no-untyped-def]
    args = ["--repository", "https://repo.example/gpu"]
    if which == "bad key":
        (tmp_path / "repo.pub").write_text("not a key\n")
        args += ["--repository-key", str(tmp_path / "repo.pub")]
    result = cli("build", "--driver-url", _tiny_run(tmp_path), "--driver-version", "535.261.03",
                 *args, "--mirror", "http://127.0.0.1:9", "--release", "3975.2.2",
                 "--output", tmp_path / "nvidia.tar.gz")
    assert result.code == (ExitCode.CONFIG if which == "no key" else ExitCode.KEY), result.stderr
    assert not (tmp_path / "cache/coreos-gpu/downloads").exists()
