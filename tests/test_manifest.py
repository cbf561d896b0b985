from __future__ import annotations

import pytest

from coreos_gpu.config import Profile
from coreos_gpu.driver import select_files
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.manifest import Arch, ManifestEntry, parse_entry, parse_manifest

NEW_HEADER = """\
NVIDIA Accelerated Graphics Driver for Linux-x86_64
535.261.03
nv-linux.o
nvidia nvidia-uvm nvidia-modeset nvidia-drm nvidia-peermem
nvidia-frontend
nvidia-frontend.ko
kernel
precompiled
"""
# Older drivers list a second kernel interface object before the module names.
OLD_HEADER = """\
NVIDIA Accelerated Graphics Driver for Linux-x86_64
390.157
nv-linux.o
nv-modeset-linux.o
nvidia nvidia-uvm nvidia-modeset nvidia-drm
nvidia-frontend

kernel
precompiled
"""
ENTRIES = """\
kernel/Makefile 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman
kernel/nvidia/nv.c 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman
kernel-open/Makefile 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman
libnvidia-ml.so.535.261.03 0755 UTILITY_LIB NATIVE MODULE:nvml
libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.535.261.03 MODULE:nvml
libnvidia-cfg.so.535.261.03 0755 UTILITY_LIB NATIVE MODULE:installer
libnvidia-gtk3.so.535.261.03 0755 UTILITY_LIB NATIVE MODULE:nvidia-settings
libcuda.so.535.261.03 0755 CUDA_LIB NATIVE / MODULE:compute
libcuda.so.1 0000 CUDA_SYMLINK NATIVE / libcuda.so.535.261.03 MODULE:compute
libcuda.so 0000 CUDA_SYMLINK NATIVE / libcuda.so.1 MODULE:compute
32/libcuda.so.535.261.03 0755 CUDA_LIB COMPAT32 / MODULE:compute
32/libcuda.so.1 0000 CUDA_SYMLINK COMPAT32 / libcuda.so.535.261.03 MODULE:compute
libnvidia-opencl.so.535.261.03 0755 OPENCL_LIB NATIVE / MODULE:opencl
nvidia.icd 0644 CUDA_ICD MODULE:opencl
libnvidia-glcore.so.535.261.03 0755 OPENGL_LIB NATIVE MODULE:opengl
libGLX_nvidia.so.535.261.03 0755 GLX_CLIENT_LIB NATIVE GLVND MODULE:opengl
libGLX_nvidia.so.0 0000 GLX_CLIENT_SYMLINK NATIVE libGLX_nvidia.so.535.261.03 GLVND MODULE:opengl
nvidia-smi 0755 UTILITY_BINARY MODULE:nvml
nvidia-cuda-mps-control 0755 UTILITY_BINARY MODULE:compute
nvidia-settings 0755 UTILITY_BINARY MODULE:nvidia-settings
nvidia-installer 0755 INSTALLER_BINARY MODULE:installer
nvidia-modprobe 0755 NVIDIA_MODPROBE bin MODULE:installer
firmware/gsp_ga10x.bin 0644 FIRMWARE INHERIT_PATH_DEPTH:1 MODULE:gsp
LICENSE 0644 DOCUMENTATION share/doc/NVIDIA_GLX-1.0 MODULE:installer
"""


def test_new_header() -> None:
    m = parse_manifest(NEW_HEADER + ENTRIES)
    assert m.description == "NVIDIA Accelerated Graphics Driver for Linux-x86_64"
    assert m.version == "535.261.03"
    assert m.interface_files == ("nv-linux.o",)
    assert m.kernel_modules == ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm",
                                "nvidia-peermem")
    assert m.build_dir == "kernel"
    assert len(m.entries) == len(ENTRIES.splitlines())
    assert m.entries[0].line == 9


