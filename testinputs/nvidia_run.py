"""Real-format NVIDIA-Linux-x86_64-<version>.run files, assembled from Debian's NVIDIA packages
(one per branch in nvidia_branches: 535 and 470).

The tree looks like NVIDIA's extracted .run: kernel/ (and kernel-open/ where the branch has
it) sources, userspace under NVIDIA's file names, 32/, firmware/ where the branch has GSP
firmware, and a `.manifest` in nvidia-installer's format. Like NVIDIA's,
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
from pathlib import Path

from coreos_gpu.run import run
from testinputs.cache import build_cached
from testinputs.debian import extract_deb, fetch_debs
from testinputs.nvidia_branches import R535, Branch, FileFields

KERNEL_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem")
DESCRIPTION = "NVIDIA Accelerated Graphics Driver for Linux-x86_64"
# The tests' default driver; R470 is the second generation.
VERSION = R535.version
PACKAGE_DIR = R535.package_dir
RUN_NAME = R535.run_name
RECIPE_SOURCES = ("nvidia_run.py", "nvidia_branches.py", "debian.py", "cache.py")
DOCUMENTATION = "NVIDIA_Changelog"  # Debian keeps it in the kernel tarball; NVIDIA at the top


def render_manifest_line(
    file: str,
    mode: int,
    type_: str,
    module: str,
    *,
    path: str = "/",
    target: str | None = None,
    file_types: dict[str, FileFields] = R535.file_types,
) -> str:
    """One `.manifest` line; which optional fields appear follows nvidia-installer's table."""
    has_arch, has_path, is_symlink, inherit_path = file_types[type_]
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


def render_manifest_header(modules: list[str], branch: Branch = R535) -> list[str]:
    return [
        DESCRIPTION,
        branch.version,
        branch.kernel_interface,  # read and ignored by nvidia-installer
        " ".join(modules),
        "nvidia-frontend",  # module names to uninstall
        "nvidia-frontend.ko",  # module files to uninstall
        "kernel",  # the kernel module build directory
        "precompiled",  # the precompiled kernel interface directory
    ]


def unpack_kernel_sources(unpacked: Path, tree: Path, branch: Branch) -> None:
    """Unpack Debian's kernel source tarballs into kernel/ (and kernel-open/) as NVIDIA lays
    them out.

    Debian's tarballs hold NVIDIA's own Makefile/Kbuild/conftest.sh and the nv-kernel.o_binary
    blobs at NVIDIA's paths, unpatched (Debian applies debian/patches when it builds); only
    Debian's debian/ folder is dropped.
    """
    for source in branch.kernel_tarballs:
        with tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
            run(["tar", "-xJf", unpacked / source.package / "usr/src" / source.tarball,
                 "-C", tmp])
            shutil.rmtree(Path(tmp) / source.top / "debian", ignore_errors=True)
            os.rename(Path(tmp) / source.top, tree / source.folder)
    os.rename(tree / "kernel" / DOCUMENTATION, tree / DOCUMENTATION)


def assemble_tree(unpacked: Path, tree: Path, branch: Branch = R535) -> list[str]:
    """Fill tree from the unpacked packages; return its `.manifest` lines."""
    tree.mkdir()
    unpack_kernel_sources(unpacked, tree, branch)
    types = branch.file_types
    lines = [render_manifest_line(DOCUMENTATION, 0o644, "DOCUMENTATION", "installer",
                                  file_types=types)]
    for source in branch.kernel_tarballs:
        folder = tree / source.folder
        for file in sorted(p for p in folder.rglob("*") if not p.is_dir()):
            name = file.relative_to(tree).as_posix()
            type_ = "DKMS_CONF" if file.name == "dkms.conf" else "KERNEL_MODULE_SRC"
            mode = file.lstat().st_mode & 0o7777
            lines.append(render_manifest_line(name, mode, type_, "resman", file_types=types))
    for pick in branch.picks:
        dest = tree / pick.name
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(unpacked / pick.package.replace(":", "_") / pick.source, dest)
        dest.chmod(pick.mode)
        lines.append(render_manifest_line(pick.name, pick.mode, pick.type, pick.module,
                                          path=pick.path, file_types=types))
    for link in branch.links:  # in the manifest only, as in NVIDIA's packages
        lines.append(render_manifest_line(link.name, 0, link.type, link.module,
                                          target=link.target, file_types=types))
    return lines


def check_tree(tree: Path, lines: list[str], branch: Branch = R535) -> None:
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
    if (tree / f"32/libcuda.so.{branch.version}").read_bytes()[:5] != b"\x7fELF\x01":
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


def render_run_header(*, sha256: str, skip: int, branch: Branch = R535) -> str:
    return RUN_HEADER.substitute(
        label=f"{DESCRIPTION} {branch.version}", pkgdir=branch.package_dir, sha256=sha256,
        skip=skip)


def write_run(tree: Path, run_file: Path, branch: Branch = R535) -> None:
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
    skip = render_run_header(sha256="", skip=0, branch=branch).count("\n") + 1
    header = render_run_header(sha256=digest.hexdigest(), skip=skip, branch=branch)
    with open(run_file, "wb") as out, open(compressed, "rb") as f:
        out.write(header.encode())
        shutil.copyfileobj(f, out, 1 << 20)
    compressed.unlink()
    run_file.chmod(0o755)


def build_into(out: Path, branch: Branch) -> None:
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        unpacked = work / "unpacked"
        for spec, deb in zip(branch.packages, fetch_debs(branch.packages, work / "debs"),
                             strict=True):
            extract_deb(deb, unpacked / spec.partition("=")[0].replace(":", "_"))
        tree = work / branch.package_dir
        lines = assemble_tree(unpacked, tree, branch)
        modules = [m for m in KERNEL_MODULES if (tree / "kernel" / m).is_dir()]
        check_tree(tree, lines, branch)
        manifest = render_manifest_header(modules, branch) + lines
        (tree / ".manifest").write_text("\n".join(manifest) + "\n")
        write_run(tree, out / branch.run_name, branch)


def recipe(branch: Branch) -> bytes:
    """What the result depends on: this builder's code and the branch's pinned packages."""
    here = Path(__file__).parent
    sources = [(here / name).read_bytes() for name in RECIPE_SOURCES]
    return b"".join([*sources, branch.version.encode(), "\n".join(branch.packages).encode()])


def build_nvidia_run(branch: Branch = R535) -> Path:
    """The path of a cached NVIDIA-Linux-x86_64-<branch.version>.run, built on first use."""
    return build_cached(f"nvidia-run-{branch.major}", recipe(branch),
                        lambda out: build_into(out, branch)) / branch.run_name
