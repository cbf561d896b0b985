"""The render verb of the `coreos-gpu` command: cli.py declares its arguments and runs it;
like the other verbs, it calls the stage (render.py) and returns a Result that cli.py
prints."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu.cache import write_atomically
from coreos_gpu.config import find_config_file, load_config
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.render import build_request, render
from coreos_gpu.render_types import (
    AGENT_SETTINGS,
    PROVISIONING,
    SETTINGS,
    Kind,
    RepositorySource,
)
from coreos_gpu.results import Block, Error, Fields, Log, Result, Text


def _output_path(value: str) -> Path:
    path = Path(value)
    if path.is_dir() or value.endswith("/"):
        raise CoreosGpuError(f"--output {value} is a folder, not a file", code=ExitCode.CONFIG)
    return path


def cmd_render(args: argparse.Namespace) -> RenderResult:
    output = _output_path(args.output) if args.output else None
    settings = load_config({key: getattr(args, key) for key in (*SETTINGS, *AGENT_SETTINGS)},
                           find_config_file(args.config, Path.cwd()))
    request = build_request(
        Kind(args.kind), os=args.os, bundle=args.bundle, bundle_url=args.bundle_url,
        bundle_sha256=args.bundle_sha256, bundle_sha512=args.bundle_sha512,
        repository=args.repository, repository_key=args.repository_key, settings=settings,
        ignition_spec=args.ignition_version, image=args.image, app_id=args.id)
    rendered = render(request)
    steps = [s.replace("FILE", str(output) if output else "FILE") for s in rendered.next_steps]
    pinned = (request.source.pinned() if isinstance(request.source, RepositorySource)
              and request.kind in PROVISIONING else "")
    if output is not None:
        write_atomically(output, rendered.text.encode())
        umask = os.umask(0)
        os.umask(umask)
        output.chmod(0o666 & ~umask)  # an ordinary file, as > would make it
    return RenderResult(request.kind, rendered.text, output, pinned, tuple(steps))


@dataclass(frozen=True)
class RenderResult(Result):
    """The rendered text, on stdout with the notes on stderr; or, once written to --output,
    where it went and the notes."""

    kind: Kind
    text: str
    output: Path | None
    pinned: str  # the bundle repository nodes take; "": not from a repository
    steps: Sequence[str]  # what to do next

    def to_text(self) -> Iterable[Block]:
        if self.output is None:
            yield Text(self.text)
            return
        yield Fields([("wrote", f"{self.output} ({self.kind.value})"),
                         *((("nodes take", self.pinned),) if self.pinned else ()),
                         *(("next", step) for step in self.steps)])

    def messages(self) -> Iterable[Log | Error]:
        if self.output is not None:
            return
        if self.pinned:
            yield Log(f"nodes take: {self.pinned}")
        for step in self.steps:
            yield Log(f"next: {step}")
