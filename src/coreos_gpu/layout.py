"""The bundle's layout: where each file goes in the archive, and what MANIFEST.json and
SHA256SUMS hold. Shared by the writer (bundle.py) and the reader (inspection.py).

    install_nvidia.sh  nvidia.service  startup.sh      (when the package data has them)
    node/...                                           the rest of resources/node/
    payload/<driver-version>/{bin,lib64,lib32,firmware/nvidia/<driver-version>,...}
    payload/<driver-version>/modules/<kernel-release>/<module>.ko
    MANIFEST.json  SHA256SUMS                          last: they describe everything above
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
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
_LIBDIR = "lib64"  # the native library folder; lib32 holds COMPAT32 files
_UNIT_FOLDER = "lib/systemd/system"  # systemd_unit_prefix, /usr/lib/systemd/system

# Folders for types whose manifest path is missing or means nothing off nvidia-installer.
_FOLDERS = {
    "UTILITY_BINARY": "bin", "UTILITY_BIN_SYMLINK": "bin", "NVIDIA_MODPROBE": "bin",
    "INTERNAL_UTILITY_BINARY": "bin", "INSTALLER_BINARY": "bin",
    "CUDA_ICD": "etc/OpenCL/vendors",
    "DOCUMENTATION": "share/doc", "MANPAGE": "share/man", "NVIDIA_MODPROBE_MANPAGE": "share/man",
    "GLVND_EGL_ICD_JSON": "share/glvnd/egl_vendor.d",
    "EGL_EXTERNAL_PLATFORM_JSON": "share/egl/egl_external_platform.d",
    "VULKAN_ICD_JSON": "share/vulkan/icd.d", "VULKANSC_ICD_JSON": "share/vulkansc/icd.d",
    "XORG_OUTPUTCLASS_CONFIG": "share/X11/xorg.conf.d",
    "APPLICATION_PROFILE": "share/nvidia", "SYSTEMD_UNIT": _UNIT_FOLDER,
    "XMODULE_SHARED_LIB": "lib64/xorg/modules", "GLX_MODULE_SHARED_LIB": "lib64/xorg/modules",
    "GLX_MODULE_SYMLINK": "lib64/xorg/modules",
    # files.c set_destinations: VGX, GRID and FLEXERA libraries and their links carry no
    # arch and go to the OpenGL library folder (+ their path), 64-bit.
    "VGX_LIB": _LIBDIR, "VGX_LIB_SYMLINK": _LIBDIR, "GRID_LIB": _LIBDIR,
    "GRID_LIB_SYMLINK": _LIBDIR, "FLEXERA_LIB": _LIBDIR, "FLEXERA_LIB_SYMLINK": _LIBDIR,
    # systemd_sysconf_prefix (/etc/systemd/system) + path: the unit's .requires folder.
    "SYSTEMD_UNIT_SYMLINK": "etc/systemd/system",
}
# Types whose manifest path is relative to the folder above, not to the install prefix.
_PATH_UNDER_FOLDER = frozenset({"XMODULE_SHARED_LIB", "GLX_MODULE_SHARED_LIB",
                                "GLX_MODULE_SYMLINK", "GRID_LIB", "GRID_LIB_SYMLINK",
                                "FLEXERA_LIB", "FLEXERA_LIB_SYMLINK", "SYSTEMD_UNIT_SYMLINK"})
# Binaries and the ICD go where the node expects them whatever path the manifest gives.
_FIXED_FOLDER = frozenset({"UTILITY_BINARY", "UTILITY_BIN_SYMLINK", "NVIDIA_MODPROBE",
                           "INTERNAL_UTILITY_BINARY", "INSTALLER_BINARY", "CUDA_ICD"})
# GBM backends, files and links, go to <libdir>/gbm whatever their arch: files.c
# set_destinations (495 on), `case FILE_TYPE_GBM_BACKEND_LIB(_SYMLINK)`: `dir =
# op->gbm_backend_dir`, which get_default_prefixes_and_paths makes "<default libdir>/gbm".
_GBM_TYPES = frozenset({"GBM_BACKEND_LIB", "GBM_BACKEND_LIB_SYMLINK"})

# How nvidia-installer makes each link: files.c set_destinations (its switch is the same for
# links in 470.256.02, 535.216.01 and 550.144.03, bar GBM from 495 and NVIFR up to 470) puts
# it where a file of its type goes (payload_path), and command-list.c SYMLINK_CMD → files.c
# install_symlink makes it with a plain symlink(target, dst): the manifest's target is
# resolved against the link's own folder. By type: OPENGL, GLVND, GLX_CLIENT, EGL_CLIENT,
# UTILITY_LIB, NVCUVID_LIB, ENCODEAPI_LIB, NVIFR_LIB → <libdir>; CUDA, OPENCL_LIB,
# OPENCL_WRAPPER, VDPAU, TLS (390) → <libdir>/<path>; GRID_LIB, FLEXERA_LIB → <native
# libdir>/<path>; VGX_LIB → <native libdir>; UTILITY_BIN → <bindir>; GLX_MODULE → <X module
# dir>/<path>. Two cases rewrite the target before the link is made, so their manifest
# target means something else:
# - GBM_BACKEND_LIB_SYMLINK (`target = utility_prefix/utility_libdir/target`, then it falls
#   through to GBM_BACKEND_LIB): a bare library name in <libdir>, linked from <libdir>/gbm.
# - SYSTEMD_UNIT_SYMLINK (`target = systemd_unit_prefix/name`): the manifest's target is
#   dropped; the link names the unit of its own name in /usr/lib/systemd/system.
_REWRITTEN_TARGETS = {"GBM_BACKEND_LIB_SYMLINK": _LIBDIR,  # utility_libdir
                      "SYSTEMD_UNIT_SYMLINK": _UNIT_FOLDER}


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
    if entry.type in _GBM_TYPES:
        folder, sub = f"{_LIBDIR}/gbm", ""
    elif entry.arch is not None:
        folder = "lib32" if entry.arch is Arch.COMPAT32 else _LIBDIR
    elif entry.type in _FIXED_FOLDER or (entry.type in _FOLDERS and not sub):
        folder, sub = _FOLDERS[entry.type], ""
    elif entry.type in _PATH_UNDER_FOLDER:
        folder = _FOLDERS[entry.type]
    elif sub:
        folder = ""  # DOCUMENTATION share/doc/NVIDIA_GLX-1.0, MANPAGE share/man/man1, …
    else:
        folder = "share/nvidia"  # types newer than this table
    return "/".join(p for p in (folder, sub, entry.name) if p)


def link_base(entry: ManifestEntry, version: str) -> str:
    """The folder, below payload/<version>/, that nvidia-installer resolves a link entry's
    target against (see above): the link's own folder, but for GBM backend links the
    library folder, and for systemd unit links the unit folder."""
    return _REWRITTEN_TARGETS.get(entry.type) or posixpath.dirname(
        payload_path(entry, version))


def link_destination(entry: ManifestEntry, version: str) -> str:
    """Where a link entry points, relative to payload/<version>/, normalised: what
    nvidia-installer's link would name once installed. It starts with "../" when the
    target leaves the payload."""
    assert entry.target is not None, entry.file  # parse_entry gives every link its target
    target = entry.name if entry.type == "SYSTEMD_UNIT_SYMLINK" else entry.target
    return posixpath.normpath(posixpath.join(link_base(entry, version), target))


def link_target(entry: ManifestEntry, version: str) -> str:
    """A link entry's target as the archive writes it: relative to the link's folder, so
    that it resolves inside payload/<version>/ wherever the node puts that folder."""
    assert entry.target is not None, entry.file
    if entry.type not in _REWRITTEN_TARGETS:
        return entry.target  # nvidia-installer's symlink() takes it verbatim
    return _relative(link_destination(entry, version),
                           posixpath.dirname(payload_path(entry, version)))


def _relative(path: str, folder: str) -> str:
    """path (below the payload) as seen from folder (below the payload): "../lib.so.1"."""
    into, start = PurePosixPath(path).parts, PurePosixPath(folder).parts
    common = 0
    while common < min(len(into), len(start)) and into[common] == start[common]:
        common += 1
    return "/".join((("..",) * (len(start) - common)) + into[common:]) or "."


def link_resolves_to(name: str, target: str) -> str | None:
    """The archive path a link member points at, as extracting the archive makes it
    ("a/b" → "../c" gives "c"); None for an absolute target or one that leaves the folder
    the archive is extracted to."""
    if target.startswith("/"):
        return None
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return None if resolved == ".." or resolved.startswith("../") else resolved


def dangling_links(names: Iterable[str], links: Mapping[str, str]
                   ) -> list[tuple[str, str, str]]:
    """(link, target, why) for each of links (an archive's link members and their targets;
    names: all its members, folders too) that would dangle once extracted: it points at no
    member (why "missing"), or a chain of links from it leads back to it ("loop"). A link
    whose target leaves the folder the archive is extracted to is not here: link_resolves_to
    gives None for it, and whoever checks links refuses it on its own. The build's last
    check and inspect's."""
    normal = {posixpath.normpath(n) for n in names}
    present = normal | {str(p) for n in normal for p in PurePosixPath(n).parents[:-1]}
    chain = {posixpath.normpath(n): t for n, t in links.items()}
    dangling = []
    for name, target in links.items():
        where = link_resolves_to(name, target)
        if where is None:
            continue
        if where not in present:
            dangling.append((name, target, "missing"))
            continue
        followed = {posixpath.normpath(name)}
        while where is not None and where in chain:
            if where in followed:
                dangling.append((name, target, "loop"))
                break
            followed.add(where)
            where = link_resolves_to(where, chain[where])
    return dangling


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


