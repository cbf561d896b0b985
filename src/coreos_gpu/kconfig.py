"""What a kernel's .config says about how to build for it: its options, and the compiler
and linker it was built with (which the module build and the build root must both use)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CompilerWanted:
    """The commands that would be the kernel's compiler and linker, best first."""

    what: str  # for messages: the kernel's CONFIG_CC_VERSION_TEXT, or its CONFIG_*_VERSION
    cc: tuple[str, ...] = ()  # empty: the config does not say (kernels before 4.18)
    ld: tuple[str, ...] = ()  # empty: kbuild's default ld is right
    ld_required: bool = False  # ld.lld: kbuild's default ld cannot link a clang+LLD kernel's


_KCONFIG_LINE = re.compile(r'(CONFIG_[A-Z0-9_]+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))')
# gcc's --version starts with the name it was run as: "gcc-12 (Debian 12.2.0-14) 12.2.0",
# "x86_64-cros-linux-gnu-gcc (Gentoo Hardened 13.3.1_p20240614 p17) 13.3.1 20240614".
_GCC_NAME = re.compile(r"(?P<prefix>[\w.+-]*-)?gcc(-[\d.]+)?")
_CLANG_MAJOR = re.compile(r"\bclang version (\d+)")


def read_kconfig(text: str) -> dict[str, str]:
    """A kernel .config's set options; quoted values unquoted."""
    options = {}
    for line in text.splitlines():
        match = _KCONFIG_LINE.fullmatch(line.strip())
        if match:
            quoted, plain = match.group(2), match.group(3)
            options[match.group(1)] = (re.sub(r"\\(.)", r"\1", quoted) if quoted is not None
                                       else plain)
    return options


def _major(options: dict[str, str], key: str) -> str:
    number = options.get(key, "0")  # 120200 for 12.2.0
    return str(int(number) // 10000) if number.isdigit() and int(number) else ""


_COMMAND = re.compile(r"[\w.+-]+")


def _unique(names: list[str]) -> tuple[str, ...]:
    """Command names only (no paths, no empties), each once, in order."""
    return tuple(dict.fromkeys(n for n in names if _COMMAND.fullmatch(n)))


def wanted_compiler(options: dict[str, str]) -> CompilerWanted:
    """The kernel's compiler and linker, from its .config (CONFIG_CC_VERSION_TEXT is the first
    line of `$(CC) --version` when the kernel was configured, since Linux 5.8)."""
    text = options.get("CONFIG_CC_VERSION_TEXT", "")
    lld = options.get("CONFIG_LD_IS_LLD") == "y"
    if options.get("CONFIG_CC_IS_CLANG") == "y" or "clang" in text:
        # clang prints "Debian clang version 16.0.6", whatever name it was run as.
        found = _CLANG_MAJOR.search(text)
        major = found.group(1) if found else _major(options, "CONFIG_CLANG_VERSION")
        suffix = f"-{major}" if major else ""
        return CompilerWanted(text or f"clang {major}".strip(),
                              _unique([f"clang{suffix}", "clang"]),
                              _unique([f"ld.lld{suffix}", "ld.lld"]) if lld else (),
                              ld_required=lld)
    major = _major(options, "CONFIG_GCC_VERSION")
    first = text.split()[0] if text.split() else ""
    named = _GCC_NAME.fullmatch(first)
    if options.get("CONFIG_CC_IS_GCC") != "y" and named is None:
        first = ""  # not gcc's --version: no name in it
    if not first and not major:
        return CompilerWanted(text or "an unknown compiler")  # a kernel too old to say
    cc = [first, f"gcc-{major}" if major else "", "gcc"]
    # A cross-named gcc (Flatcar's SDK builds with x86_64-cros-linux-gnu-gcc) came with
    # its binutils of the same prefix; kbuild would take plain ld.
    prefix = named.group("prefix") if named else None
    ld = ["ld.lld"] if lld else [f"{prefix}ld" if prefix else ""]
    return CompilerWanted(text or f"gcc {major}", _unique(cc), _unique(ld), ld_required=lld)
