from __future__ import annotations

import pytest

from coreos_gpu.config import Profile
from coreos_gpu.driver import select_files
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.manifest import FILE_TYPES, Arch, ManifestEntry, parse_entry, parse_manifest

# Facts from nvidia-installer's source (github.com/NVIDIA/nvidia-installer, read at 590.48.01
# and back to 1.0-6106): install-from-cwd.c parse_manifest reads the header by position.
# Line 3 was the kernel interface file name until 331.13 and is ignored since; line 4 is the
# kernel module names (a single name up to 340); 5 and 6 list module names and files to
# uninstall; 7 the build dir (ignored since 545.23.06, which picks kernel/ or kernel-open/
# itself); 8 the precompiled dir. Only 1.0-6106 and 1.0-6111 read nine lines: the kernel
# module's .o file name, then the kernel interface's, before the module name.
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
EMPTY_THIRD_LINE = NEW_HEADER.replace("nv-linux.o\n", "\n")
# nvidia-installer's get_next_line (misc.c) steps over blank lines, so its own installer can
# only read an "empty" line that holds a space.
SPACE_THIRD_LINE = NEW_HEADER.replace("nv-linux.o\n", " \n")
NOTHING_TO_UNINSTALL = NEW_HEADER.replace("nvidia-frontend\nnvidia-frontend.ko\n", "\n\n")
R340_HEADER = """\
NVIDIA Accelerated Graphics Driver for Linux-x86_64
340.108
nv-linux.o
nvidia
nvidia-frontend nvidia0
nvidia-frontend.ko nvidia0.ko
kernel
precompiled
"""
NINE_LINE_HEADER = """\
NVIDIA Accelerated Graphics Driver for Linux-x86
1.0-6111
nvidia.o
nv-linux.o
nvidia
NVdriver nvidia
NVdriver.o nvidia.o
usr/src/nv
usr/src/nv/precompiled
"""
KERNEL_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem")
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


@pytest.mark.parametrize(
    ("header", "interface", "modules", "unload", "remove", "build_dir", "precompiled",
     "first"),
    [
        (NEW_HEADER, ("nv-linux.o",), KERNEL_MODULES, ("nvidia-frontend",),
         ("nvidia-frontend.ko",), "kernel", "precompiled", 9),
        (EMPTY_THIRD_LINE, (), KERNEL_MODULES, ("nvidia-frontend",), ("nvidia-frontend.ko",),
         "kernel", "precompiled", 9),
        (SPACE_THIRD_LINE, (), KERNEL_MODULES, ("nvidia-frontend",), ("nvidia-frontend.ko",),
         "kernel", "precompiled", 9),
        # Empty lines inside the header keep the lines after them in place.
        (NOTHING_TO_UNINSTALL, ("nv-linux.o",), KERNEL_MODULES, (), (), "kernel",
         "precompiled", 9),
        (R340_HEADER, ("nv-linux.o",), ("nvidia",), ("nvidia-frontend", "nvidia0"),
         ("nvidia-frontend.ko", "nvidia0.ko"), "kernel", "precompiled", 9),
        (NINE_LINE_HEADER, ("nvidia.o", "nv-linux.o"), ("nvidia",), ("NVdriver", "nvidia"),
         ("NVdriver.o", "nvidia.o"), "usr/src/nv", "usr/src/nv/precompiled", 10),
    ],
    ids=["535", "empty-third-line", "space-third-line", "empty-uninstall-lines", "340",
         "nine-lines"],
)
def test_header_is_read_by_position(header: str, interface: tuple[str, ...],
                                    modules: tuple[str, ...], unload: tuple[str, ...],
                                    remove: tuple[str, ...], build_dir: str, precompiled: str,
                                    first: int) -> None:
    m = parse_manifest(header + ENTRIES)
    assert (m.description, m.version) == tuple(header.splitlines()[:2])
    assert m.interface_files == interface
    assert m.kernel_modules == modules
    assert (m.uninstall_modules, m.uninstall_files) == (unload, remove)
    assert (m.build_dir, m.precompiled_dir) == (build_dir, precompiled)
    assert m.entries[0].line == first
    assert m.entries[0].file == "kernel/Makefile"
    assert len(m.entries) == len(ENTRIES.splitlines())


