"""Read a kernel module's `.modinfo` ELF section (what `modinfo` shows) without running it.

Used on the build machine (is each .ko built for the target kernel and this driver?) and by
`coreos-gpu inspect`. The section is a run of NUL-terminated `key=value` strings.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from coreos_gpu.errors import CoreosGpuError, ExitCode


def read_modinfo(path: Path) -> dict[str, str]:
    """The module's modinfo fields; a key that repeats (alias, depends…) keeps its last value,
    except `depends`, which is a comma-separated list already."""
    try:
        with path.open("rb") as f:
            elf = ELFFile(f)
            section = elf.get_section_by_name(".modinfo")
            data = section.data() if section is not None else None
    except (OSError, ELFError) as e:  # ELFParseError too: a truncated or damaged file
        raise CoreosGpuError(f"cannot read {path.name} as an ELF kernel module: {e}",
                             code=ExitCode.MODULES) from e
    if data is None:
        raise CoreosGpuError(f"{path.name} has no .modinfo section: not a kernel module",
                             code=ExitCode.MODULES)
    fields: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.decode("utf-8", errors="replace").partition("=")
        if sep:
            fields[key] = value
    return fields


def vermagic_release(vermagic: str) -> str:
    """The kernel release a vermagic names: its first word ("6.1.0-50-amd64 SMP preempt …")."""
    return vermagic.split(" ", 1)[0]


@dataclass(frozen=True)
class ModuleSymbols:
    """What a module exports and imports, with the symbol CRCs of a CONFIG_MODVERSIONS kernel
    (None where the kernel has none): what the kernel itself checks when it loads a module
    that uses another's symbols ("disagrees about version of symbol …")."""

    exports: Mapping[str, int | None]
    imports: Mapping[str, int | None]


# struct modversion_info (include/linux/module.h): an unsigned long CRC, then the name in the
# rest of a 64-byte entry (on 64-bit kernels).
_VERSION_ENTRY = 64
_CRC_SIZE = 8


def read_symbols(path: Path) -> ModuleSymbols:
    """A module's exported symbols (its `__ksymtab_<name>` symbols) and undefined ones, with
    their CRCs: an export's from its `__crc_<name>` symbol (an absolute value on older kernels,
    an offset into `__kcrctab` on newer ones), an import's from the `__versions` section."""
    try:
        with path.open("rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise CoreosGpuError(f"{path.name} has no symbol table",
                                     code=ExitCode.MODULES)
            symbols = _symbol_table(elf, symtab)
            sections: dict[int, bytes] = {}
            crcs: dict[str, int] = {}
            for name, where, value in symbols:
                if not name.startswith("__crc_"):
                    continue
                if where == _SHN_ABS:
                    crcs[name[6:]] = value & 0xFFFFFFFF
                elif 0 < where < _SHN_LORESERVE:
                    data = sections.get(where)
                    if data is None:
                        data = sections[where] = elf.get_section(where).data()
                    crcs[name[6:]] = int.from_bytes(data[value:value + 4], "little")
            versions = elf.get_section_by_name("__versions")
            listed = _read_versions(versions.data()) if versions is not None else {}
    except (OSError, ELFError, struct.error) as e:
        raise CoreosGpuError(f"cannot read {path.name}'s symbols: {e}",
                             code=ExitCode.MODULES) from e
    exports = {name[10:]: crcs.get(name[10:]) for name, _, _ in symbols
               if name.startswith("__ksymtab_")}
    imports = {name: listed.get(name) for name, where, _ in symbols
               if where == _SHN_UNDEF and name}
    return ModuleSymbols(exports, imports)


# Section indexes with a meaning of their own (elf.h), and an x86_64 module's Elf64_Sym:
# st_name, st_info, st_other, st_shndx, st_value, st_size.
_SHN_UNDEF, _SHN_LORESERVE, _SHN_ABS = 0, 0xFF00, 0xFFF1
_SPECIAL_SECTIONS = {"SHN_UNDEF": _SHN_UNDEF, "SHN_ABS": _SHN_ABS}
_ELF64_SYM = struct.Struct("<IBBHQQ")


