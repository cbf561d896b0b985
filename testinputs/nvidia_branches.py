"""The NVIDIA driver branches the test inputs are built from: what each `.run` holds and where
Debian keeps it.

Two branches, because users run several and their packages differ in ways one branch hides:

- **535** (`nvidia-graphics-drivers`): kernel/ and kernel-open/, GSP firmware, every module
  declares MODULE_VERSION, a `.o` name on the manifest's third line.
- **470** (`nvidia-graphics-drivers-tesla-470`, the legacy branch Kepler GPUs need): kernel/
  only, no GSP firmware package in Debian, nvidia-uvm declares no MODULE_VERSION (its uvm.c
  ends with MODULE_LICENSE and MODULE_INFO only), file types 535 dropped (NVIFR_LIB) and an
  empty third manifest line.

Both are pinned: bookworm-security and -updates move on, and the inputs must not drift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pick:
    """A file of the tree: where it comes from and how the manifest lists it."""

    name: str  # path in the NVIDIA tree
    package: str  # Debian package name (with :arch for foreign ones)
    source: str  # path inside that package
    type: str
    module: str
    mode: int = 0o755
    path: str = "/"  # install sub-path, for types that have one


@dataclass(frozen=True)
class Link:
    name: str
    target: str
    type: str
    module: str


@dataclass(frozen=True)
class KernelTarball:
    """A kernel source tarball Debian ships under /usr/src, and the folder it becomes."""

    package: str
    tarball: str
    top: str  # its top folder
    folder: str  # kernel/ or kernel-open/ in the NVIDIA tree


# Which optional fields a manifest line of each type carries, as nvidia-installer's manifest.c
# table of that branch says: has_arch, has_path, is_symlink, inherit_path. Only the types the
# fixtures use; 470.256.02 and 535 agree on every type both have.
FileFields = tuple[bool, bool, bool, bool]
_COMMON_TYPES: dict[str, FileFields] = {
    "KERNEL_MODULE_SRC": (False, False, False, True),
    "DKMS_CONF": (False, False, False, True),
    "CUDA_ICD": (False, False, False, False),
    "UTILITY_BINARY": (False, False, False, False),
    "NVIDIA_MODPROBE": (False, True, False, False),
    "DOCUMENTATION": (False, True, False, False),
    "CUDA_LIB": (True, True, False, False),
    "OPENCL_LIB": (True, True, False, False),
    "UTILITY_LIB": (True, False, False, False),
    "OPENGL_LIB": (True, False, False, False),
    "GLX_CLIENT_LIB": (True, False, False, False),
    "EGL_CLIENT_LIB": (True, False, False, False),
    "CUDA_SYMLINK": (True, True, True, False),
    "OPENCL_LIB_SYMLINK": (True, True, True, False),
    "UTILITY_LIB_SYMLINK": (True, False, True, False),
    "GLX_CLIENT_SYMLINK": (True, False, True, False),
    "EGL_CLIENT_SYMLINK": (True, False, True, False),
}


@dataclass(frozen=True)
class Branch:
    version: str
    packages: tuple[str, ...]  # NAME[:ARCH]=VERSION
    kernel_tarballs: tuple[KernelTarball, ...]
    picks: tuple[Pick, ...]
    links: tuple[Link, ...]
    file_types: dict[str, FileFields]
    # The manifest's third line, which nvidia-installer reads and ignores ("Ignore the third
    # line", install-from-cwd.c): a `.o` name in some packages, empty in others.
    kernel_interface: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def package_dir(self) -> str:
        return f"NVIDIA-Linux-x86_64-{self.version}"

    @property
    def run_name(self) -> str:
        return f"{self.package_dir}.run"


def _lib(name: str, package: str, type_: str, module: str, *, lib_dir: str) -> Pick:
    return Pick(name, package, f"{lib_dir}/{name.rpartition('/')[2]}", type_, module)


# Debian serves every branch with one nvidia-modprobe, nvidia-persistenced and OpenCL ICD file
# (nvidia-tesla-470-driver recommends the same nvidia-persistenced; its OpenCL ICD depends on
# the same nvidia-opencl-common), at the versions bookworm has.
_SHARED_PACKAGES = ("nvidia-persistenced=535.171.04-1~deb12u1",
                    "nvidia-modprobe=535.161.07-1~deb12u1")


def _shared_picks() -> tuple[Pick, ...]:
    return (
        Pick("nvidia-persistenced", "nvidia-persistenced", "usr/bin/nvidia-persistenced",
             "UTILITY_BINARY", "persistenced"),
        # NVIDIA ships it setuid (4755); a setuid-root file in a user's cache is not worth it.
        Pick("nvidia-modprobe", "nvidia-modprobe", "usr/bin/nvidia-modprobe", "NVIDIA_MODPROBE",
             "installer", path="/usr/bin"),
        Pick("nvidia.icd", "nvidia-opencl-common", "etc/OpenCL/vendors/nvidia.icd", "CUDA_ICD",
             "opencl", mode=0o644),
    )


def _soname_links(v: str) -> tuple[Link, ...]:
    """The links both branches list, as Debian (and NVIDIA's manifest) name them; `.so` dev
    links only where NVIDIA ships one. libGLX_nvidia/libEGL_nvidia have soname .0, not .1."""
    return (
        Link("libnvidia-ml.so.1", f"libnvidia-ml.so.{v}", "UTILITY_LIB_SYMLINK", "nvml"),
        Link("libnvidia-ml.so", "libnvidia-ml.so.1", "UTILITY_LIB_SYMLINK", "nvml"),
        Link("libnvidia-cfg.so.1", f"libnvidia-cfg.so.{v}", "UTILITY_LIB_SYMLINK", "installer"),
        Link("libcuda.so.1", f"libcuda.so.{v}", "CUDA_SYMLINK", "compute"),
        Link("libcuda.so", "libcuda.so.1", "CUDA_SYMLINK", "compute"),
        Link("libnvidia-ptxjitcompiler.so.1", f"libnvidia-ptxjitcompiler.so.{v}",
             "CUDA_SYMLINK", "compute"),
        Link("32/libcuda.so.1", f"libcuda.so.{v}", "CUDA_SYMLINK", "compute"),
        Link("32/libcuda.so", "libcuda.so.1", "CUDA_SYMLINK", "compute"),
        Link("libnvidia-opencl.so.1", f"libnvidia-opencl.so.{v}", "OPENCL_LIB_SYMLINK",
             "opencl"),
        Link("libGLX_nvidia.so.0", f"libGLX_nvidia.so.{v}", "GLX_CLIENT_SYMLINK", "opengl"),
        Link("libEGL_nvidia.so.0", f"libEGL_nvidia.so.{v}", "EGL_CLIENT_SYMLINK", "opengl"),
    )


def _r535() -> Branch:
    v = "535.261.03"
    deb = f"{v}-1"
    lib64 = "usr/lib/x86_64-linux-gnu/nvidia/current"
    lib32 = "usr/lib/i386-linux-gnu/nvidia/current"
    packages = tuple(f"{name}={deb}" for name in (
        "nvidia-kernel-source", "nvidia-open-kernel-source", "nvidia-smi", "nvidia-driver-bin",
        "nvidia-cuda-mps", "libnvidia-ml1", "libcuda1", "libcuda1:i386",
        "libnvidia-ptxjitcompiler1", "libnvidia-cfg1", "nvidia-opencl-icd",
        "nvidia-opencl-common", "libglx-nvidia0", "libegl-nvidia0", "libnvidia-glcore",
        "firmware-nvidia-gsp"))
    picks = (
        Pick("nvidia-smi", "nvidia-smi", "usr/lib/nvidia/current/nvidia-smi", "UTILITY_BINARY",
             "nvml"),
        Pick("nvidia-debugdump", "nvidia-driver-bin", "usr/lib/nvidia/current/nvidia-debugdump",
             "UTILITY_BINARY", "nvml"),
        Pick("nvidia-bug-report.sh", "nvidia-driver-bin",
             "usr/lib/nvidia/current/nvidia-bug-report.sh", "UTILITY_BINARY", "installer"),
        Pick("nvidia-cuda-mps-control", "nvidia-cuda-mps", "usr/bin/nvidia-cuda-mps-control",
             "UTILITY_BINARY", "compute"),
        Pick("nvidia-cuda-mps-server", "nvidia-cuda-mps", "usr/sbin/nvidia-cuda-mps-server",
             "UTILITY_BINARY", "compute"),
        *_shared_picks(),
        _lib(f"libnvidia-ml.so.{v}", "libnvidia-ml1", "UTILITY_LIB", "nvml", lib_dir=lib64),
        _lib(f"libnvidia-cfg.so.{v}", "libnvidia-cfg1", "UTILITY_LIB", "installer",
             lib_dir=lib64),
        _lib(f"libcuda.so.{v}", "libcuda1", "CUDA_LIB", "compute", lib_dir=lib64),
        _lib(f"libnvidia-ptxjitcompiler.so.{v}", "libnvidia-ptxjitcompiler1", "CUDA_LIB",
             "compute", lib_dir=lib64),
        _lib(f"32/libcuda.so.{v}", "libcuda1:i386", "CUDA_LIB", "compute", lib_dir=lib32),
        _lib(f"libnvidia-opencl.so.{v}", "nvidia-opencl-icd", "OPENCL_LIB", "opencl",
             lib_dir=lib64),
        _lib(f"libGLX_nvidia.so.{v}", "libglx-nvidia0", "GLX_CLIENT_LIB", "opengl",
             lib_dir=lib64),
        _lib(f"libEGL_nvidia.so.{v}", "libegl-nvidia0", "EGL_CLIENT_LIB", "opengl",
             lib_dir=lib64),
        _lib(f"libnvidia-glcore.so.{v}", "libnvidia-glcore", "OPENGL_LIB", "opengl",
             lib_dir="usr/lib/x86_64-linux-gnu"),
        _lib(f"libnvidia-tls.so.{v}", "libnvidia-glcore", "OPENGL_LIB", "opengl",
             lib_dir="usr/lib/x86_64-linux-gnu"),
        Pick("firmware/gsp_ga10x.bin", "firmware-nvidia-gsp",
             f"lib/firmware/nvidia/{v}/gsp_ga10x.bin", "FIRMWARE", "gsp", mode=0o644),
        Pick("firmware/gsp_tu10x.bin", "firmware-nvidia-gsp",
             f"lib/firmware/nvidia/{v}/gsp_tu10x.bin", "FIRMWARE", "gsp", mode=0o644),
    )
    links = _soname_links(v)
    return Branch(
        version=v, packages=(*packages, *_SHARED_PACKAGES),
        kernel_tarballs=(
            KernelTarball("nvidia-kernel-source", "nvidia-kernel.tar.xz",
                          "modules/nvidia-kernel", "kernel"),
            KernelTarball("nvidia-open-kernel-source", "nvidia-open-kernel.tar.xz",
                          "modules/nvidia-open-kernel", "kernel-open")),
        picks=picks, links=links,
        file_types={**_COMMON_TYPES, "FIRMWARE": (False, False, False, True)},
        kernel_interface="nv-linux.o")


def _r470() -> Branch:
    v = "470.256.02"
    deb = f"{v}-1~deb12u1"
    lib64 = "usr/lib/x86_64-linux-gnu/nvidia/tesla-470"
    lib32 = "usr/lib/i386-linux-gnu/nvidia/tesla-470"
    tools = "usr/lib/nvidia/tesla-470"
    # Debian's tesla-470 has no nvidia-cuda-mps and no GSP firmware package: this .run has
    # neither (NVIDIA's own 470 .run ships both; the tests need neither).
    packages = tuple(f"{name}={deb}" for name in (
        "nvidia-tesla-470-kernel-source", "nvidia-tesla-470-smi", "nvidia-tesla-470-driver-bin",
        "libnvidia-tesla-470-ml1", "libnvidia-tesla-470-cuda1", "libnvidia-tesla-470-cuda1:i386",
        "libnvidia-tesla-470-ptxjitcompiler1", "libnvidia-tesla-470-cfg1",
        "nvidia-tesla-470-opencl-icd", "libnvidia-tesla-470-ifr1",
        "libglx-nvidia-tesla-470-0", "libegl-nvidia-tesla-470-0",
        "libnvidia-tesla-470-glcore"))
    picks = (
        Pick("nvidia-smi", "nvidia-tesla-470-smi", f"{tools}/nvidia-smi", "UTILITY_BINARY",
             "nvml"),
        Pick("nvidia-debugdump", "nvidia-tesla-470-driver-bin", f"{tools}/nvidia-debugdump",
             "UTILITY_BINARY", "nvml"),
        Pick("nvidia-bug-report.sh", "nvidia-tesla-470-driver-bin",
             f"{tools}/nvidia-bug-report.sh", "UTILITY_BINARY", "installer"),
        *_shared_picks(),
        _lib(f"libnvidia-ml.so.{v}", "libnvidia-tesla-470-ml1", "UTILITY_LIB", "nvml",
             lib_dir=lib64),
        _lib(f"libnvidia-cfg.so.{v}", "libnvidia-tesla-470-cfg1", "UTILITY_LIB", "installer",
             lib_dir=lib64),
        _lib(f"libcuda.so.{v}", "libnvidia-tesla-470-cuda1", "CUDA_LIB", "compute",
             lib_dir=lib64),
        _lib(f"libnvidia-ptxjitcompiler.so.{v}", "libnvidia-tesla-470-ptxjitcompiler1",
             "CUDA_LIB", "compute", lib_dir=lib64),
        _lib(f"32/libcuda.so.{v}", "libnvidia-tesla-470-cuda1:i386", "CUDA_LIB", "compute",
             lib_dir=lib32),
        _lib(f"libnvidia-opencl.so.{v}", "nvidia-tesla-470-opencl-icd", "OPENCL_LIB", "opencl",
             lib_dir=lib64),
        # NVIFR (OpenGL frame readback): a type of its own up to 470, gone by 535.
        _lib(f"libnvidia-ifr.so.{v}", "libnvidia-tesla-470-ifr1", "NVIFR_LIB", "nvfbc",
             lib_dir=lib64),
        _lib(f"libGLX_nvidia.so.{v}", "libglx-nvidia-tesla-470-0", "GLX_CLIENT_LIB", "opengl",
             lib_dir=lib64),
        _lib(f"libEGL_nvidia.so.{v}", "libegl-nvidia-tesla-470-0", "EGL_CLIENT_LIB", "opengl",
             lib_dir=lib64),
        _lib(f"libnvidia-glcore.so.{v}", "libnvidia-tesla-470-glcore", "OPENGL_LIB", "opengl",
             lib_dir="usr/lib/x86_64-linux-gnu"),
        _lib(f"libnvidia-tls.so.{v}", "libnvidia-tesla-470-glcore", "OPENGL_LIB", "opengl",
             lib_dir="usr/lib/x86_64-linux-gnu"),
    )
    links = (*_soname_links(v),
             Link("libnvidia-ifr.so.1", f"libnvidia-ifr.so.{v}", "NVIFR_LIB_SYMLINK", "nvfbc"))
    return Branch(
        version=v, packages=(*packages, "nvidia-opencl-common=535.261.03-1", *_SHARED_PACKAGES),
        kernel_tarballs=(KernelTarball("nvidia-tesla-470-kernel-source",
                                       "nvidia-tesla-470-kernel.tar.xz",
                                       "modules/nvidia-tesla-470-kernel", "kernel"),),
        picks=picks, links=links,
        # 470.256.02's manifest.c: NVIFR_LIB has arch and no path; its links arch and target.
        file_types={**_COMMON_TYPES, "NVIFR_LIB": (True, False, False, False),
                    "NVIFR_LIB_SYMLINK": (True, False, True, False)},
        kernel_interface="")


R535 = _r535()
R470 = _r470()
BRANCHES = {b.major: b for b in (R535, R470)}