# --- SHA256SUMS as the node reads it --------------------------------------------------------
# install_nvidia.sh's check_sums takes each line's path as the rest of the line after
# "<hex> " and a space or "*", and then passes it around as one blank-separated field (cut
# -d' ', stat's "%s %n", awk's $2): so lines end at \n only (a \r stays in the path, another
# path), and a path with white space in it names another file there. sha256sum escapes a name
# with a \n or \ in it by a leading "\" on the line, which no line of the writer has.
# spec/sha256sums.json runs these rules through both readers.


def parse_sums(text: str) -> tuple[dict[str, str], list[str]]:
    """SHA256SUMS' sums by path, and its problems: a malformed line, a path that is not
    plain and relative or has white space in it, a path listed twice. A last line without a
    newline is a line."""
    sums: dict[str, str] = {}
    problems = []
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1] if lines[-1] == "" else lines, start=1):
        match = SUM_LINE.fullmatch(line)
        if match is None:
            problems.append(f"{SUMS_NAME} line {number} is not '<sha256>  <path>'")
            continue
        expected, name = match.groups()
        if any(c.isspace() for c in name):
            problems.append(f"{SUMS_NAME} line {number}: {name!r} has white space in it")
        elif name.startswith("/") or _DOT_PART.search(name) or "//" in name:
            problems.append(f"{SUMS_NAME} line {number}: {name} is not a plain relative path")
        elif name in sums:
            problems.append(f"{name}: listed twice in {SUMS_NAME}")
        else:
            sums[name] = expected
    if not text:  # the node's check_sums: "could not be read"
        problems.append(f"{SUMS_NAME} lists nothing")
    return sums, problems


