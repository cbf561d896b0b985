"""Parse the `.manifest` inside an extracted NVIDIA `.run`.

The format is nvidia-installer's: a header (description, version, kernel interface file(s),
module names, uninstall lists, build and precompiled dirs), then one line per file:

    file mode TYPE [NATIVE|COMPAT32] [path | INHERIT_PATH_DEPTH:N] [symlink target] ... MODULE:x

Which optional fields a line carries depends on its TYPE, so the type table below is needed
to read it at all.
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
}

_MODE = re.compile(r"[0-7]{3,4}")
_TYPE = re.compile(r"[A-Z][A-Z0-9_]*")
_VERSION = re.compile(r"\d+\.\d+(\.\d+)?")
_MODULE_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_INHERIT = "INHERIT_PATH_DEPTH:"
_MODULE_TAG = "MODULE:"
# Drivers of the 390 era tag GLX/EGL client files GLVND or NON_GLVND; TLS libs CLASSIC/NEW.
_FLAG_TAGS = frozenset({"GLVND", "NON_GLVND", "CLASSIC", "NEW"})


@dataclass(frozen=True)
class ManifestEntry:
    file: str  # relative to the extracted package
    mode: int
    type: str
    line: int
    arch: Arch | None = None
    path: str | None = None  # install sub-path, given or inherited
    target: str | None = None  # symlinks only
    module: str | None = None
    tags: tuple[str, ...] = ()  # GLVND/NON_GLVND, CLASSIC/NEW
    extra: tuple[str, ...] = ()  # fields of a type this parser does not know

    @property
    def known_type(self) -> bool:
        return self.type in FILE_TYPES

    @property
    def is_symlink(self) -> bool:
        info = FILE_TYPES.get(self.type)
        return info.is_symlink if info else self.mode == 0

    @property
    def name(self) -> str:
        return PurePosixPath(self.file).name


@dataclass(frozen=True)
class Manifest:
    description: str
    version: str
    interface_files: tuple[str, ...]
    kernel_modules: tuple[str, ...]
    build_dir: str
    entries: tuple[ManifestEntry, ...]


def _fail(source: str, line: int, why: str) -> CoreosGpuError:
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
        raise _fail(source, line, f"{what} {value!r} leaves the package folder")


def parse_entry(text: str, line: int, source: str = ".manifest") -> ManifestEntry:
    tokens = text.split()
    if len(tokens) < 3:
        raise _fail(source, line, f"expected 'file mode TYPE ...', got {text.strip()!r}")
    file, mode_text, type_name, *rest = tokens
    if not _MODE.fullmatch(mode_text):
        raise _fail(source, line, f"mode {mode_text!r} of {file} is not octal")
    if not _TYPE.fullmatch(type_name):
        raise _fail(source, line, f"file type {type_name!r} of {file} is not a type name")
    _check_relative(file, "file", source, line)

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
            raise _fail(source, line, f"{type_name} {file} lacks NATIVE or COMPAT32")
    if info is None:
        return ManifestEntry(file, int(mode_text, 8), type_name, line, arch,
                             module=module, tags=tags, extra=tuple(rest))

    path = None
    if info.has_path:
        if not rest:
            raise _fail(source, line, f"{type_name} {file} lacks its install path")
        path = rest.pop(0)
    elif info.inherit_path:
        depth_text = rest.pop(0) if rest else ""
        depth = depth_text[len(_INHERIT):] if depth_text.startswith(_INHERIT) else ""
        parents = PurePosixPath(file).parent.parts
        if not depth.isdigit() or int(depth) > len(parents):
            raise _fail(source, line, f"{type_name} {file} needs {_INHERIT}N within its path")
        path = str(PurePosixPath(*parents[int(depth):]))
    if path is not None:
        # Install paths are relative to a prefix even when NVIDIA writes them as "/" or "/x".
        _check_relative(path.lstrip("/") or ".", "install path", source, line)

    target = None
    if info.is_symlink:
        if not rest:
            raise _fail(source, line, f"symlink {file} lacks its target")
        target = rest.pop(0)
    if rest:
        raise _fail(source, line, f"unexpected field(s) {' '.join(rest)!r} after {file}")
    return ManifestEntry(file, int(mode_text, 8), type_name, line, arch, path, target, module,
                         tags)


def parse_manifest(text: str, source: str = ".manifest") -> Manifest:
    """Parse a whole .manifest; any malformed line is an error naming its line number."""
    lines = text.splitlines()
    # The header's length differs between driver generations (older ones list a second
    # kernel interface .o), so it ends where the first file entry starts.
    first_entry = next(
        (i for i, line in enumerate(lines) if _looks_like_entry(line.split())), len(lines))
    header = [line.strip() for line in lines[:first_entry]]
    if len(header) < 2 or not header[0]:
        raise _fail(source, 1, "the header lacks the description and version lines")
    description, version = header[0], header[1]
    if not _VERSION.fullmatch(version):
        raise _fail(source, 2, f"{version!r} is not a driver version")
    rest = header[2:]
    interface_files: list[str] = []
    while rest and rest[0].endswith(".o"):
        interface_files.append(rest.pop(0))
    modules = rest.pop(0).split() if rest else []
    for name in modules:
        if not _MODULE_NAME.fullmatch(name):
            line_no = first_entry - len(rest)
            raise _fail(source, line_no, f"kernel module name {name!r} is not a module name")
    # Then: module names to uninstall, module files to uninstall, build dir, precompiled dir.
    if len(rest) > 4:
        # More header than any driver has: the first file entry itself is malformed.
        bad = first_entry - len(rest) + 5
        parse_entry(lines[bad - 1], bad, source)
        raise _fail(source, bad, f"expected a file entry, got {lines[bad - 1].strip()!r}")
    build_dir = rest[2] if len(rest) >= 3 and rest[2] else "kernel"

    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines[first_entry:], start=first_entry + 1):
        if not line.strip():
            continue
        entry = parse_entry(line, number, source)
        if entry.file in seen:
            raise _fail(source, number, f"{entry.file} is listed twice (also line "
                                        f"{seen[entry.file]})")
        seen[entry.file] = number
        entries.append(entry)
    if not entries:
        raise _fail(source, len(lines) or 1, "no file entries")
    return Manifest(description, version, tuple(interface_files), tuple(modules), build_dir,
                    tuple(entries))
