"""The bundle's layout: where each file goes in the archive, and what MANIFEST.json and
SHA256SUMS hold. Shared by the writer (bundle.py) and the reader (inspection.py).

    install_nvidia.sh  nvidia.service  startup.sh      (when the package data has them)
    node/...                                           the rest of resources/node/
    payload/<driver-version>/{bin,lib64,lib32,firmware/nvidia/<driver-version>,...}
    payload/<driver-version>/modules/<kernel-release>/<module>.ko
    MANIFEST.json  SHA256SUMS                          last: they describe everything above
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from coreos_gpu.manifest import Arch, ManifestEntry

FORMAT = 1  # of MANIFEST.json; raise it when a reader would misread a new layout
MANIFEST_NAME = "MANIFEST.json"
SUMS_NAME = "SHA256SUMS"
# Every member that is not a folder, with its kind and mode (and a link's target), one per
# line, for install_nvidia.sh: sh cannot read MANIFEST.json, and SHA256SUMS says nothing
# about links and modes.
CONTENTS_NAME = "node/contents"
# The public key of the repository a bundle's nodes fetch from (build --repository-key).
REPOSITORY_KEY_NAME = "node/repository.pub"
PAYLOAD = "payload"
NODE = "node"
# The names the original shell version's users already script against stay at the top.
NODE_TOP_LEVEL = frozenset({"install_nvidia.sh", "nvidia.service", "startup.sh"})
# The machine a bundle is for, as `uname -m` names it: we build from NVIDIA-Linux-x86_64 .run
# files (driver.py) for x86_64 kernels (Flatcar's amd64-usr board). MANIFEST.json's "arch"
# and bundle.env's ARCH, which install_nvidia.sh compares with the node's `uname -m`.
MACHINE = "x86_64"

# Folders for types whose manifest path is missing or means nothing off nvidia-installer.
_FOLDERS = {
    "UTILITY_BINARY": "bin", "UTILITY_BIN_SYMLINK": "bin", "NVIDIA_MODPROBE": "bin",
    "INTERNAL_UTILITY_BINARY": "bin",
    "CUDA_ICD": "etc/OpenCL/vendors",
    "DOCUMENTATION": "share/doc", "MANPAGE": "share/man", "NVIDIA_MODPROBE_MANPAGE": "share/man",
    "GLVND_EGL_ICD_JSON": "share/glvnd/egl_vendor.d",
    "EGL_EXTERNAL_PLATFORM_JSON": "share/egl/egl_external_platform.d",
    "VULKAN_ICD_JSON": "share/vulkan/icd.d", "VULKANSC_ICD_JSON": "share/vulkansc/icd.d",
    "XORG_OUTPUTCLASS_CONFIG": "share/X11/xorg.conf.d",
    "APPLICATION_PROFILE": "share/nvidia", "SYSTEMD_UNIT": "lib/systemd/system",
    "XMODULE_SHARED_LIB": "lib64/xorg/modules", "GLX_MODULE_SHARED_LIB": "lib64/xorg/modules",
    "GLX_MODULE_SYMLINK": "lib64/xorg/modules",
}
# Types whose manifest path is relative to the folder above, not to the install prefix.
_PATH_UNDER_FOLDER = frozenset({"XMODULE_SHARED_LIB", "GLX_MODULE_SHARED_LIB",
                                "GLX_MODULE_SYMLINK"})
# Binaries and the ICD go where the node expects them whatever path the manifest gives.
_FIXED_FOLDER = frozenset({"UTILITY_BINARY", "UTILITY_BIN_SYMLINK", "NVIDIA_MODPROBE",
                           "INTERNAL_UTILITY_BINARY", "CUDA_ICD"})
# nvidia-installer puts GBM backend links in <libdir>/gbm/; their target is ../lib….
_LIB_SUBDIRS = {"GBM_BACKEND_LIB_SYMLINK": "gbm"}


@dataclass(frozen=True)
class ReleaseInputs:
    """One OS release the bundle is built for; several may share one kernel."""

    os: str
    channel: str
    version: str
    kernel_release: str
    image_url: str
    image_sha256: str

    def to_json(self) -> dict[str, str]:
        return {"os": self.os, "channel": self.channel, "version": self.version,
                "kernel_release": self.kernel_release, "image_url": self.image_url,
                "image_sha256": self.image_sha256}


def payload_dir(version: str) -> str:
    return f"{PAYLOAD}/{version}"


def module_path(version: str, kernel_release: str, name: str) -> str:
    return f"{payload_dir(version)}/modules/{kernel_release}/{name}.ko"


def _sub_path(path: str | None) -> str:
    """A manifest install path relative to the prefix: "/" → "", "/usr/bin" → "bin"."""
    parts = PurePosixPath((path or "").strip("/")).parts
    parts = parts[1:] if parts[:1] == ("usr",) else parts
    return "/".join(p for p in parts if p != ".")


def payload_path(entry: ManifestEntry, version: str) -> str:
    """Where a manifest entry goes, relative to payload/<version>/."""
    if entry.type == "FIRMWARE":
        # The kernel asks for nvidia/<version>/gsp_*.bin below its firmware search path,
        # which the node points at /opt/nvidia/<version>/firmware.
        return f"firmware/nvidia/{version}/{entry.name}"
    sub = _sub_path(entry.path)
    if entry.arch is not None:
        folder = "lib32" if entry.arch is Arch.COMPAT32 else "lib64"
        sub = _LIB_SUBDIRS.get(entry.type, sub)
    elif entry.type in _FIXED_FOLDER or (entry.type in _FOLDERS and not sub):
        folder, sub = _FOLDERS[entry.type], ""
    elif entry.type in _PATH_UNDER_FOLDER:
        folder = _FOLDERS[entry.type]
    elif sub:
        folder = ""  # DOCUMENTATION share/doc/NVIDIA_GLX-1.0, MANPAGE share/man/man1, …
    else:
        folder = "share/nvidia"  # types newer than this table
    return "/".join(p for p in (folder, sub, entry.name) if p)


_PARTS = {"lib64": "libraries", "lib32": "libraries", "bin": "binaries",
          "firmware": "firmware"}


def part_of(path: str) -> str:
    """Which part of the bundle an archive path belongs to, for size reports."""
    parts = path.split("/")
    if path in (MANIFEST_NAME, SUMS_NAME):
        return "metadata"
    if parts[0] == NODE or path in NODE_TOP_LEVEL:
        return "node files"
    if parts[0] == PAYLOAD and len(parts) > 3:
        if parts[2] == "modules" and len(parts) > 4:
            return f"modules {parts[3]}"
        return _PARTS.get(parts[2], "other")
    return "other"


# A line of `sha256sum` output: two spaces (text mode) or " *" (binary mode).
SUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def render_contents(members: Mapping[str, tuple[int, str | None]]) -> bytes:
    """node/contents: "<mode> file <path>" or "<mode> link <path> <target>" lines, sorted by
    path, from {path: (mode, link target or None)}. Its format has no quoting, so a name
    with white space in it cannot be bundled."""
    lines = []
    for path in sorted(members):
        mode, target = members[path]
        if any(c.isspace() for c in path + (target or "")):
            raise ValueError(f"{path!r} (or its link target) has white space in it")
        lines.append(f"{mode:04o} file {path}" if target is None
                     else f"{mode:04o} link {path} {target}")
    return "".join(f"{line}\n" for line in lines).encode()


def render_sums(sums: Mapping[str, str]) -> bytes:
    """`sha256sum -c` input: "<hex>  <path>" lines, sorted by path."""
    return "".join(f"{sums[path]}  {path}\n" for path in sorted(sums)).encode()