def sums_problems(text: str, files: Mapping[str, str]) -> list[str]:
    """What SHA256SUMS' text says against files (every regular file of the bundle but
    SHA256SUMS itself, with its sha256): its own problems (parse_sums), a listed file that is
    missing or differs, a file it does not list."""
    sums, problems = parse_sums(text)
    for name, expected in sums.items():
        found = files.get(name)
        if found is None:
            problems.append(f"{name}: listed in {SUMS_NAME}, missing from the archive")
        elif found != expected:
            problems.append(f"{name}: sha256 {found} does not match {SUMS_NAME} ({expected})")
    problems.extend(f"{name}: in the archive, not in {SUMS_NAME}"
                    for name in sorted(files) if name != SUMS_NAME and name not in sums)
    return problems


# --- node/contents as the node reads it ----------------------------------------------------
# install_nvidia.sh's check_contents (an awk program) is what the node trusts; these are its
# rules, for inspect (which checks what the node checks) and for spec/contents.json, whose
# vectors run through both. awk's default field splitting: runs of blanks and tabs (a \r
# stays in its field, so a CRLF line names another path than the archive's).
TOP_NAMES = NODE_TOP_LEVEL | {MANIFEST_NAME, SUMS_NAME}  # install_nvidia.sh's TOP_NAMES
_BLANKS = re.compile(r"[ \t]+")
_DOT_PART = re.compile(r"(^|/)\.\.?(/|$)")
_SAFE_MODE = re.compile(r"[0-7]?[0-7][0-7][0-7]")
_WRITABLE = "2367"  # a group or other digit that lets them write


