"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the reference that the code defines are
generated from it at every site build, so they cannot drift from it.

A page asks for one with a line `<!-- generated: NAME -->`, or `<!-- generated: NAME ARG -->`:
- `settings`: every setting, from `coreos_gpu.config.SETTINGS` (key, flag, default, help);
- `verbs`: every verb's `--help`, from `coreos_gpu.cli.build_parser()`;
- `exit-codes PROGRAM`: the program's exit codes, from the one table of them
  (src/coreos_gpu/resources/exit-codes.toml, which `coreos_gpu.errors` reads).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from enum import Enum
from typing import Any

MARKER = re.compile(r"^<!-- generated: ([a-z-]+)(?: (\S+))? -->$", re.MULTILINE)


def _shown_default(value: Any) -> str:
    if value is None:
        return "(the driver's default)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{_shown(v)}"' for v in value) + "]`" if value else "`[]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{_shown(value)}`"


def _shown(value: Any) -> str:
    return str(value.value if isinstance(value, Enum) else value)


# Defaults that depend on the machine that builds the site: said, not shown as that machine's.
MACHINE_DEFAULTS = {
    "cache_dir": "`$XDG_CACHE_HOME/coreos-gpu`, else `~/.cache/coreos-gpu`",
    "jobs": "the number of CPUs",
}


def _verb_list(verbs: list[str], table: dict[str, Any]) -> str:
    """The verbs that take a setting (cli.VERB_SETTINGS), or "all but …" where that is shorter.
    Taking is declaring: render's and keygen's own --os or --output only share a name."""
    others = [v for v in table if v not in verbs]
    if len(others) < len(verbs):
        return "all but " + ", ".join(others) if others else "all"
    return ", ".join(verbs)


def settings_table() -> str:
    from coreos_gpu.cli import VERB_SETTINGS
    from coreos_gpu.config import SETTINGS

    rows = ["| key | flag | default | verbs | what it sets |",
            "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        flag = f"`{s.flag}`" if s.boolean else f"`{s.flag} {s.metavar}`"
        if s.multiple:
            flag += " (repeat)"
        if s.boolean:
            flag += f", `--no-{s.flag[2:]}`"
        meaning = s.help.replace("|", "\\|")
        default = MACHINE_DEFAULTS.get(s.key) or _shown_default(s.default())
        verbs = [v for v, keys in VERB_SETTINGS.items() if s.key in keys]
        rows.append(f"| `{s.key}` | {flag} | {default} | {_verb_list(verbs, VERB_SETTINGS)} "
                    f"| {meaning} |")
    return "\n".join(rows)


def verbs_reference() -> str:
    from coreos_gpu.cli import build_parser, verb_parsers

    # argparse wraps help to the terminal's width: a fixed one, so every build is the same
    os.environ["COLUMNS"] = "100"
    parts = []
    for words, parser in verb_parsers(build_parser()):
        parts.append(f"### `coreos-gpu {' '.join(words)}`\n\n```text\n"
                     f"{parser.format_help().rstrip()}\n```")
    return "\n\n".join(parts)


def exit_code_table(program: str) -> str:
    from coreos_gpu.exit_codes import markdown_exit_codes

    return markdown_exit_codes(program)


GENERATORS: dict[str, Callable[..., str]] = {
    "settings": settings_table,
    "verbs": verbs_reference,
    "exit-codes": exit_code_table,  # takes the program, as the page's heading names it
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        name, arg = match.groups()
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: no generator for {name!r}")
        return GENERATORS[name](*(arg,) if arg else ())

    return MARKER.sub(replace, markdown)
