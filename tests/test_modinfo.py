"""read_modinfo on files that are not kernel modules: the modules exit code, never 1 or 70."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.modinfo import read_modinfo, vermagic_release

ELF = Path(shutil.which("true") or "/bin/true").read_bytes()  # an ELF file, not a module


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "cannot read nvidia.ko as an ELF kernel module: "),
        (b"not an ELF file at all\n" * 10, "cannot read nvidia.ko as an ELF kernel module: "),
        (ELF[:200], "cannot read nvidia.ko as an ELF kernel module: "),  # cut short
        (ELF, "nvidia.ko has no .modinfo section: not a kernel module"),
    ],
    ids=["empty", "garbage", "truncated", "no .modinfo"],
)
def test_a_bad_module_is_a_modules_error(tmp_path: Path, data: bytes, message: str) -> None:
    module = tmp_path / "nvidia.ko"
    module.write_bytes(data)
    with pytest.raises(CoreosGpuError) as info:
        read_modinfo(module)
    assert info.value.code is ExitCode.MODULES
    assert info.value.message.startswith(message)


def test_a_missing_module_is_a_modules_error(tmp_path: Path) -> None:
    with pytest.raises(CoreosGpuError) as info:
        read_modinfo(tmp_path / "nvidia.ko")
    assert info.value.code is ExitCode.MODULES


def test_vermagic_release() -> None:
    assert vermagic_release("6.1.0-50-amd64 SMP preempt mod_unload modversions ") == (
        "6.1.0-50-amd64")


def test_the_fast_symbol_table_reads_what_pyelftools_reads(tmp_path: Path) -> None:
    """_symbol_table reads an x86_64 module's Elf64_Sym entries in one pass (nvidia.ko has
    tens of thousands); what it gives must be what pyelftools' own Symbol objects say."""
    from elftools.elf.elffile import ELFFile

    from coreos_gpu.modinfo import _symbol_table

    from .bundletools import KERNEL, make_ko

    module = make_ko(tmp_path, "nvidia-uvm", KERNEL)
    with module.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        fast = _symbol_table(elf, symtab)
        elf.elfclass = 32  # anything but a 64-bit little-endian table takes pyelftools' way
        assert _symbol_table(elf, symtab) == fast
    assert [name for name, _, _ in fast if name], "no named symbol read at all"
