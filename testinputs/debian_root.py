"""Debian bookworm roots for test inputs: debootstrap, chroot, trimming, and ext4 images of them.

Both the Flatcar developer container and the VM image are such roots, with Debian's kernel
6.1.0-50 (pinned here once for both). Everything here needs root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from coreos_gpu.run import run
from testinputs.debian import RELEASE, apt_dir, debian_mirror, find_debian_source

KERNEL_ABI = "6.1.0-50"
# Pinned: a Debian point release moves bookworm to a new ABI; fetch_debs keeps these in its store.
KERNEL_DEBIAN_VERSION = "6.1.176-1"
SHELL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Big and unused in a test root; apt never runs in one after it is built.
DOCS_AND_CACHES = ("var/cache/apt/*", "var/lib/apt/lists/*", "usr/share/doc/*", "usr/share/man/*",
                   "usr/share/info/*", "usr/share/locale/*", "usr/share/lintian/*",
                   "var/log/*.log", "etc/apt/sources.list", "dev/*")


def sbin_tool(name: str) -> str:
    """The tool's path; root's tools live in sbin, which a non-login shell may lack in PATH."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SHELL_PATH}") or name


def check_root_prerequisites(tools: Mapping[str, str], *, what: str) -> None:
    """tools maps each tool to its Debian package, for the message."""
    if os.geteuid() != 0:
        raise RuntimeError(f"building {what} needs root (debootstrap, chroot)")
    missing = {tool: package for tool, package in tools.items() if sbin_tool(tool) == tool}
    if missing:
        raise RuntimeError(f"{what} needs {', '.join(missing)}: "
                           f"apt-get install {' '.join(sorted(set(missing.values())))}")


def in_root(root: Path, *argv: str) -> str:
    """Run argv chrooted into root, with a clean environment."""
    env = {"PATH": SHELL_PATH, "LC_ALL": "C", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}
    return run([sbin_tool("chroot"), root, *argv], env=env, what=f"running {argv[0]} in {root}"
               ).stdout


def bootstrap_root(root: Path, include: Iterable[str], *, what: str) -> None:
    """debootstrap minbase plus include, from the mirror this machine's apt uses."""
    cache = apt_dir() / "debootstrap"  # keeps the .debs: a recipe change downloads nothing
    cache.mkdir(parents=True, exist_ok=True)
    source = find_debian_source()
    keyring = source.signed_by if source.signed_by and source.signed_by.startswith("/") else None
    run([sbin_tool("debootstrap"), "--variant=minbase", "--arch=amd64",
         f"--include={','.join(include)}", f"--cache-dir={cache}",
         *([f"--keyring={keyring}"] if keyring else []),
         RELEASE, root, debian_mirror()], timeout=1800, what=f"debootstrap of {what}",
        # debootstrap itself calls chroot and mknod from sbin.
        env={**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{SHELL_PATH}"})


def remove_paths(root: Path, patterns: Iterable[str]) -> None:
    """Delete what the glob patterns (relative to root) match; links are removed, not followed."""
    for pattern in patterns:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inodes) the tree needs in an ext4."""
    blocks, inodes = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += 1 + len(filenames)
        for name in filenames:
            size = os.lstat(os.path.join(dirpath, name)).st_size
            blocks += -(-size // 4096)
        blocks += 1 + len(dirnames) // 100  # a directory's own blocks
    return blocks * 4096, inodes


def write_ext4(tree: Path, image: Path, *, size: int, inodes: int, label: str,
               offset: int = 0) -> None:
    """An ext4 of size bytes holding tree, written into image at offset, without mounting.

    The image file must exist (mkfs.ext4 writes into it; a new file stays sparse).
    """
    run([sbin_tool("mkfs.ext4"), "-q", "-F", "-b", "4096", "-N", str(inodes), "-L", label,
         "-d", tree, *(["-E", f"offset={offset}"] if offset else []), image, str(size // 4096)],
        what=f"writing the {label} file system")
