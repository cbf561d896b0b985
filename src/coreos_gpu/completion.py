"""Shell completion for bash, zsh and fish, generated from the CLI's own argparse parser.

shtab writes each shell's script from the parser, so a new verb or setting flag completes
without anything declared twice. Which values complete as paths follows from the metavar
each argument already declares. `coreos-gpu completion SHELL` (cmd_completion) prints it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import shtab

from coreos_gpu.cli import SHELLS, build_parser
from coreos_gpu.results import TextResult

_FILE_METAVARS = frozenset({"FILE", "PATH", "ARCHIVE", "PUB.pem", "URL|PATH", "PATH_OR_URL"})
_FOLDER_METAVARS = frozenset({"DIR", "DEST"})


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from _actions(sub)
        else:
            yield action


def render_completion(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for shell; it marks path arguments on the parser it is given."""
    if shell not in SHELLS:
        raise ValueError(f"no completion for {shell!r}")
    for action in _actions(parser):
        metavar = action.metavar if isinstance(action.metavar, str) else ""
        if metavar in _FILE_METAVARS:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif metavar in _FOLDER_METAVARS:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    script: str = shtab.complete(parser, shell=shell)
    return script if script.endswith("\n") else script + "\n"


def cmd_completion(args: argparse.Namespace) -> TextResult:
    return TextResult(render_completion(build_parser(), args.shell))
