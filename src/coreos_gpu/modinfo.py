"""Read a kernel module's `.modinfo` ELF section (what `modinfo` shows) without running it.

Used on the build machine (is each .ko built for the target kernel and this driver?) and by
`coreos-gpu inspect`. The section is a run of NUL-terminated `key=value` strings.
"""

from __future__ import annotations

from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

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
