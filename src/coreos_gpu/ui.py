"""All terminal output: step lines with timings on stderr, results on stdout.

A verb returns a results.Result; render_result prints it, as JSON (--json) or as text, and
nothing else prints a result (pipx's result.py and render_result do the same).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from coreos_gpu.results import Result

# rich is imported when output first needs it, not with this module: `coreos-gpu --help`,
# which argparse prints, is then spared its import (some 30 ms, where all of it takes 70).


@cache
def _console(*, stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def log(message: str) -> None:
    _console(stderr=True).print(message, markup=False)


@contextmanager
def step(title: str) -> Iterator[None]:
    """Log a pipeline step's name and, when it is done, how long it took."""
    start = time.monotonic()
    log(f"==> {title}")
    yield
    log(f"    {title}: done in {time.monotonic() - start:.1f} s")


class ByteProgress:
    """A progress bar on a terminal; a start and an end line otherwise (CI logs stay short)."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description = description
        self.interactive = _console(stderr=True).is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self.total = total

    def __enter__(self) -> ByteProgress:
        if self.interactive:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=_console(stderr=True),
                transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        else:
            size = f" ({self.total} bytes)" if self.total else ""
            log(f"    {self.description}{size}")
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def render_result(result: Result, *, as_json: bool) -> int:
    """Print result: its JSON or its text on stdout, then its messages on stderr. Returns its
    exit code."""
    from coreos_gpu.results import Fields, Log, Table  # with the verb, not with --help

    if as_json:
        _print_json(result.to_json())
    else:
        for block in result.to_text():
            if isinstance(block, Fields):
                _print_fields(block.pairs)
            elif isinstance(block, Table):
                _print_table(block.title, block.columns, block.rows)
            else:
                sys.stdout.writelines(block.text.splitlines(keepends=True))
    for message in result.messages():
        if isinstance(message, Log):
            log(message.message)
        else:
            print_error(message.message, message.hint)
    return int(result.code)


# Results go out in pieces, never in one large write: with stdout unbuffered
# (PYTHONUNBUFFERED), CPython takes a large write that a leaving reader (`| head -1`) cut
# short as done, and the rest is lost without an error.


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on a terminal; plain aligned columns, never wrapped, for pipes and logs."""
    cells = [[str(cell) for cell in row] for row in rows]
    stdout = _console(stderr=False)
    if stdout.is_terminal:
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in cells:
            table.add_row(*row)
        stdout.print(table)
        return
    widths = [max(len(r[i]) for r in [list(columns), *cells]) for i in range(len(columns))]
    sys.stdout.write(f"{title}:\n")
    sys.stdout.writelines(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in [list(columns), *cells])


def _print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    sys.stdout.write("".join(f"{key:<{width}}  {value}\n" for key, value in pairs))


def print_error(message: str, hint: str = "") -> None:
    stderr = _console(stderr=True)
    stderr.print(f"coreos-gpu: error: {message}", markup=False)
    if hint:
        stderr.print(f"coreos-gpu: hint: {hint}", markup=False)
