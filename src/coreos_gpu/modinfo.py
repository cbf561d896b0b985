"""Read a kernel module's `.modinfo` ELF section (what `modinfo` shows) without running it.

Used on the build machine (is each .ko built for the target kernel and this driver?) and by
`coreos-gpu inspect`. The section is a run of NUL-terminated `key=value` strings.
"""

from __future__ import annotations

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
            symbols = list(symtab.iter_symbols())
            sections: dict[int, bytes] = {}
            crcs: dict[str, int] = {}
            for symbol in symbols:
                if not symbol.name.startswith("__crc_"):
                    continue
                where = symbol["st_shndx"]
                if where == "SHN_ABS":
                    crcs[symbol.name[6:]] = symbol["st_value"] & 0xFFFFFFFF
                elif isinstance(where, int):
                    data = sections.get(where)
                    if data is None:
                        data = sections[where] = elf.get_section(where).data()
                    offset = symbol["st_value"]
                    crcs[symbol.name[6:]] = int.from_bytes(data[offset:offset + 4], "little")
            versions = elf.get_section_by_name("__versions")
            listed = _read_versions(versions.data()) if versions is not None else {}
    except (OSError, ELFError) as e:
        raise CoreosGpuError(f"cannot read {path.name}'s symbols: {e}",
                             code=ExitCode.MODULES) from e
    exports = {s.name[10:]: crcs.get(s.name[10:]) for s in symbols
               if s.name.startswith("__ksymtab_")}
    imports = {s.name: listed.get(s.name) for s in symbols
               if s["st_shndx"] == "SHN_UNDEF" and s.name}
    return ModuleSymbols(exports, imports)


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