@pytest.mark.parametrize(
    ("text", "why"),
    [
        # Seven header lines: the first entry stands where the precompiled dir belongs.
        (NEW_HEADER.replace("precompiled\n", "") + ENTRIES,
         "line 8: expected the precompiled kernel interface directory (header line 8), got a "
         "file entry: the header is too short"),
        (EMPTY_THIRD_LINE.replace("kernel\n", "", 1) + ENTRIES, "line 8: expected the "
         "precompiled kernel interface directory"),
        ("NVIDIA Accelerated Graphics Driver for Linux-x86_64\n535.261.03\n",
         "line 3: the header ends before its kernel module names line"),
        (NEW_HEADER.replace(" ".join(KERNEL_MODULES), "") + ENTRIES,
         "line 4: the header names no kernel modules"),
        (NINE_LINE_HEADER.replace("\nnvidia\n", "\nnvidia.ko\n", 1) + ENTRIES,
         "line 5: kernel module name 'nvidia.ko' is not a module name"),
    ],
)
def test_malformed_header_names_its_line(text: str, why: str) -> None:
    with pytest.raises(CoreosGpuError) as info:
        parse_manifest(text, source="X.run: .manifest")
    assert info.value.code is ExitCode.DRIVER
    assert info.value.message.startswith(f"X.run: .manifest: malformed entry on {why}")


def test_blank_lines_between_entries_are_skipped_and_still_counted() -> None:
    # get_next_line (misc.c) steps over blank lines; line numbers in errors stay the file's.
    lines = ENTRIES.splitlines()
    m = parse_manifest(NEW_HEADER + lines[0] + "\n\n\n" + "\n".join(lines[1:]) + "\n")
    assert [e.line for e in m.entries[:2]] == [9, 12]
    assert len(m.entries) == len(lines)


def test_lines_end_at_carriage_returns_too() -> None:
    # get_next_line ends a line at \n or \r.
    text = NEW_HEADER + ENTRIES
    assert parse_manifest(text.replace("\n", "\r\n")) == parse_manifest(text)


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
        # 390's installer reads a TLS class after the arch, before the path
        # (install-from-cwd.c, has_tls_class), and GLVND/NON_GLVND after the target (above).
        ("libnvidia-tls.so.340.108 0755 TLS_LIB NATIVE CLASSIC tls MODULE:opengl",
         ManifestEntry("libnvidia-tls.so.340.108", 0o755, "TLS_LIB", 1, Arch.NATIVE, "tls",
                       module="opengl", tags=("CLASSIC",))),
        # NVIDIA's line (580's, verbatim): the target is a bare library name, which
        # nvidia-installer resolves against <libdir>, not <libdir>/gbm/ (layout.py).
        ("nvidia-drm_gbm.so 0000 GBM_BACKEND_LIB_SYMLINK NATIVE libnvidia-allocator.so.1 "
         "MODULE:nvalloc",
         ManifestEntry("nvidia-drm_gbm.so", 0, "GBM_BACKEND_LIB_SYMLINK", 1, Arch.NATIVE,
                       target="libnvidia-allocator.so.1", module="nvalloc")),
        # SYSTEMD_UNIT_SYMLINK has a path (below /etc/systemd/system), then a word
        # nvidia-installer reads as its target and replaces by the unit of the link's name
        # (files.c set_destinations); without one, the MODULE: tag is that word there.
        ("nvidia-suspend.service 0000 SYSTEMD_UNIT_SYMLINK systemd-suspend.service.requires "
         "nvidia-suspend.service MODULE:powermanagement",
         ManifestEntry("nvidia-suspend.service", 0, "SYSTEMD_UNIT_SYMLINK", 1,
                       path="systemd-suspend.service.requires",
                       target="nvidia-suspend.service", module="powermanagement")),
        ("nvidia-resume.service 0000 SYSTEMD_UNIT_SYMLINK systemd-suspend.service.requires "
         "MODULE:powermanagement",
         ManifestEntry("nvidia-resume.service", 0, "SYSTEMD_UNIT_SYMLINK", 1,
                       path="systemd-suspend.service.requires",
                       target="nvidia-resume.service", module="powermanagement")),
        # A link type newer than the table still carries its target, as its last field.
        ("libfoo.so.1 0000 SHINY_NEW_SYMLINK NATIVE some/where libfoo.so.2 MODULE:x",
         ManifestEntry("libfoo.so.1", 0, "SHINY_NEW_SYMLINK", 1, Arch.NATIVE,
                       target="libfoo.so.2", module="x", extra=("some/where",))),
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
        # nvidia-installer rejects an inherited path for a file outside any folder.
        ("nv.c 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:0 MODULE:resman",
         "needs INHERIT_PATH_DEPTH:N"),
        ("libcuda.so.1 0000 CUDA_SYMLINK NATIVE / /usr/lib/libcuda.so MODULE:compute",
         "symlink libcuda.so.1 has the absolute target '/usr/lib/libcuda.so'"),
        ("libfoo.so.1 0000 SHINY_NEW_SYMLINK NATIVE MODULE:x", "symlink libfoo.so.1 lacks its "
         "target"),
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


