"""The one table of exit codes (resources/exit-codes.toml) and everything made from it agree:
coreos_gpu.errors.ExitCode, the node's constants (resources/node/exit-codes.sh, committed, read
by bash, dash and busybox sh alike), and docs/reference/exit-codes.md, whose tables the MkDocs
hook makes (the man pages: tests/test_manpages.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest

from coreos_gpu.errors import ExitCode, load_exit_codes
from coreos_gpu.exit_codes import (
    PROGRAMS,
    RANGE_DASH,
    ExitCodeRow,
    ExitCodeTableError,
    exit_code_numbers,
    exit_code_rows,
    exit_code_table,
)
from scripts import exit_codes, mkdocs_hooks

from .conftest import REPO
from .nodetree import SHELLS

NODE = REPO / "src/coreos_gpu/resources/node"
PAGE = REPO / "docs/reference/exit-codes.md"


def test_exit_code_is_the_table_s_coreos_gpu_rows() -> None:
    rows = [(row.name, row.number) for row in exit_code_table() if "coreos-gpu" in row.programs]
    assert [(code.name, code.value) for code in ExitCode] == rows


def test_coreos_gpu_s_rows_are_all_the_build_side_reads_at_start() -> None:
    """ExitCode reads only the table's part above the node's programs (coreos-gpu --help is
    quicker for it): every coreos-gpu row is there, and only they are."""
    everything = load_exit_codes()
    assert load_exit_codes(build_side_only=True) == [
        row for row in everything if "coreos-gpu" in row["programs"]]
    assert len(everything) > len(load_exit_codes(build_side_only=True))


GOOD = {"name": "X", "number": 3, "programs": ["startup.sh"], "meaning": "m"}


@pytest.mark.parametrize(("row", "why"), [
    ({**GOOD, "numbr": 4}, "unknown keys"),
    ({k: v for k, v in GOOD.items() if k != "meaning"}, "needs name, programs and meaning"),
    ({**GOOD, "first": 3, "last": 5, "of": "node/fetch.sh"}, "needs number, or first and last"),
    ({k: v for k, v in GOOD.items() if k != "number"}, "needs number, or first and last"),
    ({**GOOD, "name": "x-y"}, "upper-case words"),
    ({**GOOD, "programs": ["fetch.sh"]}, "programs are some of"),
    ({**GOOD, "programs": []}, "programs are some of"),
    ({**GOOD, "meaning_in": {"nvidia-doctor": "m"}}, "meaning_in names a program"),
    ({**GOOD, "number": 256}, "a code is 0-255"),
    ({**GOOD, "number": True}, "a code is 0-255"),
    ({**{k: v for k, v in GOOD.items() if k != "number"}, "first": 9, "last": 3,
      "of": "node/fetch.sh"}, "first not above its last"),
    ({**{k: v for k, v in GOOD.items() if k != "number"}, "first": 3, "last": 9},
     "names the program whose codes"),
    ({**GOOD, "of": "node/fetch.sh"}, "names the program whose codes"),
])
def test_a_malformed_row_is_refused(row: dict[str, Any], why: str) -> None:
    with pytest.raises(ExitCodeTableError, match=why):
        exit_code_table([row])


def test_a_name_or_a_program_s_code_used_twice_is_refused() -> None:
    with pytest.raises(ExitCodeTableError, match=r"names used twice: \['X'\]"):
        exit_code_table([GOOD, {**GOOD, "number": 4}])
    with pytest.raises(ExitCodeTableError, match=r"startup.sh has more than one row of code \[3\]"):
        exit_code_table([GOOD, {**GOOD, "name": "Y", "programs": ["startup.sh", "provision.sh"]}])


def test_every_program_has_codes_and_rows_shared_are_defined_once() -> None:
    table = exit_code_table()
    assert len(table) == len(load_exit_codes())
    for program in PROGRAMS:
        assert [cell for cell, _ in exit_code_rows(program)][:1] == ["0"], program
    # node/fetch.sh's codes that node/repository.sh checks are provision.sh's too: one row each
    shared = {row.number for row in table if {"node/fetch.sh", "provision.sh"} <= set(row.programs)}
    assert {21, 22, 23, 24, 25, 28, 29} <= shared


def test_a_range_stands_for_the_codes_its_program_does_not_name_itself() -> None:
    table = exit_code_table()
    by_name = {row.name: row for row in table}
    assert exit_code_numbers(by_name["STARTUP_FETCH_FAILED"], "startup.sh", table) == [
        21, 22, 23, 24, 25, 26, 28, 29]
    startup = dict(exit_code_rows("startup.sh"))
    assert startup[f"21{RANGE_DASH}26, 28, 29"].startswith("no installed folder")
    assert dict(exit_code_rows("install_nvidia.sh"))[f"11{RANGE_DASH}19"].startswith("installed")
    assert exit_code_rows("provision.sh")[-1][0] == "other"


# --- node/exit-codes.sh ------------------------------------------------------------------


def expected_constants() -> dict[str, int]:
    """What the node's file must assign, straight from the table (not from render_sh)."""
    expected: dict[str, int] = {}
    for row in exit_code_table():
        if not set(row.programs) - {"coreos-gpu"} or row.other:
            continue
        if row.number is not None:
            expected[row.name] = row.number
        else:
            assert row.first is not None and row.last is not None
            expected |= {f"{row.name}_FIRST": row.first, f"{row.name}_LAST": row.last}
            if row.offset:
                expected[f"{row.name}_OFFSET"] = row.offset
    return expected


