"""A real-format NVIDIA-Linux-x86_64-535.261.03.run, assembled from Debian's NVIDIA packages.

The tree looks like NVIDIA's extracted .run: kernel/ and kernel-open/ sources, userspace under
NVIDIA's file names, 32/, firmware/ and a `.manifest` in nvidia-installer's format. Like NVIDIA's,
it holds no symlinks: the manifest's `*_SYMLINK` entries name links that nvidia-installer makes
from their targets. It is packed as a shell header plus an xz tar that accepts NVIDIA's
`-x [--target DIR]`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu.run import run
from testinputs.cache import build_cached
from testinputs.debian import extract_deb, fetch_debs

VERSION = "535.261.03"
DEBIAN_VERSION = f"{VERSION}-1"
PACKAGE_DIR = f"NVIDIA-Linux-x86_64-{VERSION}"
RUN_NAME = f"{PACKAGE_DIR}.run"
DESCRIPTION = "NVIDIA Accelerated Graphics Driver for Linux-x86_64"
# Pinned: bookworm-security already carries a newer driver (535.309.01); inputs must not drift.
# nvidia-persistenced and nvidia-modprobe exist in bookworm only at these older versions.
PACKAGES = (
    f"nvidia-kernel-source={DEBIAN_VERSION}",
    f"nvidia-open-kernel-source={DEBIAN_VERSION}",
    f"nvidia-smi={DEBIAN_VERSION}",
    f"nvidia-driver-bin={DEBIAN_VERSION}",
    f"nvidia-cuda-mps={DEBIAN_VERSION}",
    "nvidia-persistenced=535.171.04-1~deb12u1",
    "nvidia-modprobe=535.161.07-1~deb12u1",
    f"libnvidia-ml1={DEBIAN_VERSION}",
    f"libcuda1={DEBIAN_VERSION}",
    f"libcuda1:i386={DEBIAN_VERSION}",
    f"libnvidia-ptxjitcompiler1={DEBIAN_VERSION}",
    f"libnvidia-cfg1={DEBIAN_VERSION}",
    f"nvidia-opencl-icd={DEBIAN_VERSION}",
    f"nvidia-opencl-common={DEBIAN_VERSION}",
    f"libglx-nvidia0={DEBIAN_VERSION}",
    f"libegl-nvidia0={DEBIAN_VERSION}",
    f"libnvidia-glcore={DEBIAN_VERSION}",
    f"firmware-nvidia-gsp={DEBIAN_VERSION}",
)
KERNEL_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem")
# Kernel source tarballs Debian ships under /usr/src: (package, tarball, its top dir, our dir).
KERNEL_TARBALLS = (
    ("nvidia-kernel-source", "nvidia-kernel.tar.xz", "modules/nvidia-kernel", "kernel"),
    ("nvidia-open-kernel-source", "nvidia-open-kernel.tar.xz", "modules/nvidia-open-kernel",
     "kernel-open"),
)

# nvidia-installer 535's file type table (manifest.c): which optional fields a line carries.
#                      has_arch has_path is_symlink inherit_path
FILE_TYPES: dict[str, tuple[bool, bool, bool, bool]] = {
    "KERNEL_MODULE_SRC": (False, False, False, True),
    "DKMS_CONF": (False, False, False, True),
    "FIRMWARE": (False, False, False, True),
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

LIB64 = "usr/lib/x86_64-linux-gnu/nvidia/current"
LIB32 = "usr/lib/i386-linux-gnu/nvidia/current"


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


def _lib(name: str, package: str, type_: str, module: str, *, lib_dir: str = LIB64) -> Pick:
    return Pick(name, package, f"{lib_dir}/{Path(name).name}", type_, module)


V = VERSION
PICKS = (
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
    Pick("nvidia-persistenced", "nvidia-persistenced", "usr/bin/nvidia-persistenced",
         "UTILITY_BINARY", "persistenced"),
    # NVIDIA ships it setuid (4755); a setuid-root file in a user's cache is not worth it here.
    Pick("nvidia-modprobe", "nvidia-modprobe", "usr/bin/nvidia-modprobe", "NVIDIA_MODPROBE",
         "installer", path="/usr/bin"),
    _lib(f"libnvidia-ml.so.{V}", "libnvidia-ml1", "UTILITY_LIB", "nvml"),
    _lib(f"libnvidia-cfg.so.{V}", "libnvidia-cfg1", "UTILITY_LIB", "installer"),
    _lib(f"libcuda.so.{V}", "libcuda1", "CUDA_LIB", "compute"),
    _lib(f"libnvidia-ptxjitcompiler.so.{V}", "libnvidia-ptxjitcompiler1", "CUDA_LIB", "compute"),
    _lib(f"32/libcuda.so.{V}", "libcuda1:i386", "CUDA_LIB", "compute", lib_dir=LIB32),
    _lib(f"libnvidia-opencl.so.{V}", "nvidia-opencl-icd", "OPENCL_LIB", "opencl"),
    _lib(f"libGLX_nvidia.so.{V}", "libglx-nvidia0", "GLX_CLIENT_LIB", "opengl"),
    _lib(f"libEGL_nvidia.so.{V}", "libegl-nvidia0", "EGL_CLIENT_LIB", "opengl"),
    _lib(f"libnvidia-glcore.so.{V}", "libnvidia-glcore", "OPENGL_LIB", "opengl",
         lib_dir="usr/lib/x86_64-linux-gnu"),
    _lib(f"libnvidia-tls.so.{V}", "libnvidia-glcore", "OPENGL_LIB", "opengl",
         lib_dir="usr/lib/x86_64-linux-gnu"),
    Pick("nvidia.icd", "nvidia-opencl-common", "etc/OpenCL/vendors/nvidia.icd", "CUDA_ICD",
         "opencl", mode=0o644),
    Pick("firmware/gsp_ga10x.bin", "firmware-nvidia-gsp", f"lib/firmware/nvidia/{V}/gsp_ga10x.bin",
         "FIRMWARE", "gsp", mode=0o644),
    Pick("firmware/gsp_tu10x.bin", "firmware-nvidia-gsp", f"lib/firmware/nvidia/{V}/gsp_tu10x.bin",
         "FIRMWARE", "gsp", mode=0o644),
)
# Soname links as Debian (and NVIDIA's manifest) name them; `.so` dev links only where NVIDIA
# ships one. libGLX_nvidia/libEGL_nvidia have soname .0, not .1.
LINKS = (
    Link("libnvidia-ml.so.1", f"libnvidia-ml.so.{V}", "UTILITY_LIB_SYMLINK", "nvml"),
    Link("libnvidia-ml.so", "libnvidia-ml.so.1", "UTILITY_LIB_SYMLINK", "nvml"),
    Link("libnvidia-cfg.so.1", f"libnvidia-cfg.so.{V}", "UTILITY_LIB_SYMLINK", "installer"),
    Link("libcuda.so.1", f"libcuda.so.{V}", "CUDA_SYMLINK", "compute"),
    Link("libcuda.so", "libcuda.so.1", "CUDA_SYMLINK", "compute"),
    Link("libnvidia-ptxjitcompiler.so.1", f"libnvidia-ptxjitcompiler.so.{V}", "CUDA_SYMLINK",
         "compute"),
    Link("32/libcuda.so.1", f"libcuda.so.{V}", "CUDA_SYMLINK", "compute"),
    Link("32/libcuda.so", "libcuda.so.1", "CUDA_SYMLINK", "compute"),
    Link("libnvidia-opencl.so.1", f"libnvidia-opencl.so.{V}", "OPENCL_LIB_SYMLINK", "opencl"),
    Link("libGLX_nvidia.so.0", f"libGLX_nvidia.so.{V}", "GLX_CLIENT_SYMLINK", "opengl"),
    Link("libEGL_nvidia.so.0", f"libEGL_nvidia.so.{V}", "EGL_CLIENT_SYMLINK", "opengl"),
)
RECIPE_SOURCES = ("nvidia_run.py", "debian.py", "cache.py")
DOCUMENTATION = "NVIDIA_Changelog"  # Debian keeps it in the kernel tarball; NVIDIA at the top


def render_manifest_line(
    file: str,
    mode: int,
    type_: str,
    module: str,
    *,
    path: str = "/",
    target: str | None = None,
) -> str:
    """One `.manifest` line; which optional fields appear follows nvidia-installer's table."""
    has_arch, has_path, is_symlink, inherit_path = FILE_TYPES[type_]
    if is_symlink != (target is not None):
        raise ValueError(f"{file}: {type_} {'needs' if is_symlink else 'takes no'} target")
    words = [file, f"{mode:04o}", type_]
    if has_arch:
        words.append("COMPAT32" if file.startswith("32/") else "NATIVE")
    if has_path:
        words.append(path)
    elif inherit_path:
        words.append("INHERIT_PATH_DEPTH:1")  # kernel/nvidia/x.c installs as nvidia/x.c
    if target is not None:
        words.append(target)
    words.append(f"MODULE:{module}")
    return " ".join(words)


