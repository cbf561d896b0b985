"""Is each compiled .ko this driver's? Checked on the real modules of two driver generations:
470.256.02, whose nvidia-uvm.ko declares no version, and 535.261.03, whose modules all do.

The module sets are the ones the build tests compile (build_bundle shares them), so these
tests compile nothing of their own; the refusals through `coreos-gpu build` use a driver
whose Makefile copies those real modules into place, so make takes seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inspection import inspect_bundle
from coreos_gpu.modules import check_modules, check_written
from testinputs.nvidia_run import write_run

from .bundletools import rewrite
from .conftest import BuiltBundle, Mirror, run_cli

KERNEL = "6.1.0-50-amd64"
R470, R535 = "470.256.02", "535.261.03"
CORE = ("nvidia", "nvidia-uvm", "nvidia-modeset")

pytestmark = pytest.mark.slow


def _module_set(built: BuiltBundle, driver: str) -> Path:
    """The cache folder of the bundle's compiled module set (the shared cache also holds the
    VM tests' sets, for the other kernel and flavour)."""
    for listing in sorted((built.cache / "coreos-gpu/modules").glob("*/modules.json")):
        found = json.loads(listing.read_text())
        if (found["driver_version"], found["kernel_release"], found["flavour"]) == (
                driver, KERNEL, "proprietary"):
            return listing.parent
    raise AssertionError(f"no module set of {driver} in {built.cache}")


@pytest.fixture(scope="module")
def sets(build_bundle) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    return {R470: _module_set(build_bundle(driver=R470), R470),
            R535: _module_set(build_bundle("--kernel-module-type", "proprietary"), R535)}


def _folder(tmp_path: Path, sets: dict[str, Path], *picks: tuple[str, str]) -> list[Path]:
    """A build's output folder holding the (driver, module) picks."""
    paths = []
    for driver, name in picks:
        shutil.copy(sets[driver] / f"{name}.ko", tmp_path / f"{name}.ko")
        paths.append(tmp_path / f"{name}.ko")
    return paths


def test_470s_uvm_declares_no_version_and_is_accepted_for_its_link_to_nvidia_ko(
        sets: dict[str, Path], tmp_path: Path) -> None:
    paths = _folder(tmp_path, sets, *((R470, name) for name in CORE))
    modules = {m.name: m for m in check_modules(paths, kernel_release=KERNEL,
                                                driver_version=R470, log=tmp_path / "log")}
    assert modules["nvidia-uvm"].version == ""
    assert modules["nvidia"].version == modules["nvidia-modeset"].version == R470
    assert "nvidia" in modules["nvidia-uvm"].depends


@pytest.mark.parametrize(("picks", "driver", "message"), [
    # A module that declares another driver's version.
    (((R470, "nvidia"), (R535, "nvidia-uvm")), R470,
     f"nvidia-uvm.ko is version {R535}, not driver {R470}"),
    # 470's versionless uvm beside another driver's nvidia.ko: its symbol CRCs differ.
    (((R535, "nvidia"), (R470, "nvidia-uvm")), R535,
     "nvidia-uvm.ko declares no version, so it must link against this driver's nvidia.ko, but "
     "it was built against another nvidia.ko: its CRC of "),
    # … and with no nvidia.ko to link against at all.
    (((R470, "nvidia-uvm"),), R470,
     "nvidia-uvm.ko declares no version, so it must link against this driver's nvidia.ko, but "
     "there is none"),
    # nvidia.ko itself must declare the driver's version.
    (((R535, "nvidia"), (R470, "nvidia-uvm")), R470, f"nvidia.ko is version {R535}, not"),
], ids=["declared-other", "crc-other-core", "no-core", "core-other"])
def test_a_module_that_is_not_this_drivers_is_refused(
        sets: dict[str, Path], tmp_path: Path, picks: tuple[tuple[str, str], ...], driver: str,
        message: str) -> None:
    paths = _folder(tmp_path, sets, *picks)
    with pytest.raises(CoreosGpuError) as info:
        check_modules(paths, kernel_release=KERNEL, driver_version=driver,
                      log=tmp_path / "build.log")
    assert info.value.code is ExitCode.MODULES
    assert info.value.message.startswith(message), info.value.message
    assert info.value.hint == f"build log: {tmp_path / 'build.log'}"