def test_the_node_constants_are_the_generated_ones() -> None:
    committed = exit_codes.NODE_CONSTANTS.read_text(encoding="utf-8")
    assert committed == exit_codes.render_sh(), (
        f"{exit_codes.NODE_CONSTANTS.relative_to(REPO)} is not what "
        f"src/coreos_gpu/resources/exit-codes.toml makes now: run `{exit_codes.REGENERATE}` "
        "and commit it")


@pytest.mark.parametrize("shell", SHELLS)
def test_each_shell_reads_the_table_s_numbers(shell: str) -> None:
    expected = expected_constants()
    assert {"SUCCESS", "USAGE", "INSTALL_CORRUPT", "REPO_EXPIRED",
            "INSTALL_NOT_STARTED_OFFSET"} <= set(expected)
    script = ". ./exit-codes.sh\n" + "".join(
        f'printf "%s=%s\\n" {name} "${name}"\n' for name in expected)
    result = subprocess.run([*shell.split(), "-euc", script], cwd=NODE, capture_output=True,
                            text=True, check=False, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert result.stdout.splitlines() == [f"{name}={value}" for name, value in expected.items()]


def test_the_node_constants_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: scripts/test installs it")
    result = subprocess.run(["shellcheck", "--shell=sh", "exit-codes.sh"], cwd=NODE,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_node_script_has_a_variable_of_a_constant_s_name() -> None:
    """A script that sources the constants must not overwrite one with a variable of its own."""
    names = "|".join(expected_constants())
    assignment = re.compile(rf"^\s*(?:local\s+|readonly\s+|export\s+)?({names})=", re.MULTILINE)
    folders = (NODE, REPO / "src/coreos_gpu/resources/provision")
    scripts = [p for folder in folders for p in folder.iterdir()
               if p.name != "exit-codes.sh" and p.is_file()]
    assert len(scripts) >= 5
    for script in scripts:
        clash = assignment.findall(script.read_text(encoding="utf-8", errors="replace"))
        assert not clash, f"{script.name} assigns {clash}"



# A code written as a number where a script exits or passes one on: `die 4 …`, `exit 3`,
# `need_tools 7 …`, `lock_install 6` (exit 0, exit 1 and return are not program codes: awk's
# exit 1, a function's status).
LITERAL_CODE = re.compile(r"\b(?:die|need_tools|lock_install) [0-9]+\b"
                          r"|\bexit (?:[2-9]|[1-9][0-9]+)\b")


def literal_codes(text: str) -> list[str]:
    """The lines of a script (comments left out) that give an exit code as a number."""
    return [line.strip() for line in text.splitlines()
            if not line.lstrip().startswith("#") and LITERAL_CODE.search(line)]


def test_the_node_scripts_exit_with_the_constants() -> None:
    """Every code a node script exits with is one of exit-codes.sh's names, so that the table
    is the one place a code is defined; a number in its place is found (and the check finds one:
    the second half)."""
    folders = (NODE, REPO / "src/coreos_gpu/resources/provision")
    scripts = [p for folder in folders for p in sorted(folder.iterdir())
               if p.name != "exit-codes.sh" and p.is_file()
               and (p.suffix == ".sh" or p.read_bytes().startswith(b"#!/bin/sh"))]
    assert len(scripts) >= 10
    for script in scripts:
        assert not literal_codes(script.read_text(encoding="utf-8")), script.name
    assert literal_codes('\tdie 4 "corrupt"\n# die 4 in a comment\n') == ['die 4 "corrupt"']
    assert literal_codes("[ -z \"$B\" ] || exit 3\nexit 1\n") == ['[ -z "$B" ] || exit 3']


# --- docs/reference/exit-codes.md --------------------------------------------------------


def rendered_page() -> str:
    return mkdocs_hooks.on_page_markdown(PAGE.read_text(encoding="utf-8"), None, None, None)


def section(markdown: str, program: str) -> str:
    parts = re.split(rf"^## `{re.escape(program)}`.*\n", markdown, flags=re.MULTILINE)
    assert len(parts) == 2, f"{PAGE.name}: one heading ## `{program}`"
    return parts[1].split("\n## ", 1)[0]


def test_the_page_s_tables_are_all_generated() -> None:
    """Each program's section asks the hook for its table, and no table is written by hand."""
    source = PAGE.read_text(encoding="utf-8")
    assert not re.findall(r"^\|.*$", source, re.MULTILINE)
    for program in PROGRAMS:
        assert f"<!-- generated: exit-codes {program} -->" in section(source, program)


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_page_lists_each_program_s_codes(program: str) -> None:
    table = exit_code_table()
    body = section(rendered_page(), program)
    cells = re.findall(r"^\| ([^|]+?) \| (.*) \|$", body, re.MULTILINE)[2:]  # after the header
    rows: list[ExitCodeRow] = sorted((r for r in table if program in r.programs),
                                     key=ExitCodeRow.sort_key)
    assert len(cells) == len(rows)
    listed: list[int] = []
    for (cell, meaning), row in zip(cells, rows, strict=True):
        assert meaning.replace("\\|", "|") == row.meaning_for(program)
        for part in cell.split(", "):
            if part == "other":
                continue
            first, _, last = part.partition(RANGE_DASH)
            listed += range(int(first), int(last or first) + 1)
    assert listed == [n for r in rows for n in exit_code_numbers(r, program, table)]
    if program == "coreos-gpu":
        assert listed == [int(c) for c in ExitCode]