# nvidia-installer 590.48.01's type table (manifest.c), the columns a line's fields depend on:
# has_arch, has_path, is_symlink, inherit_path (T/F).
NVIDIA_TYPES = """
    KERNEL_MODULE_SRC:FFFT KERNEL_MODULE:FFFF CUDA_ICD:FFFF OPENGL_LIB:TFFF WINE_LIB:TFFF
    CUDA_LIB:TTFF OPENCL_LIB:TTFF OPENCL_WRAPPER_LIB:TTFF OPENCL_LIB_SYMLINK:TTTF
    OPENCL_WRAPPER_SYMLINK:TTTF TLS_LIB:TTFF UTILITY_LIB:TFFF GBM_BACKEND_LIB:TFFF
    DOCUMENTATION:FTFF APPLICATION_PROFILE:FTFF MANPAGE:FTFF EXPLICIT_PATH:FTFF
    OPENGL_SYMLINK:TFTF CUDA_SYMLINK:TTTF UTILITY_LIB_SYMLINK:TFTF GBM_BACKEND_LIB_SYMLINK:TFTF
    INSTALLER_BINARY:FFFF UTILITY_BINARY:FFFF UTILITY_BIN_SYMLINK:FFTF DOT_DESKTOP:FTFF
    ICON:FTFF XMODULE_SHARED_LIB:FTFF GLX_MODULE_SHARED_LIB:FTFF GLX_MODULE_SYMLINK:FTTF
    VDPAU_LIB:TTFF VDPAU_SYMLINK:TTTF NVCUVID_LIB:TFFF NVCUVID_LIB_SYMLINK:TFTF
    ENCODEAPI_LIB:TFFF ENCODEAPI_LIB_SYMLINK:TFTF VGX_LIB:FFFF VGX_LIB_SYMLINK:FFTF
    GRID_LIB:FTFF GRID_LIB_SYMLINK:FTTF NVIDIA_MODPROBE:FTFF NVIDIA_MODPROBE_MANPAGE:FTFF
    MODULE_SIGNING_KEY:FFFF XORG_OUTPUTCLASS_CONFIG:FFFF DKMS_CONF:FFFT GLVND_LIB:TFFF
    GLVND_SYMLINK:TFTF GLX_CLIENT_LIB:TFFF GLX_CLIENT_SYMLINK:TFTF VULKAN_ICD_JSON:FTFF
    GLVND_EGL_ICD_JSON:FFFF EGL_CLIENT_LIB:TFFF EGL_CLIENT_SYMLINK:TFTF
    EGL_EXTERNAL_PLATFORM_JSON:FFFF FLEXERA_LIB:FTFF FLEXERA_LIB_SYMLINK:FTTF
    INTERNAL_UTILITY_BINARY:TFFF INTERNAL_UTILITY_LIB:TFFF INTERNAL_UTILITY_DATA:FFFF
    FIRMWARE:FFFT SYSTEMD_UNIT:FFFF SYSTEMD_UNIT_SYMLINK:FTTF SYSTEMD_SLEEP_SCRIPT:FFFF
    OPENGL_DATA:FTFF VULKANSC_ICD_JSON:FTFF SANDBOXUTILS_FILELIST_JSON:FTFF
"""


@pytest.mark.parametrize("row", NVIDIA_TYPES.split())
def test_type_table_is_nvidia_installers(row: str) -> None:
    name, flags = row.split(":")
    info = FILE_TYPES[name]
    assert (info.has_arch, info.has_path, info.is_symlink, info.inherit_path) == tuple(
        f == "T" for f in flags)


@pytest.mark.parametrize("type_name", [t for t, info in FILE_TYPES.items() if info.is_symlink])
def test_every_symlink_type_gets_its_target(type_name: str) -> None:
    info = FILE_TYPES[type_name]
    line = " ".join(["libx.so.1", "0000", type_name, *(["NATIVE"] if info.has_arch else []),
                     *(["lib"] if info.has_path else []), "libx.so.2", "MODULE:m"])
    entry = parse_entry(line, 1)
    assert entry.is_symlink and entry.target == "libx.so.2"


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
