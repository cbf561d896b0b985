"""Writes the node's exit-code constants, src/coreos_gpu/resources/node/exit-codes.sh, from
the one table of every program's exit codes (src/coreos_gpu/resources/exit-codes.toml, which
coreos_gpu.errors reads and checks):

    python scripts/exit_codes.py

The file is committed, as the man pages are; tests/test_exit_codes.py fails when it differs
from what this makes now. The same table gives coreos_gpu.errors.ExitCode its numbers, and
docs/reference/exit-codes.md (scripts/mkdocs_hooks.py) and the man pages (scripts/manpages.py)
their tables.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from coreos_gpu.exit_codes import PROGRAMS, exit_code_table

REPO = Path(__file__).resolve().parent.parent
NODE_CONSTANTS = REPO / "src/coreos_gpu/resources/node/exit-codes.sh"
REGENERATE = "python scripts/exit_codes.py"
NODE_PROGRAMS = PROGRAMS[1:]


def _plain(markdown: str) -> str:
    """A meaning as a comment: a link its text, no code marks."""
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown).replace("`", "")


def render_sh() -> str:
    """The node's constants: one assignment per code of a node program (a range: its _FIRST
    and _LAST, and _OFFSET where it adds one to the codes it passes on), under the programs
    that exit with it and what it means to each."""
    out = [
        "# shellcheck shell=sh",
        "# Exit codes of the node's programs, made from coreos-gpu's one table of them",
        "# (src/coreos_gpu/resources/exit-codes.toml, which the docs and the man pages come from",
        f"# too): do not edit, change the table and run `{REGENERATE}`.",
        "# Constants only, the same in every script that sources it: die \"$INSTALL_CORRUPT\" ….",
        "# One { } group, so that shellcheck's directive, which a script's parts lose once copied",
        "# into its middle, covers every assignment wherever it stands.",
        "# shellcheck disable=SC2034  # each script uses only some",
        "{",
    ]
    for code in exit_code_table():
        programs = [p for p in code.programs if p in NODE_PROGRAMS]
        if not programs or code.other:
            continue  # other: the codes of another program, named there
        out.append("")
        # A program with words of its own gets a line of its own; the others share one.
        shared = [p for p in programs if p not in code.meaning_in]
        lines = ([(", ".join(shared), code.meaning_for(""))] if shared else []) + [
            (p, code.meaning_for(p)) for p in programs if p in code.meaning_in]
        for who, meaning in lines:
            out += textwrap.wrap(f"{who}: {_plain(meaning)}", width=98, initial_indent="# ",
                                 subsequent_indent="#   ", break_on_hyphens=False,
                                 break_long_words=False)
        if code.number is not None:
            out.append(f"{code.name}={code.number}")
        else:
            out += [f"{code.name}_FIRST={code.first}", f"{code.name}_LAST={code.last}"]
            if code.offset:
                out.append(f"{code.name}_OFFSET={code.offset}")
    return "\n".join([*out, "}"]) + "\n"


def main() -> int:
    text = render_sh()
    old = NODE_CONSTANTS.read_text(encoding="utf-8") if NODE_CONSTANTS.exists() else None
    if old != text:
        NODE_CONSTANTS.write_text(text, encoding="utf-8")
    print(f"{NODE_CONSTANTS.relative_to(REPO)}: {'unchanged' if old == text else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