def test_old_header_with_two_interface_files_and_an_empty_line() -> None:
    m = parse_manifest(OLD_HEADER + ENTRIES)
    assert m.version == "390.157"
    assert m.interface_files == ("nv-linux.o", "nv-modeset-linux.o")
    assert m.kernel_modules == ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")
    assert m.build_dir == "kernel"
    assert m.entries[0].line == 10


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("kernel/nvidia/nv.c 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman",
         ManifestEntry("kernel/nvidia/nv.c", 0o644, "KERNEL_MODULE_SRC", 1, path="nvidia",
                       module="resman")),
        ("libcuda.so.1 0000 CUDA_SYMLINK NATIVE / libcuda.so.535.261.03 MODULE:compute",
         ManifestEntry("libcuda.so.1", 0, "CUDA_SYMLINK", 1, Arch.NATIVE, "/",
                       "libcuda.so.535.261.03", "compute")),
        ("32/libcuda.so.535.261.03 0755 CUDA_LIB COMPAT32 / MODULE:compute",
         ManifestEntry("32/libcuda.so.535.261.03", 0o755, "CUDA_LIB", 1, Arch.COMPAT32, "/",
                       module="compute")),
        ("libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.535.261.03 "
         "MODULE:nvml",
         ManifestEntry("libnvidia-ml.so.1", 0, "UTILITY_LIB_SYMLINK", 1, Arch.NATIVE,
                       target="libnvidia-ml.so.535.261.03", module="nvml")),
        ("libGLX_nvidia.so.0 0000 GLX_CLIENT_SYMLINK NATIVE libGLX_nvidia.so.535.261.03 "
         "GLVND MODULE:opengl",
         ManifestEntry("libGLX_nvidia.so.0", 0, "GLX_CLIENT_SYMLINK", 1, Arch.NATIVE,
                       target="libGLX_nvidia.so.535.261.03", module="opengl",
                       tags=("GLVND",))),
        ("firmware/gsp_tu10x.bin 0644 FIRMWARE INHERIT_PATH_DEPTH:1 MODULE:gsp",
         ManifestEntry("firmware/gsp_tu10x.bin", 0o644, "FIRMWARE", 1, path=".",
                       module="gsp")),
        ("nvidia-smi 0755 UTILITY_BINARY MODULE:nvml",
         ManifestEntry("nvidia-smi", 0o755, "UTILITY_BINARY", 1, module="nvml")),
        ("nvidia-modprobe 4755 NVIDIA_MODPROBE bin MODULE:installer",
         ManifestEntry("nvidia-modprobe", 0o4755, "NVIDIA_MODPROBE", 1, path="bin",
                       module="installer")),
        # Entries without MODULE: (older drivers) and types newer than this parser.
        ("README.txt 0644 DOCUMENTATION share/doc",
         ManifestEntry("README.txt", 0o644, "DOCUMENTATION", 1, path="share/doc")),
        ("libfoo.so.1 0755 SHINY_NEW_LIB NATIVE some/where MODULE:x",
         ManifestEntry("libfoo.so.1", 0o755, "SHINY_NEW_LIB", 1, Arch.NATIVE, module="x",
                       extra=("some/where",))),
    ],
)
def test_entry_shapes(line: str, expected: ManifestEntry) -> None:
    assert parse_entry(line, 1) == expected


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("nvidia-smi", "expected 'file mode TYPE ...'"),
        ("libcuda.so.1 0000 CUDA_SYMLINK NATIVE / MODULE:compute", "lacks its target"),
        ("libcuda.so.535.261.03 0755 CUDA_LIB MODULE:compute", "lacks NATIVE or COMPAT32"),
        ("libcuda.so.535.261.03 0755 CUDA_LIB AMD64 / MODULE:compute",
         "lacks NATIVE or COMPAT32"),
        ("LICENSE 0644 DOCUMENTATION MODULE:installer", "lacks its install path"),
        ("kernel/nv.c 0644 KERNEL_MODULE_SRC MODULE:resman", "needs INHERIT_PATH_DEPTH:N"),
        ("kernel/nv.c 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:3 MODULE:resman",
         "needs INHERIT_PATH_DEPTH:N"),
        ("../../etc/passwd 0644 UTILITY_BINARY MODULE:x", "leaves the package folder"),
        ("/etc/passwd 0644 UTILITY_BINARY MODULE:x", "leaves the package folder"),
        ("LICENSE 0644 DOCUMENTATION ../../../etc MODULE:x", "leaves the package folder"),
        ("nvidia-smi 0755 UTILITY_BINARY extra MODULE:nvml", "unexpected field(s) 'extra'"),
    ],
)
def test_malformed_entry_names_its_line(line: str, why: str) -> None:
    text = NEW_HEADER + ENTRIES + line + "\n"
    bad_line = len(text.splitlines())
    with pytest.raises(CoreosGpuError) as info:
        parse_manifest(text, source="X.run: .manifest")
    assert info.value.code is ExitCode.DRIVER
    assert f"X.run: .manifest: malformed entry on line {bad_line}: " in info.value.message
    assert why in info.value.message


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "line 1: the header lacks the description and version lines"),
        (NEW_HEADER, "no file entries"),
        (NEW_HEADER.replace("535.261.03", "latest") + ENTRIES, "line 2: 'latest' is not a "
         "driver version"),
        (NEW_HEADER + ENTRIES + ENTRIES.splitlines()[3] + "\n", "listed twice (also line 12)"),
        (NEW_HEADER + ENTRIES.replace("nvidia-smi 0755", "nvidia-smi 755x"),
         "line 26: mode '755x' of nvidia-smi is not octal"),
        # A malformed first entry must not be taken for part of the header.
        (NEW_HEADER + ENTRIES.replace("kernel/Makefile 0644", "kernel/Makefile 06x4"),
         "line 9: mode '06x4' of kernel/Makefile is not octal"),
        (NEW_HEADER + "some stray line\n" + ENTRIES,
         "line 9: mode 'stray' of some is not octal"),
    ],
)
def test_malformed_manifest(text: str, why: str) -> None:
    with pytest.raises(CoreosGpuError) as info:
        parse_manifest(text)
    assert why in info.value.message


def _names(profile: Profile) -> set[str]:
    return {e.file for e in select_files(parse_manifest(NEW_HEADER + ENTRIES), profile)}


def test_compute_profile() -> None:
    assert _names(Profile.COMPUTE) == {
        "libnvidia-ml.so.535.261.03", "libnvidia-ml.so.1", "libnvidia-cfg.so.535.261.03",
        "libcuda.so.535.261.03", "libcuda.so.1", "libcuda.so",
        "libnvidia-opencl.so.535.261.03", "nvidia.icd", "nvidia-smi",
        "nvidia-cuda-mps-control", "nvidia-modprobe", "firmware/gsp_ga10x.bin",
    }


def test_full_profile_takes_all_userspace_but_not_kernel_sources_or_installer() -> None:
    full = _names(Profile.FULL)
    assert {"32/libcuda.so.535.261.03", "32/libcuda.so.1", "libGLX_nvidia.so.0",
            "libnvidia-glcore.so.535.261.03", "LICENSE", "nvidia-settings"} <= full
    assert not {n for n in full if n.startswith("kernel")}
    assert "nvidia-installer" not in full
    assert _names(Profile.COMPUTE) < full
