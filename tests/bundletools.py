"""Small synthetic inputs of the bundle stage, for the tests of every stage after it: the
test driver's package (a handful of files with a .manifest in NVIDIA's format), its kernel
modules as real ELF objects with a .modinfo section compiled here with gcc, the two test
kernels and their releases; and helpers that extract, check and rewrite bundle archives.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from coreos_gpu.archive import open_archive
from coreos_gpu.bundle import ReleaseInputs
from coreos_gpu.cache import sha256_of
from coreos_gpu.config import KernelModuleType
from coreos_gpu.driver import DriverPackage, read_package
from coreos_gpu.manifest import parse_entry
from coreos_gpu.modules import KernelModule, ModuleSet

from .test_manifest import NEW_HEADER

VERSION = "535.261.03"
KERNEL = "6.1.0-50-amd64"
CLOUD = "6.1.0-50-cloud-amd64"  # another kernel, for mismatches
ENTRIES = f"""\
kernel/Makefile 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:resman
libnvidia-ml.so.{VERSION} 0755 UTILITY_LIB NATIVE MODULE:nvml
libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.{VERSION} MODULE:nvml
libcuda.so.{VERSION} 0755 CUDA_LIB NATIVE / MODULE:compute
libcuda.so.1 0000 CUDA_SYMLINK NATIVE / libcuda.so.{VERSION} MODULE:compute
libcuda.so 0000 CUDA_SYMLINK NATIVE / libcuda.so.1 MODULE:compute
32/libcuda.so.{VERSION} 0755 CUDA_LIB COMPAT32 / MODULE:compute
32/libcuda.so.1 0000 CUDA_SYMLINK COMPAT32 / libcuda.so.{VERSION} MODULE:compute
libvdpau_nvidia.so.{VERSION} 0755 VDPAU_LIB NATIVE vdpau MODULE:vdpau
nvidia.icd 0644 CUDA_ICD MODULE:opencl
nvidia-smi 0755 UTILITY_BINARY MODULE:nvml
nvidia-modprobe 4755 NVIDIA_MODPROBE /usr/bin MODULE:installer
firmware/gsp_ga10x.bin 0644 FIRMWARE INHERIT_PATH_DEPTH:1 MODULE:gsp
NVIDIA_Changelog 0644 DOCUMENTATION share/doc/NVIDIA_GLX-1.0 MODULE:installer
"""
# What persistence = daemon needs (make_package(extra=PERSISTENCED)); the others go without.
PERSISTENCED = "nvidia-persistenced 0755 UTILITY_BINARY MODULE:nvidia-persistenced\n"
MODULES = ("nvidia", "nvidia-modeset", "nvidia-uvm")
RELEASE = ReleaseInputs(
    os="flatcar", channel="stable", version="3975.2.2", kernel_release=KERNEL,
    image_url="https://stable.release.flatcar-linux.net/amd64-usr/3975.2.2/"
    "flatcar_developer_container.bin.bz2", image_sha256="2" * 64)
CLOUD_RELEASE = ReleaseInputs(
    os="flatcar", channel="stable", version="4081.2.0", kernel_release=CLOUD,
    image_url="https://stable.release.flatcar-linux.net/amd64-usr/4081.2.0/"
    "flatcar_developer_container.bin.bz2", image_sha256="3" * 64)
RUN_URL = f"https://us.download.nvidia.com/tesla/{VERSION}/NVIDIA-Linux-x86_64-{VERSION}.run"
MODINFO_C = """\
#define MODINFO(n, s) \\
    __attribute__((section(".modinfo"), used, aligned(1))) static const char n[] = s
MODINFO(a, "version=%(version)s");
MODINFO(b, "depends=%(depends)s");
MODINFO(c, "name=%(name)s");
MODINFO(d, "vermagic=%(kernel)s SMP preempt mod_unload modversions ");
int init_module(void) { return 0; }
"""


def make_package(root: Path, *, extra: str = "") -> DriverPackage:
    """The package of ENTRIES, and of the manifest lines in extra."""
    (root / "kernel").mkdir(parents=True)
    (root / "kernel/Makefile").write_text("all:\n")
    (root / ".manifest").write_text(NEW_HEADER + ENTRIES + extra)
    for line in (ENTRIES + extra).splitlines():
        entry = parse_entry(line, 1)
        path = root / entry.file
        path.parent.mkdir(parents=True, exist_ok=True)
        if entry.target:
            path.symlink_to(entry.target)
        elif not path.exists():
            path.write_bytes(f"{entry.file} of driver {VERSION}\n".encode() * 50)
    return read_package(root, sha256="1" * 64, source=RUN_URL)


def make_ko(folder: Path, name: str, kernel: str, version: str = VERSION) -> Path:
    """A real ELF relocatable object whose .modinfo says what a built module's does."""
    path = folder / f"{kernel}-{version}" / f"{name}.ko"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        source = MODINFO_C % {"version": version, "kernel": kernel, "name": name,
                              "depends": "nvidia" if name != "nvidia" else ""}
        subprocess.run(["gcc", "-c", "-x", "c", "-", "-o", path], input=source.encode(),
                       check=True)
    return path



def module_set(ko_dir: Path, kernel: str, *, built_for: str = "") -> ModuleSet:
    """The modules of one kernel; built_for makes the .ko files lie about their kernel."""
    modules = []
    for name in MODULES:
        ko = make_ko(ko_dir, name, built_for or kernel)
        modules.append(KernelModule(
            name=name, path=ko, sha256=sha256_of(ko), size=ko.stat().st_size,
            vermagic=f"{kernel} SMP preempt mod_unload modversions ", version=VERSION,
            depends=("nvidia",) if name != "nvidia" else ()))
    return ModuleSet(kernel_release=kernel, flavour=KernelModuleType.PROPRIETARY,
                     driver_version=VERSION, modules=tuple(modules), folder=ko_dir,
                     key="4" * 64)


def rewrite(source: Path, dest: Path,
            change: Callable[[tarfile.TarInfo, bytes], bytes | None],
            extra: dict[str, bytes] | None = None) -> Path:
    """Rebuild an archive member by member; change returns new data, or None to drop it."""
    with tarfile.open(source) as old, tarfile.open(dest, "w:gz") as new:
        for member in old.getmembers():
            stream = old.extractfile(member)
            data = change(member, stream.read() if stream else b"")
            if data is not None:
                member.size = len(data) if member.isreg() else 0
                new.addfile(member, io.BytesIO(data) if member.isreg() else None)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))
    return dest



def dangling_links(root: Path) -> list[str]:
    """The symlinks below root (an extracted bundle) that do not end at a file inside its
    payload folder, each as "link -> target"; [] when every one resolves."""
    bad = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            try:
                end = path.resolve(strict=True)
                end.relative_to((root / "payload").resolve())
                assert end.is_file()
            except (OSError, ValueError, AssertionError):
                bad.append(f"{path.relative_to(root)} -> {os.readlink(path)}")
    return bad


def extract(archive: Path, dest: Path) -> Path:
    with open_archive(archive) as opened:
        opened.tar.extractall(dest, filter="data")
    return dest
