"""The driver stage against the real-format 535.261.03 .run built from Debian's packages."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from coreos_gpu.config import KernelModuleType, Profile, load_config
from coreos_gpu.driver import (
    MESOS_TOOLS,
    DriverPackage,
    check_flavour,
    default_flavour,
    fetch_driver,
    load_driver,
    read_package,
    resolve_flavour,
)
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.fetch import cached
from coreos_gpu.manifest import Arch
from coreos_gpu.sync import sync_flavours

from .conftest import Mirror
from .test_manifest import NEW_HEADER

VERSION = "535.261.03"
GL_TYPES = {"OPENGL_LIB", "OPENGL_SYMLINK", "GLX_CLIENT_LIB", "GLX_CLIENT_SYMLINK",
            "EGL_CLIENT_LIB", "EGL_CLIENT_SYMLINK", "GLVND_LIB", "GLVND_SYMLINK"}


@pytest.fixture(scope="module")
def package(nvidia_run: Path, tmp_path_factory: pytest.TempPathFactory) -> DriverPackage:
    return load_driver(nvidia_run, tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_version_flavours_and_modules(package: DriverPackage) -> None:
    assert package.version == VERSION
    assert package.flavours == (KernelModuleType.PROPRIETARY, KernelModuleType.OPEN)
    assert {"nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"} <= set(
        package.kernel_modules)
    for flavour in package.flavours:
        assert (package.kernel_source_dir(flavour) / "Makefile").is_file()


@pytest.mark.slow
def test_every_file_of_the_package_is_in_its_manifest(package: DriverPackage) -> None:
    on_disk = {
        str(p.relative_to(package.root)) for p in package.root.rglob("*")
        if p.is_symlink() or p.is_file()
    } - {".manifest"}
    # As in NVIDIA's packages, the manifest's symlinks are not in the package: no file there.
    links = {e.file for e in package.manifest.entries if e.is_symlink}
    assert {"libnvidia-ml.so.1", "libcuda.so.1", "32/libcuda.so"} <= links
    assert on_disk == {e.file for e in package.manifest.entries} - links
    assert all(e.target for e in package.manifest.entries if e.is_symlink)


@pytest.mark.slow
def test_compute_profile_of_the_real_package(package: DriverPackage) -> None:
    compute = package.files(Profile.COMPUTE)
    names = {e.file for e in compute}
    assert f"libnvidia-ml.so.{VERSION}" in names
    for lib in ("libcuda", "libnvidia-ptxjitcompiler", "libnvidia-opencl", "libnvidia-cfg"):
        assert f"{lib}.so.{VERSION}" in names
    firmware = [e for e in compute if e.type == "FIRMWARE"]
    assert firmware and all(e.name.startswith("gsp") and e.name.endswith(".bin")
                            for e in firmware)
    assert "nvidia-modprobe" in names
    present_tools = {e.name for e in package.manifest.entries if e.name in MESOS_TOOLS}
    assert {"nvidia-smi", "nvidia-persistenced"} <= present_tools
    assert present_tools <= names
    # Out: 32-bit files, OpenGL libraries, documentation, kernel sources.
    assert not [e for e in compute if e.arch is Arch.COMPAT32 or e.file.startswith("32/")]
    assert not [e for e in compute if e.type in GL_TYPES]
    assert not [e for e in compute if e.type == "DOCUMENTATION"]
    assert not [e for e in compute if e.type == "KERNEL_MODULE_SRC"]


@pytest.mark.slow
def test_full_profile_adds_32bit_opengl_and_docs(package: DriverPackage) -> None:
    full = package.files(Profile.FULL)
    assert {e.file for e in package.files(Profile.COMPUTE)} < {e.file for e in full}
    assert [e for e in full if e.arch is Arch.COMPAT32 and e.file.startswith("32/")]
    assert [e for e in full if e.type in GL_TYPES]
    assert [e for e in full if e.type == "DOCUMENTATION"]


@pytest.mark.slow
def test_inspect_json_and_text(cli, nvidia_run: Path) -> None:
    result = cli("driver", "inspect", nvidia_run, "--json")
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["version"] == VERSION
    assert shown["flavours"] == ["proprietary", "open"]
    by_file = {f["file"]: f for f in shown["files"]}
    assert by_file[f"libnvidia-ml.so.{VERSION}"]["profiles"] == ["compute", "full"]
    # The link comes from the manifest alone: no file in the package, no bytes.
    assert by_file["libnvidia-ml.so.1"] == {
        "file": "libnvidia-ml.so.1", "type": "UTILITY_LIB_SYMLINK", "arch": "NATIVE",
        "mode": "0000", "size": 0, "target": f"libnvidia-ml.so.{VERSION}",
        "profiles": ["compute", "full"]}
    assert by_file[f"32/libcuda.so.{VERSION}"]["profiles"] == ["full"]
    assert shown["profiles"]["compute"]["bytes"] < shown["profiles"]["full"]["bytes"]
    text = cli("driver", "inspect", nvidia_run)
    assert text.code == 0, text.stderr
    assert f"driver version   {VERSION}" in text.stdout
    assert "flavours         proprietary (kernel/), open (kernel-open/)" in text.stdout
    assert f"libnvidia-ml.so.{VERSION}" in text.stdout


@pytest.mark.slow
def test_inspect_reuses_the_cached_extraction(cli, nvidia_run: Path, tmp_path: Path) -> None:
    assert cli("driver", "inspect", nvidia_run).code == 0
    # With a `sh` that cannot extract anything, only the cache can answer.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").write_text("#!/bin/false\n")
    (bin_dir / "sh").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    assert cli("driver", "inspect", nvidia_run, env={"PATH": path}).code == 0
    other = tmp_path / "copy.run"
    shutil.copy(nvidia_run, other)
    other.write_bytes(other.read_bytes() + b"\n")  # another sha256: not in the cache
    assert cli("driver", "inspect", other, env={"PATH": path}).code == ExitCode.DRIVER


@pytest.mark.slow
def test_inspect_over_http(cli, nvidia_run: Path, http_dir: Mirror) -> None:
    root, base = http_dir.root, http_dir.url
    shutil.copy(nvidia_run, root / nvidia_run.name)
    url = f"{base}/{nvidia_run.name}"
    offline = cli("driver", "inspect", url, "--offline")
    assert offline.code == ExitCode.DOWNLOAD
    assert "is not in the cache and --offline forbids downloading" in offline.error_lines[0]
    result = cli("driver", "inspect", url, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["version"] == VERSION
    (root / nvidia_run.name).unlink()
    assert cli("driver", "inspect", url, "--offline").code == 0  # now from the cache
    missing = cli("driver", "inspect", f"{base}/NVIDIA-Linux-x86_64-1.2.3.run")
    assert missing.code == ExitCode.DOWNLOAD
    assert missing.error_lines[0].endswith("HTTP 404 File not found")


@pytest.mark.slow
def test_corrupt_run_is_refused_and_leaves_nothing(cli, nvidia_run: Path,
                                                   tmp_path: Path) -> None:
    data = bytearray(nvidia_run.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "NVIDIA-Linux-x86_64-535.261.03.run"
    bad.write_bytes(bytes(data))
    result = cli("driver", "inspect", bad)
    assert result.code == ExitCode.DRIVER
    assert result.error_lines[0].startswith(
        f"coreos-gpu: error: extracting {bad.name} failed with exit code")
    assert "Traceback" not in result.stderr
    drivers = tmp_path / "cache" / "coreos-gpu" / "drivers"
    assert [p.name for p in drivers.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist or is not a file"),
        (b"PK\x03\x04 not a shell script", "is not an NVIDIA .run package"),
    ],
)
def test_not_a_driver_package(cli, tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "driver.run"
    if content is not None:
        path.write_bytes(content)
    result = cli("driver", "inspect", path)
    assert result.code == ExitCode.DRIVER
    assert message in result.error_lines[0]


def test_manifest_listing_a_missing_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".manifest").write_text(
        NEW_HEADER + "nvidia-smi 0755 UTILITY_BINARY MODULE:nvml\n")
    with pytest.raises(CoreosGpuError) as info:
        read_package(tmp_path, sha256="0" * 64, source="X.run")
    assert info.value.message == "X.run: .manifest line 9 lists nvidia-smi, which the " \
        "package lacks"


# --- packages laid out by hand: what the manifest says against what the package holds -------

def _package(root: Path, entries: str) -> DriverPackage:
    root.mkdir(parents=True, exist_ok=True)
    (root / ".manifest").write_text(NEW_HEADER + entries)
    for line in entries.splitlines():
        file, mode = line.split()[:2]
        if mode != "0000":  # like NVIDIA's, the package holds no symlink
            (root / file).parent.mkdir(parents=True, exist_ok=True)
            (root / file).write_text(f"{file}\n")
    return read_package(root, sha256="0" * 64, source="X.run")


LIB = f"libnvidia-ml.so.{VERSION} 0755 UTILITY_LIB NATIVE MODULE:nvml\n"
SOURCES = "kernel/Makefile 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman\n"


def test_symlinks_come_from_the_manifest_not_the_package(tmp_path: Path) -> None:
    package = _package(tmp_path, LIB + f"libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE "
                                       f"libnvidia-ml.so.{VERSION} MODULE:nvml\n")
    link = package.manifest.entries[1]
    assert (link.is_symlink, link.target) == (True, f"libnvidia-ml.so.{VERSION}")
    assert not (tmp_path / link.file).exists() and not (tmp_path / link.file).is_symlink()
    assert package.size_of(link) == 0
    assert [e.file for e in package.files(Profile.COMPUTE)] == [
        f"libnvidia-ml.so.{VERSION}", "libnvidia-ml.so.1"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE ../../etc/shadow MODULE:nvml",
         "symlink libnvidia-ml.so.1's target '../../etc/shadow' leaves the package (seen from "
         "its install folder lib64/)"),
        ("32/libcuda.so.1 0000 CUDA_SYMLINK COMPAT32 / ../../../x MODULE:compute",
         "symlink 32/libcuda.so.1's target '../../../x' leaves the package"),
        ("nvidia-smi.link 0000 UTILITY_BIN_SYMLINK ../../bin/sh MODULE:nvml",
         "symlink nvidia-smi.link's target '../../bin/sh' leaves the package"),
        # A GBM backend link sits in <libdir>/gbm/, but nvidia-installer resolves its target
        # against <libdir> (files.c set_destinations): there, two .. leave the package.
        ("nvidia-drm_gbm.so 0000 GBM_BACKEND_LIB_SYMLINK NATIVE ../../x.so MODULE:nvalloc",
         "symlink nvidia-drm_gbm.so's target '../../x.so' leaves the package (seen from "
         "lib64/, where nvidia-installer resolves it)"),
        ("libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE /etc/shadow MODULE:nvml",
         "symlink libnvidia-ml.so.1 has the absolute target '/etc/shadow'"),
    ],
)
def test_symlink_target_outside_the_package_is_a_manifest_error(tmp_path: Path, line: str,
                                                                 why: str) -> None:
    with pytest.raises(CoreosGpuError) as info:
        _package(tmp_path, LIB + line + "\n")
    assert info.value.code is ExitCode.DRIVER
    assert info.value.message.startswith(f"X.run: .manifest: malformed entry on line 10: {why}")


# The GBM backend (495 on) in NVIDIA's field layout; the GBM line as 580's manifest spells
# it: its target is a bare library name, of <libdir>.
ALLOCATOR = (f"libnvidia-allocator.so.{VERSION} 0755 OPENGL_LIB NATIVE MODULE:nvalloc\n"
             f"libnvidia-allocator.so.1 0000 OPENGL_SYMLINK NATIVE libnvidia-allocator.so.{VERSION}"
             " MODULE:nvalloc\n"
             "nvidia-drm_gbm.so 0000 GBM_BACKEND_LIB_SYMLINK NATIVE libnvidia-allocator.so.1 "
             "MODULE:nvalloc\n")


def test_links_that_stay_inside_are_kept(tmp_path: Path) -> None:
    package = _package(tmp_path, LIB + ALLOCATOR + (
        f"32/libcuda.so.{VERSION} 0755 CUDA_LIB COMPAT32 / MODULE:compute\n"
        f"32/libcuda.so.1 0000 CUDA_SYMLINK COMPAT32 / libcuda.so.{VERSION} MODULE:compute\n"))
    assert [e.target for e in package.manifest.entries if e.is_symlink] == [
        f"libnvidia-allocator.so.{VERSION}", "libnvidia-allocator.so.1",
        f"libcuda.so.{VERSION}"]


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        # The GBM link of 495 and later alone: nothing in <libdir> by that name.
        (ALLOCATOR.splitlines()[2], "it would point at lib64/libnvidia-allocator.so.1"),
        # A target in the link's folder, not in the one of the file it names.
        (f"libvdpau_nvidia.so.{VERSION} 0755 VDPAU_LIB NATIVE vdpau/ MODULE:vdpau\n"
         f"libvdpau_nvidia.so.1 0000 VDPAU_SYMLINK NATIVE / libvdpau_nvidia.so.{VERSION} "
         "MODULE:vdpau", f"it would point at lib64/libvdpau_nvidia.so.{VERSION}"),
    ],
)
def test_link_to_nothing_in_the_package_is_left_out(tmp_path: Path, lines: str,
                                                   why: str) -> None:
    """nvidia-installer would make such a link and leave it dangling; refusing the whole
    driver for it would serve no one, so no profile ships it (and inspect would refuse an
    archive that did). why: where the link would point."""
    package = _package(tmp_path, LIB + lines + "\n")
    links = [e for e in package.manifest.entries if e.is_symlink]
    assert links, why
    for profile in Profile:
        assert not [e for e in package.files(profile) if e.is_symlink], (profile, why)


def test_link_of_a_type_newer_than_the_table_is_not_checked_for_its_target(
        tmp_path: Path) -> None:
    """Where nvidia-installer puts a type it had not yet when this was written is a guess:
    such a link is read, and select_files drops it if it would dangle."""
    package = _package(tmp_path, LIB + "libfoo.so.1 0000 SHINY_NEW_SYMLINK NATIVE libfoo.so.2 "
                                       "MODULE:x\n")
    assert package.manifest.entries[1].target == "libfoo.so.2"
    assert [e.file for e in package.files(Profile.FULL)] == [f"libnvidia-ml.so.{VERSION}"]


def test_file_entry_that_is_a_symlink_in_the_package_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nvidia-smi").symlink_to("/etc/shadow")
    with pytest.raises(CoreosGpuError) as info:
        _package(tmp_path, LIB + "nvidia-smi 0755 UTILITY_BINARY MODULE:nvml\n")
    assert info.value.code is ExitCode.DRIVER
    assert info.value.message == ("X.run: .manifest line 10 lists nvidia-smi as a file, but the "
                                  "package has a symlink there")


def test_a_flavour_the_package_lacks_is_refused_before_anything_is_fetched(
        tmp_path: Path) -> None:
    proprietary = _package(tmp_path / "p", SOURCES + LIB)
    assert proprietary.flavours == (KernelModuleType.PROPRIETARY,)
    check_flavour(proprietary, KernelModuleType.PROPRIETARY)
    with pytest.raises(CoreosGpuError) as info:
        check_flavour(proprietary, KernelModuleType.OPEN)
    assert info.value.code is ExitCode.CONFIG
    assert info.value.message == f"driver {VERSION} has no open kernel modules (kernel-open/)"
    assert info.value.hint == "use --kernel-module-type proprietary"
    both = _package(tmp_path / "b", SOURCES + SOURCES.replace("kernel/", "kernel-open/") + LIB)
    check_flavour(both, KernelModuleType.OPEN)


# --- driver_sha256 ---------------------------------------------------------------------------

FAKE_RUN = b"#!/bin/sh\necho 'this would run'\n"


def test_pinned_sha256_mismatch_drops_the_download_and_extracts_nothing(
        http_dir: Mirror, tmp_path: Path) -> None:
    (http_dir.root / "NVIDIA-Linux-x86_64-535.261.03.run").write_bytes(FAKE_RUN)
    url = f"{http_dir.url}/NVIDIA-Linux-x86_64-535.261.03.run"
    cache = tmp_path / "cache"
    with pytest.raises(CoreosGpuError) as info:
        fetch_driver(url, cache, offline=False, sha256="AB" * 32)
    assert info.value.code is ExitCode.DIGEST
    assert info.value.message == (
        f"NVIDIA-Linux-x86_64-535.261.03.run has sha256 {hashlib.sha256(FAKE_RUN).hexdigest()}"
        f", not the pinned driver_sha256 {'ab' * 32}")
    assert "removed from the cache" in info.value.hint
    assert cached(url, cache) is None
    assert list((cache / "downloads/sha256").iterdir()) == []
    assert not (cache / "drivers").exists()  # nothing of it ran


def test_pinned_sha256_mismatch_keeps_a_local_file(tmp_path: Path) -> None:
    run_file = tmp_path / "driver.run"
    run_file.write_bytes(FAKE_RUN)
    with pytest.raises(CoreosGpuError) as info:
        fetch_driver(str(run_file), tmp_path / "cache", offline=False, sha256="0" * 64)
    assert info.value.code is ExitCode.DIGEST
    assert run_file.read_bytes() == FAKE_RUN
    assert not (tmp_path / "cache/drivers").exists()


@pytest.mark.slow
def test_pinned_sha256_that_matches_reads_the_driver(nvidia_run: Path, http_dir: Mirror,
                                                      tmp_path: Path) -> None:
    shutil.copy(nvidia_run, http_dir.root / nvidia_run.name)
    digest = hashlib.sha256(nvidia_run.read_bytes()).hexdigest()
    package = fetch_driver(f"{http_dir.url}/{nvidia_run.name}", tmp_path / "cache",
                           offline=False, sha256=digest.upper())
    assert (package.version, package.sha256) == (VERSION, digest)


# --- the default flavour follows the driver ---------------------------------------------------

PROP, OPEN = KernelModuleType.PROPRIETARY, KernelModuleType.OPEN


@pytest.mark.parametrize(("version", "flavours", "expected"), [
    ("470.256.02", (PROP,), PROP),  # no kernel-open/ at all
    ("535.261.03", (PROP, OPEN), PROP),
    ("555.58.02", (PROP, OPEN), PROP),  # nvidia-installer 555: default_type = PROPRIETARY
    ("560.28.03", (PROP, OPEN), OPEN),  # nvidia-installer 560: default_type = OPEN
    ("580.82.07", (PROP, OPEN), OPEN),
    ("580.82.07", (PROP,), PROP),  # a package without kernel-open/ never defaults to open
    ("580.82.07", (OPEN,), OPEN),
    ("580.82.07", (), OPEN),  # sync's plan: the version alone
    ("470.256.02", (), PROP),
])
def test_default_flavour(version: str, flavours: tuple[KernelModuleType, ...],
                         expected: KernelModuleType) -> None:
    assert default_flavour(version, *((flavours,) if flavours else ())) is expected


def test_an_explicit_flavour_wins_and_must_exist(tmp_path: Path) -> None:
    both = _package(tmp_path / "b", SOURCES + SOURCES.replace("kernel/", "kernel-open/") + LIB)
    assert resolve_flavour(both, None) is PROP  # 535: proprietary by default
    assert resolve_flavour(both, OPEN) is OPEN
    proprietary = _package(tmp_path / "p", SOURCES + LIB)
    with pytest.raises(CoreosGpuError) as info:
        resolve_flavour(proprietary, OPEN)
    assert info.value.code is ExitCode.CONFIG


@pytest.mark.parametrize(("settings", "driver", "expected"), [
    ({}, "580.82.07", (OPEN,)),
    ({}, "535.261.03", (PROP,)),
    ({"kernel_module_type": "proprietary"}, "580.82.07", (PROP,)),
    ({"sync_flavours": ["open", "proprietary", "open"]}, "470.256.02", (OPEN, PROP)),
])
def test_sync_keeps_each_drivers_default_flavour(
        settings: dict[str, object], driver: str,
        expected: tuple[KernelModuleType, ...]) -> None:
    assert sync_flavours(load_config(settings, None), driver) == expected


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["535", "470"])
def test_inspect_shows_the_default_flavour(cli, nvidia_run: Path, nvidia_run_470: Path,  # type: ignore[no-untyped-def]
                                           branch: str) -> None:
    run = nvidia_run if branch == "535" else nvidia_run_470
    shown = json.loads(cli("driver", "inspect", run, "--json").stdout)
    assert shown["default_flavour"] == "proprietary"
    assert shown["flavours"] == (["proprietary", "open"] if branch == "535" else ["proprietary"])
    text = cli("driver", "inspect", run).stdout
    assert "default flavour  proprietary (what NVIDIA's installer picks" in text