def render_manifest_header(modules: list[str]) -> list[str]:
    return [
        DESCRIPTION,
        VERSION,
        "nv-linux.o",  # the kernel interface file name; nvidia-installer ignores it
        " ".join(modules),
        "nvidia-frontend",  # module names to uninstall
        "nvidia-frontend.ko",  # module files to uninstall
        "kernel",  # the kernel module build directory
        "precompiled",  # the precompiled kernel interface directory
    ]


def unpack_kernel_sources(unpacked: Path, tree: Path) -> None:
    """Unpack Debian's kernel source tarballs into kernel/ and kernel-open/ as NVIDIA lays them out.

    Debian's tarballs hold NVIDIA's own Makefile/Kbuild/conftest.sh and the nv-kernel.o_binary
    blobs at NVIDIA's paths; only Debian's debian/ folder is dropped.
    """
    for package, tarball, top, name in KERNEL_TARBALLS:
        with tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
            run(["tar", "-xJf", unpacked / package / "usr/src" / tarball, "-C", tmp])
            shutil.rmtree(Path(tmp) / top / "debian", ignore_errors=True)
            os.rename(Path(tmp) / top, tree / name)
    os.rename(tree / "kernel" / DOCUMENTATION, tree / DOCUMENTATION)


def assemble_tree(unpacked: Path, tree: Path) -> list[str]:
    """Fill tree from the unpacked packages; return its `.manifest` lines."""
    tree.mkdir()
    unpack_kernel_sources(unpacked, tree)
    lines = [render_manifest_line(DOCUMENTATION, 0o644, "DOCUMENTATION", "installer")]
    for sources in ("kernel", "kernel-open"):
        for file in sorted(p for p in (tree / sources).rglob("*") if not p.is_dir()):
            name = file.relative_to(tree).as_posix()
            type_ = "DKMS_CONF" if file.name == "dkms.conf" else "KERNEL_MODULE_SRC"
            mode = file.lstat().st_mode & 0o7777
            lines.append(render_manifest_line(name, mode, type_, "resman"))
    for pick in PICKS:
        dest = tree / pick.name
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(unpacked / pick.package.replace(":", "_") / pick.source, dest)
        dest.chmod(pick.mode)
        lines.append(render_manifest_line(pick.name, pick.mode, pick.type, pick.module,
                                          path=pick.path))
    for link in LINKS:  # in the manifest only, as in NVIDIA's packages
        lines.append(render_manifest_line(link.name, 0, link.type, link.module,
                                          target=link.target))
    return lines


