"""The one table of every program's exit codes (resources/exit-codes.toml), checked, and
rendered for what shows it: the node's exit-codes.sh (scripts/exit_codes.py), the docs'
tables (the MkDocs hook) and the man pages' EXIT STATUS. coreos-gpu itself reads only its
own rows, in errors.ExitCode, at each start; this module is for the renderers."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from coreos_gpu.errors import EXIT_CODE_TABLE, load_exit_codes

# Every program, as the docs' headings name it: the build side, then the node's.
PROGRAMS = ("coreos-gpu", "install_nvidia.sh", "startup.sh", "node/fetch.sh", "nvidia-doctor",
            "provision.sh")
_KEYS = {"name", "number", "first", "last", "of", "offset", "other", "programs", "meaning",
         "meaning_in", "hint"}
# A Python member and an sh constant alike (the node scripts' are sh variables).
_NAME = r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*"

# A range of codes in a table, 11-19, as the docs write ranges: with an en dash.
RANGE_DASH = "\N{EN DASH}"


class ExitCodeTableError(ValueError):
    pass


class ExitCodeRow(NamedTuple):
    """One row of the table: a code; a range of codes passed on from another program (`of`,
    plus `offset`); or (other) every code the program's other rows do not name."""

    name: str
    programs: tuple[str, ...]
    meaning: str
    number: int | None = None
    first: int | None = None
    last: int | None = None
    of: str = ""
    offset: int = 0
    other: bool = False
    meaning_in: dict[str, str] = {}  # noqa: RUF012 - never changed: read only
    hint: str = ""

    def meaning_for(self, program: str) -> str:
        """What it means for this program, with the hint after it: markdown, one line."""
        meaning = self.meaning_in.get(program, self.meaning)
        return f"{meaning}; {self.hint}" if self.hint else meaning

    def sort_key(self) -> tuple[int, int]:
        """Its place in a program's table: by code, a range by its first, other last."""
        if self.other:
            return (1, 0)
        return (0, self.number if self.number is not None else self.first or 0)


def exit_code_table(rows: list[dict[str, Any]] | None = None) -> list[ExitCodeRow]:
    """The table's rows (load_exit_codes()'s by default), checked: an ExitCodeTableError
    names the first that is wrong."""
    table = []
    for row in load_exit_codes() if rows is None else rows:
        where = f"{EXIT_CODE_TABLE.name}: code {row.get('name', '(no name)')!r}"
        if set(row) - _KEYS:
            raise ExitCodeTableError(f"{where}: unknown keys {sorted(set(row) - _KEYS)}")
        if not {"name", "programs", "meaning"} <= set(row):
            raise ExitCodeTableError(f"{where}: needs name, programs and meaning")
        if (len([k for k in ("number", "first", "other") if k in row]) != 1
                or ("first" in row) != ("last" in row)):
            raise ExitCodeTableError(f"{where}: needs number, or first and last, or other = true")
        code = ExitCodeRow(**{**row, "programs": tuple(row["programs"])})
        if not re.fullmatch(_NAME, code.name):
            raise ExitCodeTableError(f"{where}: a name is upper-case words joined by _")
        named = [*code.programs, *code.meaning_in, *([code.of] if code.of else [])]
        if not code.programs or any(p not in PROGRAMS for p in named):
            raise ExitCodeTableError(f"{where}: programs are some of {', '.join(PROGRAMS)}")
        if not set(code.meaning_in) <= set(code.programs):
            raise ExitCodeTableError(f"{where}: meaning_in names a program it is no code of")
        numbers = [n for n in (code.number, code.first, code.last, code.offset) if n is not None]
        if (any(type(n) is not int or not 0 <= n <= 255 for n in numbers)
                or (code.first or 0) > (code.last or 0)):
            raise ExitCodeTableError(f"{where}: a code is 0-255, a range's first not above its "
                                     f"last")
        if (code.first is not None or code.other) != bool(code.of):
            raise ExitCodeTableError(f"{where}: a range, or other, names the program whose codes "
                                     f"it passes on (of), and only they do")
        table.append(code)
    names = [c.name for c in table]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ExitCodeTableError(f"{EXIT_CODE_TABLE.name}: names used twice: {twice}")
    for program in PROGRAMS:
        own = [c.number for c in table if program in c.programs and c.number is not None]
        if twice_ := sorted({n for n in own if own.count(n) > 1}):
            raise ExitCodeTableError(f"{EXIT_CODE_TABLE.name}: {program} has more than one row "
                                     f"of code {twice_}")
    return table


def exit_code_numbers(code: ExitCodeRow, program: str, table: list[ExitCodeRow]) -> list[int]:
    """The codes a row stands for in this program: a range's but those the program names
    itself (startup.sh's 27 among node/fetch.sh's 21-29); none for other."""
    if code.number is not None:
        return [code.number]
    if code.first is None or code.last is None:
        return []
    own = {c.number for c in table if program in c.programs}
    return [n for n in range(code.first, code.last + 1) if n not in own]


def _code_cell(code: ExitCodeRow, program: str, table: list[ExitCodeRow]) -> str:
    """The code column's text: 7, or 21-26, 28, 29 (a run of three or more as a range, with
    the en dash the docs write ranges with), or other."""
    if code.other:
        return "other"
    runs: list[list[int]] = []
    for n in exit_code_numbers(code, program, table):
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{run[0]}{RANGE_DASH}{run[-1]}" if len(run) > 2 else ", ".join(map(str, run))
                     for run in runs)


def exit_code_rows(program: str) -> list[tuple[str, str]]:
    """The program's (code, meaning) rows in its table's order, both as markdown."""
    if program not in PROGRAMS:
        raise ExitCodeTableError(f"no exit codes of {program!r}: the programs are "
                                 f"{', '.join(PROGRAMS)}")
    table = exit_code_table()
    return [(_code_cell(c, program, table), c.meaning_for(program))
            for c in sorted((c for c in table if program in c.programs),
                            key=ExitCodeRow.sort_key)]


def markdown_exit_codes(program: str) -> str:
    """The program's table on docs/reference/exit-codes.md."""
    rows = ["| code | meaning |", "| ---: | --- |"]
    for cell, meaning in exit_code_rows(program):
        escaped = meaning.replace("|", "\\|")  # a | in a cell ends it
        rows.append(f"| {cell} | {escaped} |")
    return "\n".join(rows)