def _symbol_table(elf: ELFFile, symtab: SymbolTableSection) -> list[tuple[str, int, int]]:
    """Every symbol as (name, section index, value). nvidia.ko has tens of thousands (its
    binary blob's): a 64-bit little-endian table (every x86_64 module) is read in one pass,
    20 times faster than pyelftools' Symbol objects; any other through them."""
    if elf.elfclass == 64 and elf.little_endian:
        names = elf.get_section(symtab["sh_link"]).data()
        table = []
        for offset, _, _, where, value, _ in _ELF64_SYM.iter_unpack(symtab.data()):
            table.append((names[offset:names.index(b"\0", offset)].decode("ascii", "replace"),
                          where, value))
        return table
    return [(s.name, s["st_shndx"] if isinstance(s["st_shndx"], int)
             else _SPECIAL_SECTIONS.get(s["st_shndx"], _SHN_LORESERVE), s["st_value"])
            for s in symtab.iter_symbols()]


def _read_versions(data: bytes) -> dict[str, int]:
    entries = {}
    for start in range(0, len(data) - _VERSION_ENTRY + 1, _VERSION_ENTRY):
        entry = data[start:start + _VERSION_ENTRY]
        name = entry[_CRC_SIZE:].split(b"\0", 1)[0].decode("ascii", errors="replace")
        entries[name] = int.from_bytes(entry[:_CRC_SIZE], "little") & 0xFFFFFFFF
    return entries


@dataclass(frozen=True)
class ModuleIdentity:
    """What a module says it is: its modinfo fields and its symbols."""

    fields: Mapping[str, str]
    symbols: ModuleSymbols


def read_identity(path: Path) -> ModuleIdentity:
    return ModuleIdentity(read_modinfo(path), read_symbols(path))


def identity_problem(name: str, module: ModuleIdentity, *, driver_version: str,
                     core: ModuleIdentity | None) -> str:
    """Why the module is not one of driver_version's ("" when it is), beside core, the
    nvidia.ko it was built (or bundled) with.

    A module that declares a version must declare the driver's. Not every branch declares
    one in every module: 470's nvidia-uvm has no MODULE_VERSION and embeds no version string
    at all. What it does carry is its link to nvidia.ko: modinfo `depends=nvidia`, the
    nvidia.ko symbols it calls, and (CONFIG_MODVERSIONS) their CRCs in `__versions`. So a
    versionless module is accepted only when it depends on core, core declares the driver's
    version, and every core symbol it calls is one core exports with the same CRC: the check
    the kernel makes when it loads it."""
    version = module.fields.get("version", "")
    if version:
        return "" if version == driver_version else (
            f"{name} is version {version}, not driver {driver_version}")
    expected = f"{name} declares no version, so it must link against this driver's nvidia.ko"
    depends = module.fields.get("depends", "").split(",")
    if core is None or "nvidia" not in depends:
        return f"{expected}, but {'there is none' if core is None else 'it does not use it'}"
    core_version = core.fields.get("version", "")
    if core_version != driver_version:
        return f"{expected}, but nvidia.ko is version {core_version or '(none)'}"
    exports, imports = core.symbols.exports, module.symbols.imports
    used = [s for s in imports if s in exports]
    if not used:
        return f"{expected}, but it calls none of nvidia.ko's symbols"
    differ = [s for s in used if None not in (imports[s], exports[s]) and imports[s] != exports[s]]
    if differ:
        symbol = differ[0]
        return (f"{expected}, but it was built against another nvidia.ko: its CRC of {symbol} "
                f"is {imports[symbol]:#010x}, nvidia.ko's {exports[symbol]:#010x}")
    return ""