def check_tree(tree: Path, lines: list[str]) -> None:
    """The manifest lists every file of the tree, the tree has no symlink (NVIDIA's have
    none: its links are manifest entries), and 32/ holds a 32-bit ELF."""
    files = {line.split()[0] for line in lines if line.split()[1] != "0000"}
    present = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if not p.is_dir()}
    if files != present:
        raise RuntimeError(f"manifest/tree mismatch: {sorted(files ^ present)[:10]}")
    links = [p for p in tree.rglob("*") if p.is_symlink()]
    if links:
        raise RuntimeError(f"the tree holds symlinks, which NVIDIA's packages do not: {links[:3]}")
    # e_ident[EI_CLASS] is 1 for ELFCLASS32.
    if (tree / f"32/libcuda.so.{VERSION}").read_bytes()[:5] != b"\x7fELF\x01":
        raise RuntimeError("32/libcuda.so is not a 32-bit ELF file")


RUN_HEADER = string.Template(r"""#!/bin/sh
# Self-extracting NVIDIA driver package (a test input of coreos-gpu, built from Debian's
# NVIDIA packages). Like NVIDIA's .run it extracts with -x [--target DIR]; it installs nothing.
set -eu

label='$label'
pkgdir='$pkgdir'
payload_sha256='$sha256'
skip=$skip  # the xz-compressed tar starts on this line

usage() {
    cat <<EOF
Usage: sh $$0 [OPTIONS]
  -x, --extract-only     extract into ./$$pkgdir (or --target)
  --target DIR           extract into DIR (created; must be absent or empty)
  --check                verify the payload checksum and exit
  --info                 print a description of this package and exit
  -h, --help             print this help and exit
EOF
}

die() {
    echo "$$0: $$*" >&2
    exit 1
}

payload() {
    tail -n +"$$skip" "$$0"
}

check_payload() {
    actual=$$(payload | sha256sum | cut -d' ' -f1)
    [ "$$actual" = "$$payload_sha256" ] ||
        die "payload checksum mismatch: the file is corrupt or truncated" \
            "(expected sha256 $$payload_sha256, got $$actual)"
}

extract=false
check=false
target=$$pkgdir
while [ $$# -gt 0 ]; do
    case $$1 in
        -x | --extract-only) extract=true ;;
        --target)
            [ $$# -ge 2 ] || die "--target needs a directory"
            target=$$2
            shift
            ;;
        --target=*) target=$${1#--target=} ;;
        --check) check=true ;;
        --info)
            echo "Identification: $$label"
            echo "Target directory: $$pkgdir"
            echo "Compression: xz"
            echo "Payload sha256: $$payload_sha256"
            exit 0
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown option: $$1 (see --help)" ;;
    esac
    shift
done

if $$check; then
    check_payload
    echo "$$0: payload checksum OK"
    exit 0
fi
$$extract || die "this package can only be extracted: use -x [--target DIR]"
[ -n "$$target" ] || die "--target needs a directory"
if [ -e "$$target" ] || [ -L "$$target" ]; then
    [ -d "$$target" ] || die "target $$target exists and is not a directory"
    [ -z "$$(ls -A "$$target")" ] || die "target directory $$target is not empty"
fi
command -v xz >/dev/null 2>&1 || die "xz is needed to extract this package"
check_payload
mkdir -p "$$target"
payload | xz -dc -T0 | tar -xpf - -C "$$target"
exit 0
""")


