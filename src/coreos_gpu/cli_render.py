"""The render verb of the `coreos-gpu` command: cli.py declares its arguments and runs it;
like the other verbs, it calls the stage (render.py) and prints through ui."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from coreos_gpu import ui
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


def _output_path(value: str) -> Path:
    path = Path(value)
    if path.is_dir() or value.endswith("/"):
        raise CoreosGpuError(f"--output {value} is a folder, not a file", code=ExitCode.CONFIG)
    return path


def cmd_render(args: argparse.Namespace) -> None:
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
    if output is None:
        sys.stdout.writelines(rendered.text.splitlines(keepends=True))
        if pinned:
            ui.log(f"nodes take: {pinned}")
        for step in steps:
            ui.log(f"next: {step}")
        return
    write_atomically(output, rendered.text.encode())
    umask = os.umask(0)
    os.umask(umask)
    output.chmod(0o666 & ~umask)  # an ordinary file, as > would make it
    ui.print_fields([("wrote", f"{output} ({request.kind.value})"),
                     *((("nodes take", pinned),) if pinned else ()),
                     *(("next", step) for step in steps)])
