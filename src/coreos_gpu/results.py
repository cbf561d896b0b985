"""What a verb returns (cli.py prints it with ui.render_result): a Result, its data as JSON
and its text described as data, in blocks that the renderer lays out (fields, tables, text as
it is), and what it tells the user on stderr beside it.

Its own module, not ui's: defining these classes costs some milliseconds that `--help`, which
imports ui and never a verb, is spared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fields:
    """Aligned "key  value" lines."""

    pairs: Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Table:
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True)
class Text:
    """Text written as it is (a rendered config, a completion script)."""

    text: str


@dataclass(frozen=True)
class Log:
    """A line for the user on stderr, beside the result, in either form (`next: ...`)."""

    message: str


@dataclass(frozen=True)
class Error:
    """An error and its hint on stderr, as the top level prints a CoreosGpuError: the part of
    a result that failed (sync's failed builds), shown after the rest."""

    message: str
    hint: str = ""


Block = Fields | Table | Text


class Result:
    """What a verb returns: its data as JSON, its text as blocks, what it tells the user on
    stderr, and its exit code. Subclasses are frozen dataclasses."""

    def to_json(self) -> Any:
        raise TypeError(f"{type(self).__name__} has no JSON form")

    def to_text(self) -> Iterable[Block]:
        raise NotImplementedError

    def messages(self) -> Iterable[Log | Error]:
        return ()

    @property
    def code(self) -> int:
        return 0


@dataclass(frozen=True)
class TextResult(Result):
    """A result that is text as it is (completion's script)."""

    text: str

    def to_text(self) -> Iterable[Block]:
        yield Text(self.text)