def render_run_header(*, sha256: str, skip: int) -> str:
    return RUN_HEADER.substitute(
        label=f"{DESCRIPTION} {VERSION}", pkgdir=PACKAGE_DIR, sha256=sha256, skip=skip
    )


def write_run(tree: Path, run_file: Path) -> None:
    payload = run_file.with_suffix(".tar")
    run(["tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
         "-C", tree, "-cf", payload, "."])
    # -1: a fifth of -6's time for 10% more bytes; -T0 writes blocks that xz >= 5.4 can
    # also decompress in parallel.
    run(["xz", "-1", "-T0", "-f", payload])
    compressed = payload.with_name(payload.name + ".xz")
    digest = hashlib.sha256()
    with open(compressed, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    # The header's line count does not depend on the values put in it.
    skip = render_run_header(sha256="", skip=0).count("\n") + 1
    header = render_run_header(sha256=digest.hexdigest(), skip=skip)
    with open(run_file, "wb") as out, open(compressed, "rb") as f:
        out.write(header.encode())
        shutil.copyfileobj(f, out, 1 << 20)
    compressed.unlink()
    run_file.chmod(0o755)


def build_into(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        unpacked = work / "unpacked"
        for spec, deb in zip(PACKAGES, fetch_debs(PACKAGES, work / "debs"), strict=True):
            extract_deb(deb, unpacked / spec.partition("=")[0].replace(":", "_"))
        tree = work / PACKAGE_DIR
        lines = assemble_tree(unpacked, tree)
        modules = [m for m in KERNEL_MODULES if (tree / "kernel" / m).is_dir()]
        check_tree(tree, lines)
        manifest = render_manifest_header(modules) + lines
        (tree / ".manifest").write_text("\n".join(manifest) + "\n")
        write_run(tree, out / RUN_NAME)


def recipe() -> bytes:
    """What the result depends on: this builder's code and the pinned packages."""
    here = Path(__file__).parent
    sources = [(here / name).read_bytes() for name in RECIPE_SOURCES]
    return b"".join([*sources, "\n".join(PACKAGES).encode()])


def build_nvidia_run() -> Path:
    """The path of a cached NVIDIA-Linux-x86_64-535.261.03.run, built on first use."""
    return build_cached("nvidia-run", recipe(), build_into) / RUN_NAME
