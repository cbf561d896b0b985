"""Parse the `.manifest` inside an extracted NVIDIA `.run`.

The format is nvidia-installer's (install-from-cwd.c `parse_manifest`, manifest.c's type
table). The header is read by position: description, version, the kernel interface line
(ignored since nvidia-installer 331; a `.o` name or empty), the kernel module names, module
names and module files to uninstall, the kernel module build dir and the precompiled dir.
Packages of 2004 (nvidia-installer 1.0-6106/6111) have one more `.o` line before the module
names. Then one line per file:

    file mode TYPE [NATIVE|COMPAT32] [CLASSIC|NEW] [path | INHERIT_PATH_DEPTH:N] [target]
        [GLVND|NON_GLVND] MODULE:x

Which optional fields a line carries depends on its TYPE, so the type table below is needed
to read it at all. A `*_SYMLINK` entry (mode 0000) is no file of the package: nvidia-installer
creates the link from its target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath

from coreos_gpu.errors import CoreosGpuError, ExitCode


class Arch(StrEnum):
    NATIVE = "NATIVE"
    COMPAT32 = "COMPAT32"


@dataclass(frozen=True)
class FileType:
    has_arch: bool = False
    has_path: bool = False
    is_symlink: bool = False
    inherit_path: bool = False
    installable: bool = True


_LIB = FileType(has_arch=True)
_LIB_WITH_PATH = FileType(has_arch=True, has_path=True)
_LIB_LINK = FileType(has_arch=True, is_symlink=True, installable=False)
_LIB_LINK_WITH_PATH = FileType(has_arch=True, has_path=True, is_symlink=True, installable=False)
_WITH_PATH = FileType(has_path=True)
_PLAIN = FileType()

# The fields each type carries, as nvidia-installer reads them. Types missing here (newer
# drivers add some) are still read: their optional fields are kept as `extra`.
FILE_TYPES: dict[str, FileType] = {
    "KERNEL_MODULE_SRC": FileType(inherit_path=True),
    "KERNEL_MODULE": _PLAIN,
    "DKMS_CONF": FileType(inherit_path=True),
    "FIRMWARE": FileType(inherit_path=True),
    "CUDA_ICD": _PLAIN,
    "OPENGL_LIB": _LIB,
    "OPENGL_SYMLINK": _LIB_LINK,
    "OPENGL_DATA": _WITH_PATH,
    "WINE_LIB": _LIB,
    "CUDA_LIB": _LIB_WITH_PATH,
    "CUDA_SYMLINK": _LIB_LINK_WITH_PATH,
    "OPENCL_LIB": _LIB_WITH_PATH,
    "OPENCL_WRAPPER_LIB": _LIB_WITH_PATH,
    "OPENCL_LIB_SYMLINK": _LIB_LINK_WITH_PATH,
    "OPENCL_WRAPPER_SYMLINK": _LIB_LINK_WITH_PATH,
    "TLS_LIB": _LIB_WITH_PATH,
    "TLS_SYMLINK": _LIB_LINK_WITH_PATH,
    "UTILITY_LIB": _LIB,
    "UTILITY_LIB_SYMLINK": _LIB_LINK,
    "GBM_BACKEND_LIB": _LIB,
    "GBM_BACKEND_LIB_SYMLINK": _LIB_LINK,
    "DOCUMENTATION": _WITH_PATH,
    "APPLICATION_PROFILE": _WITH_PATH,
    "MANPAGE": _WITH_PATH,
    "EXPLICIT_PATH": _WITH_PATH,
    "INSTALLER_BINARY": _PLAIN,
    "UTILITY_BINARY": _PLAIN,
    "UTILITY_BIN_SYMLINK": FileType(is_symlink=True, installable=False),
    "DOT_DESKTOP": _WITH_PATH,
    "ICON": _WITH_PATH,
    "XMODULE_SHARED_LIB": _WITH_PATH,
    "GLX_MODULE_SHARED_LIB": _WITH_PATH,
    "GLX_MODULE_SYMLINK": FileType(has_path=True, is_symlink=True, installable=False),
    "VDPAU_LIB": _LIB_WITH_PATH,
    "VDPAU_SYMLINK": _LIB_LINK_WITH_PATH,
    "NVCUVID_LIB": _LIB,
    "NVCUVID_LIB_SYMLINK": _LIB_LINK,
    "ENCODEAPI_LIB": _LIB,
    "ENCODEAPI_LIB_SYMLINK": _LIB_LINK,
    "VGX_LIB": _PLAIN,
    "VGX_LIB_SYMLINK": FileType(is_symlink=True, installable=False),
    "GRID_LIB": _WITH_PATH,
    "GRID_LIB_SYMLINK": FileType(has_path=True, is_symlink=True, installable=False),
    "NVIDIA_MODPROBE": _WITH_PATH,
    "NVIDIA_MODPROBE_MANPAGE": _WITH_PATH,
    "MODULE_SIGNING_KEY": FileType(installable=False),
    "XORG_OUTPUTCLASS_CONFIG": _PLAIN,
    "GLVND_LIB": _LIB,
    "GLVND_SYMLINK": _LIB_LINK,
    "GLX_CLIENT_LIB": _LIB,
    "GLX_CLIENT_SYMLINK": _LIB_LINK,
    "EGL_CLIENT_LIB": _LIB,
    "EGL_CLIENT_SYMLINK": _LIB_LINK,
    "GLVND_EGL_ICD_JSON": _PLAIN,
    "EGL_EXTERNAL_PLATFORM_JSON": _PLAIN,
    "VULKAN_ICD_JSON": _WITH_PATH,
    "VULKANSC_ICD_JSON": _WITH_PATH,
    "FLEXERA_LIB": _WITH_PATH,
    "FLEXERA_LIB_SYMLINK": FileType(has_path=True, is_symlink=True, installable=False),
    "INTERNAL_UTILITY_BINARY": FileType(has_arch=True),
    "INTERNAL_UTILITY_LIB": _LIB,
    "INTERNAL_UTILITY_DATA": _PLAIN,
    "SYSTEMD_UNIT": _PLAIN,
    "SYSTEMD_UNIT_SYMLINK": FileType(has_path=True, is_symlink=True, installable=False),
    "SYSTEMD_SLEEP_SCRIPT": _PLAIN,
    "SANDBOXUTILS_FILELIST_JSON": _WITH_PATH,
    # Gone by 535; 470.256.02's manifest.c still has them.
    "NVIFR_LIB": _LIB,
    "NVIFR_LIB_SYMLINK": _LIB_LINK,
    "ALLOCATOR_JSON": _PLAIN,
}

_MODE = re.compile(r"[0-7]{3,4}")
_TYPE = re.compile(r"[A-Z][A-Z0-9_]*")
# 535.261.03, 390.157, 100.14.19 and the 1.0-6111 of the 9-line header's era.
_VERSION = re.compile(r"\d+\.\d+([.-]\d+)?")
_MODULE_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_INHERIT = "INHERIT_PATH_DEPTH:"
_MODULE_TAG = "MODULE:"
_UNIT_LINK = "SYSTEMD_UNIT_SYMLINK"
# Drivers of the 390 era tag GLX/EGL client files GLVND or NON_GLVND; TLS libs CLASSIC/NEW.
_FLAG_TAGS = frozenset({"GLVND", "NON_GLVND", "CLASSIC", "NEW"})


def _is_symlink_type(type_name: str, mode: int) -> bool:
    info = FILE_TYPES.get(type_name)
    if info is not None:
        return info.is_symlink
    # A type newer than the table: NVIDIA names every link type *_SYMLINK and gives it mode 0.
    return type_name.endswith("_SYMLINK") or mode == 0


@dataclass(frozen=True)
class ManifestEntry:
    file: str  # relative to the extracted package; not there for symlinks
    mode: int
    type: str
    line: int
    arch: Arch | None = None
    path: str | None = None  # install sub-path, given or inherited
    target: str | None = None  # symlinks only, and always set for them
    module: str | None = None
    tags: tuple[str, ...] = ()  # GLVND/NON_GLVND, CLASSIC/NEW
    extra: tuple[str, ...] = ()  # fields of a type this parser does not know

    @property
    def known_type(self) -> bool:
        return self.type in FILE_TYPES

    @property
    def is_symlink(self) -> bool:
        return _is_symlink_type(self.type, self.mode)

    @property
    def name(self) -> str:
        return PurePosixPath(self.file).name


@dataclass(frozen=True)
class Manifest:
    description: str
    version: str
    interface_files: tuple[str, ...]  # the header's .o names, which nvidia-installer ignores
    kernel_modules: tuple[str, ...]
    uninstall_modules: tuple[str, ...]  # module names nvidia-installer unloads first
    uninstall_files: tuple[str, ...]  # module files nvidia-installer removes first
    build_dir: str
    precompiled_dir: str
    entries: tuple[ManifestEntry, ...]


def entry_error(source: str, line: int, why: str) -> CoreosGpuError:
    """The error for a bad .manifest line: one line that names it, exit code DRIVER."""
    return CoreosGpuError(
        f"{source}: malformed entry on line {line}: {why}",
        hint="the .run is damaged or of a format coreos-gpu does not know; "
        "try a fresh download",
        code=ExitCode.DRIVER,
    )



def _looks_like_entry(tokens: list[str]) -> bool:
    return len(tokens) >= 3 and bool(_MODE.fullmatch(tokens[1])) and bool(
        _TYPE.fullmatch(tokens[2]))


def _check_relative(value: str, what: str, source: str, line: int) -> None:
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts:
        raise entry_error(source, line, f"{what} {value!r} leaves the package folder")


def _inherited_path(file: str, depth_text: str, type_name: str, source: str,
                    line: int) -> str:
    # nvidia-installer takes the file's folder and strips N leading components; a file
    # outside any folder, or fewer folders than N, is an invalid manifest there too.
    depth = depth_text[len(_INHERIT):] if depth_text.startswith(_INHERIT) else ""
    parents = PurePosixPath(file).parent.parts
    if not depth.isdigit() or not parents or int(depth) > len(parents):
        raise entry_error(source, line, f"{type_name} {file} needs {_INHERIT}N within its path")
    return str(PurePosixPath(*parents[int(depth):]))


def parse_entry(text: str, line: int, source: str = ".manifest") -> ManifestEntry:
    tokens = text.split()
    if len(tokens) < 3:
        raise entry_error(source, line, f"expected 'file mode TYPE ...', got {text.strip()!r}")
    file, mode_text, type_name, *rest = tokens
    if not _MODE.fullmatch(mode_text):
        raise entry_error(source, line, f"mode {mode_text!r} of {file} is not octal")
    if not _TYPE.fullmatch(type_name):
        raise entry_error(source, line, f"file type {type_name!r} of {file} is not a type name")
    _check_relative(file, "file", source, line)
    mode = int(mode_text, 8)

    module = None
    if rest and rest[-1].startswith(_MODULE_TAG):  # MODULE: always comes last
        module = rest.pop()[len(_MODULE_TAG):]
    tags = tuple(t for t in rest if t in _FLAG_TAGS)
    rest = [t for t in rest if t not in _FLAG_TAGS]

    info = FILE_TYPES.get(type_name)
    arch = None
    if info is None or info.has_arch:
        if rest and rest[0] in Arch.__members__:
            arch = Arch(rest.pop(0))
        elif info is not None:
            raise entry_error(source, line, f"{type_name} {file} lacks NATIVE or COMPAT32")

    path = None
    if info is not None and info.has_path:
        if not rest:
            raise entry_error(source, line, f"{type_name} {file} lacks its install path")
        path = rest.pop(0)
    elif info is not None and info.inherit_path:
        path = _inherited_path(file, rest.pop(0) if rest else "", type_name, source, line)
    if path is not None:
        # Install paths are relative to a prefix even when NVIDIA writes them as "/" or "/x".
        _check_relative(path.lstrip("/") or ".", "install path", source, line)

    target = None
    if type_name == _UNIT_LINK and not rest:
        # nvidia-installer reads a word here, but replaces it with the unit of the link's own
        # name (files.c set_destinations), so the word may be the MODULE: tag it ignores.
        target = PurePosixPath(file).name
    elif _is_symlink_type(type_name, mode):
        if not rest:
            raise entry_error(source, line, f"symlink {file} lacks its target")
        # The target follows the path; of a type this parser does not know it is the last
        # field, which keeps bundle writers from ever reading a link off the disk.
        target = rest.pop() if info is None else rest.pop(0)
        if target.startswith("/"):
            raise entry_error(source, line, f"symlink {file} has the absolute target "
                                            f"{target!r}: it would point outside the package")
    if info is None:
        return ManifestEntry(file, mode, type_name, line, arch, target=target, module=module,
                             tags=tags, extra=tuple(rest))
    if rest:
        raise entry_error(source, line, f"unexpected field(s) {' '.join(rest)!r} after {file}")
    return ManifestEntry(file, mode, type_name, line, arch, path, target, module, tags)


# What each header line holds, by position, as nvidia-installer reads them.
HEADER = ("description", "version", "kernel interface file", "kernel module names",
          "module names to uninstall", "module files to uninstall",
          "kernel module build directory", "precompiled kernel interface directory")
# nvidia-installer 1.0-6106 and 1.0-6111 (2004) read the kernel module's .o file name, then
# the kernel interface's, where every later one reads a single (and since 331 ignored) line.
OLD_HEADER = ("description", "version", "kernel module file", *HEADER[2:])


def _split_lines(text: str) -> list[str]:
    # nvidia-installer ends a line at \n or \r only; str.splitlines would also split at
    # form feeds and Unicode separators.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def parse_manifest(text: str, source: str = ".manifest") -> Manifest:
    """Parse a whole .manifest; any malformed line is an error naming its line number."""
    lines = _split_lines(text)
    if len(lines) < 2 or not lines[0].strip():
        raise entry_error(source, 1, "the header lacks the description and version lines")
    description, version = lines[0].strip(), lines[1].strip()
    if not _VERSION.fullmatch(version):
        raise entry_error(source, 2, f"{version!r} is not a driver version")
    # Only the 9-line header has a .o name on line 4; elsewhere line 4 names modules.
    names = OLD_HEADER if len(lines) > 3 and lines[3].strip().endswith(".o") else HEADER
    # Every line counts, blank or not. nvidia-installer's get_next_line (misc.c) steps over
    # blank lines, so where its own installer reads a package, an "empty" header line holds
    # a space, which reads the same both ways.
    header = [line.strip() for line in lines[:len(names)]]
    for number, (line, what) in enumerate(zip(lines, names, strict=False), start=1):
        if number > 2 and _looks_like_entry(line.split()):
            raise entry_error(source, number, f"expected the {what} (header line {number}), "
                                              "got a file entry: the header is too short")
    if len(header) < len(names):
        raise entry_error(source, len(lines), f"the header ends before its "
                                              f"{names[len(header)]} line")
    *objects, modules_line, unload, remove, build_dir, precompiled_dir = header[2:]
    modules = modules_line.split()
    modules_at = len(names) - 4
    if not modules:
        raise entry_error(source, modules_at, "the header names no kernel modules")
    for name in modules:
        if not _MODULE_NAME.fullmatch(name):
            raise entry_error(source, modules_at,
                              f"kernel module name {name!r} is not a module name")

    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines[len(names):], start=len(names) + 1):
        if not line.strip():  # get_next_line skips them; their line numbers still count
            continue
        entry = parse_entry(line, number, source)
        if entry.file in seen:
            raise entry_error(source, number, f"{entry.file} is listed twice (also line "
                                              f"{seen[entry.file]})")
        seen[entry.file] = number
        entries.append(entry)
    if not entries:
        raise entry_error(source, len(lines) or 1, "no file entries")
    return Manifest(description, version, tuple(o for o in objects if o), tuple(modules),
                    tuple(unload.split()), tuple(remove.split()), build_dir or "kernel",
                    precompiled_dir, tuple(entries))