@dataclass(frozen=True)
class ContentsLine:
    mode: str  # octal digits, as written
    kind: str  # "file" or "link"
    target: str = ""  # of a link


def parse_contents(text: str) -> tuple[dict[str, ContentsLine], list[str]]:
    """node/contents' lines by path (a path listed twice: the last line, as the node's
    check_tree reads it), and its malformed lines. A last line without a newline is a line."""
    entries: dict[str, ContentsLine] = {}
    problems = []
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1] if lines[-1] == "" else lines, start=1):
        fields = [f for f in _BLANKS.split(line) if f]
        kind = fields[1] if len(fields) > 1 else ""
        if kind not in ("file", "link") or len(fields) != (4 if kind == "link" else 3):
            problems.append(f"{CONTENTS_NAME} line {number} is malformed")
            continue
        entries[fields[2]] = ContentsLine(fields[0], kind, fields[3] if kind == "link" else "")
    return entries, problems


def link_leaves(path: str, target: str, version: str) -> str | None:
    """Which folder a relative link leaves, by the node's rule: "payload/<version>/" for a
    link in it (the node installs that folder alone, under another name), "" for the
    bundle's other links; None when it stays. Every hop counts: a target that climbs out
    and back in by the folder's name leaves it, for on the node the name is not the same."""
    base = f"{PAYLOAD}/{version}/" if path.startswith(f"{PAYLOAD}/") else ""
    depth = len(path[len(base):].split("/")) - 1
    for hop in target.split("/"):
        depth += -1 if hop == ".." else 0 if hop in (".", "") else 1
        if depth < 0:
            return base
    return None


def contents_problems(entries: Mapping[str, ContentsLine], version: str) -> list[str]:
    """What install_nvidia.sh's check_contents refuses in node/contents (it stops at the
    first; this lists each), in its words: a path that is not plain and relative or not in
    the bundle's parts, a group- or world-writable file, a link to an absolute path or out
    of its folder (see link_leaves), anything beneath a link."""
    problems = [p for path, line in entries.items()
                if (p := _contents_line_problem(path, line, version))]
    links = [path for path, line in entries.items() if line.kind == "link"]
    for path in entries:
        above = next((link for link in links if path.startswith(f"{link}/")), None)
        if above is not None:
            problems.append(f"{path}: lies beneath the link {above}")
    return problems


def _contents_line_problem(path: str, line: ContentsLine, version: str) -> str | None:
    if path.startswith("/") or _DOT_PART.search(path) or "//" in path:
        return f"{path}: not a plain relative path"
    if path.startswith(f"{PAYLOAD}/"):
        base = f"{PAYLOAD}/{version}/"
        if not path.startswith(base):
            return f"{path}: outside {PAYLOAD}/{version}"
        first = path[len(base):].split("/")[0]
        # The node copies node/ and the top files into the driver folder, beside the payload.
        if first == NODE or first in TOP_NAMES:
            return f"{path}: would land on the driver folder's own {first}"
    elif not path.startswith(f"{NODE}/") and path not in TOP_NAMES:
        return f"{path}: not part of a coreos-gpu bundle"
    if line.kind == "file" and not (_SAFE_MODE.fullmatch(line.mode) and line.mode[-2]
                                    not in _WRITABLE and line.mode[-1] not in _WRITABLE):
        return f"{path}: mode {line.mode} is not a safe file mode (group or world could write it)"
    if line.kind == "link":
        if line.target.startswith("/"):
            return f"{path}: links to the absolute path {line.target}"
        left = link_leaves(path, line.target, version)
        if left is not None:
            return f"{path}: links to {line.target}, outside {left or 'the bundle'}"
    return None
