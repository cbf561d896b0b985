"""The one error type for problems the user can fix, the exit codes it maps to, and the one
table of every program's exit codes that they come from."""

from __future__ import annotations

import tomllib
from enum import IntEnum
from pathlib import Path
from typing import Any

# Every program's exit codes, name, number and meaning, in one table that the node's
# exit-codes.sh (scripts/exit_codes.py), the docs and the man pages are made from too. Found
# beside this file rather than through importlib.resources, whose import alone would add 4 ms
# to `coreos-gpu --help` (bench/cli_startup.py); the wheel installs the package as files.
EXIT_CODE_TABLE = Path(__file__).parent / "resources" / "exit-codes.toml"


# The table lists coreos-gpu's own codes first, and this line ends them: ExitCode, made at
# every start, parses only what is above it (tomllib takes 0.5 ms for that, 1.8 ms for all).
_NODE_PART = "\n# --- the node's programs"


def load_exit_codes(*, build_side_only: bool = False) -> list[dict[str, Any]]:
    """The table's rows as TOML gives them, in its order; build_side_only: coreos-gpu's."""
    text = EXIT_CODE_TABLE.read_text(encoding="utf-8")
    if build_side_only:
        text = text.partition(_NODE_PART)[0]
    rows: list[dict[str, Any]] = tomllib.loads(text)["code"]
    return rows


_NUMBERS = {row["name"]: row["number"] for row in load_exit_codes(build_side_only=True)}


def _number(name: str) -> int:
    """coreos-gpu's code of this name in the table (tests/test_exit_codes.py checks that the
    table and ExitCode hold the same)."""
    if name not in _NUMBERS:
        raise KeyError(f"{EXIT_CODE_TABLE}: no code {name!r} of coreos-gpu above the line "
                       f"{_NODE_PART.strip()!r}")
    number: int = _NUMBERS[name]
    return number


class ExitCode(IntEnum):
    """coreos-gpu's distinct exit codes, from resources/exit-codes.toml (what each means is
    there, and in docs/reference/exit-codes.md); scripts may rely on them."""

    OK = _number("OK")
    FAILED = _number("FAILED")
    CONFIG = _number("CONFIG")
    DRIVER = _number("DRIVER")
    TOOL = _number("TOOL")
    COMMAND = _number("COMMAND")
    DOWNLOAD = _number("DOWNLOAD")
    DIGEST = _number("DIGEST")
    SIGNATURE = _number("SIGNATURE")
    UNVERIFIABLE = _number("UNVERIFIABLE")
    INCOMPLETE = _number("INCOMPLETE")
    IMAGE = _number("IMAGE")
    BUNDLE = _number("BUNDLE")
    MODULES = _number("MODULES")
    REPOSITORY = _number("REPOSITORY")
    KEY = _number("KEY")
    INTERNAL = _number("INTERNAL")
    INTERRUPTED = _number("INTERRUPTED")
    BROKEN_PIPE = _number("BROKEN_PIPE")


class CoreosGpuError(Exception):
    """A problem the user can act on: one line of message, an optional hint, an exit code."""

    def __init__(self, message: str, *, hint: str = "", code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return self.message


class DownloadError(CoreosGpuError):
    """A download that failed; `status` is the HTTP status where a server answered, so callers
    tell a missing file from a failing server without reading the message. `missing`: a local
    file (a file:// mirror's) that does not exist."""

    def __init__(self, message: str, *, status: int | None = None, missing: bool = False,
                 hint: str = "") -> None:
        super().__init__(message, hint=hint, code=ExitCode.DOWNLOAD)
        self.status = status
        self.missing = missing

    @property
    def not_found(self) -> bool:
        return self.missing or self.status in (404, 410)


class KernelTreeNotPrepared(CoreosGpuError):
    """A kernel build tree without .config, Module.symvers or generated headers: CoreOS's
    developer containers ship one like that, and it can be prepared."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint, code=ExitCode.IMAGE)


class SignatureError(CoreosGpuError):
    """A signature that does not verify. `file_changed` when gpg showed that the pinned key
    signed other bytes (BADSIG), rather than that the key file cannot check the signature."""

    def __init__(self, message: str, *, file_changed: bool, hint: str = "") -> None:
        super().__init__(message, hint=hint, code=ExitCode.SIGNATURE)
        self.file_changed = file_changed