def test_a_ko_make_did_not_write_is_refused(sets: dict[str, Path], tmp_path: Path) -> None:
    [stale, fresh] = _folder(tmp_path, sets, (R470, "nvidia-peermem"), (R470, "nvidia"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (stale, fresh)}
    # What kbuild does: a new file in its place (made while the old one exists, so a new inode).
    shutil.copy(sets[R470] / "nvidia.ko", tmp_path / "new")
    os.replace(tmp_path / "new", fresh)
    with pytest.raises(CoreosGpuError) as info:
        check_written([fresh, stale], before, tmp_path / "build.log")
    assert info.value.code is ExitCode.MODULES
    assert info.value.message.startswith("nvidia-peermem.ko was already in the driver's kernel "
                                         "sources and this build did not write it")
    check_written([fresh], before, tmp_path / "build.log")


def test_inspect_checks_the_versionless_module_against_the_bundles_nvidia_ko(
        build_bundle, sets: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    archive = build_bundle(driver=R470).archive
    assert inspect_bundle(archive).ok
    uvm = f"payload/{R470}/modules/{KERNEL}/nvidia-uvm.ko"
    other = (sets[R535] / "nvidia.ko").read_bytes()
    swapped = rewrite(archive, tmp_path / "bad.tar.gz", lambda m, data: other if m.name.endswith(
        f"/{KERNEL}/nvidia.ko") else data)
    problems = inspect_bundle(swapped).problems
    assert f"{uvm}: nvidia-uvm.ko declares no version, so it must link against this driver's " \
           f"nvidia.ko, but nvidia.ko is version {R535}" in problems


# --- through `coreos-gpu build`: make "compiles" by copying the real modules into place -------

MAKEFILE = "modules:\n" + "".join(
    f"\tcp prebuilt/{name}.ko.in {name}.ko\n" for name in CORE)


def _copying_run(tmp_path: Path, sets: dict[str, Path], uvm_from: str,
                 stale: tuple[str, str] | None) -> Path:
    """A 470.256.02 .run of NVIDIA's shape whose kernel/ "builds" by copying modules."""
    tree = tmp_path / "tree"
    (tree / "kernel/prebuilt").mkdir(parents=True)
    (tree / "kernel/Makefile").write_text(MAKEFILE)
    sources = ["kernel/Makefile"]
    for name in CORE:
        source = sets[uvm_from if name == "nvidia-uvm" else R470] / f"{name}.ko"
        shutil.copy(source, tree / f"kernel/prebuilt/{name}.ko.in")
        sources.append(f"kernel/prebuilt/{name}.ko.in")
    if stale is not None:  # a .ko that sits in the sources, as if left by another build
        driver, name = stale
        shutil.copy(sets[driver] / f"{name}.ko", tree / f"kernel/{name}.ko")
        sources.append(f"kernel/{name}.ko")
    (tree / "libnvidia-ml.so.470.256.02").write_text("elf\n")
    (tree / ".manifest").write_text(
        f"NVIDIA Accelerated Graphics Driver for Linux-x86_64\n{R470}\n\n"
        "nvidia nvidia-uvm nvidia-modeset\nnvidia-frontend\nnvidia-frontend.ko\nkernel\n"
        "precompiled\n" + "".join(
            f"{s} 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman\n" for s in sources)
        + f"libnvidia-ml.so.{R470} 0755 UTILITY_LIB NATIVE MODULE:nvml\n")
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{R470}.run"
    write_run(tree, run_file)
    return run_file


@pytest.mark.parametrize(("uvm_from", "stale", "message"), [
    (R470, (R535, "nvidia-peermem"),
     "nvidia-peermem.ko was already in the driver's kernel sources and this build did not "
     "write it"),
    (R470, (R470, "nvidia-drm"),
     "nvidia-drm.ko was already in the driver's kernel sources and this build did not write it"),
    (R535, None, f"nvidia-uvm.ko is version {R535}, not driver {R470}"),
], ids=["stale-other-driver", "stale-same-driver", "written-other-driver"])
def test_build_refuses_a_module_that_is_not_this_builds(
        sets: dict[str, Path], flatcar_release, http_dir: Mirror, tmp_path: Path,  # type: ignore[no-untyped-def]
        uvm_from: str, stale: tuple[str, str] | None, message: str) -> None:
    from coreos_gpu.cache import link_tree

    link_tree(flatcar_release.server_root, http_dir.root)
    archive = tmp_path / "nvidia.tar.gz"
    result = run_cli(
        "build", "--mirror", http_dir.url, "--release", flatcar_release.version,
        "--signing-key-fingerprint", flatcar_release.key_fingerprint,
        "--driver-url", _copying_run(tmp_path, sets, uvm_from, stale),
        "--driver-version", R470, "--runtime", "bwrap", "--output", archive,
        # This .run has no nvidia-persistenced, which persistence = daemon (the default) needs.
        "--persistence", "off", cwd=tmp_path, cache=tmp_path / "cache")
    assert result.code == ExitCode.MODULES, result.stderr
    error, hint = result.error_lines
    assert error.startswith(f"coreos-gpu: error: {message}"), error
    found = re.search(r"build log: (\S+?)\)?$", hint)
    assert found, hint
    log = Path(found.group(1))
    assert log.is_file() and "\ncp prebuilt/nvidia.ko.in nvidia.ko\n" in log.read_text()
    assert not archive.exists()
    assert not [p for p in (tmp_path / "cache/coreos-gpu/modules").iterdir()
                if p.is_dir() and not p.name.startswith(".")]
    assert os.listdir(tmp_path / "cache/coreos-gpu/modules")  # the log is kept
