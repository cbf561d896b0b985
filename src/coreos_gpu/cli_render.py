"""The render verb of the `coreos-gpu` command: cli.py registers it (add_render_verb) beside
the other verbs; like those, it parses, calls the stage (render.py) and prints through ui."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from coreos_gpu import ui
from coreos_gpu.cache import write_atomically
from coreos_gpu.config import SETTINGS_BY_KEY, find_config_file, load_config
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.render import (
    AGENT_SETTINGS,
    DEFAULT_IMAGE,
    IGNITION_SPECS,
    PROVISIONING,
    SETTINGS,
    Kind,
    RepositorySource,
    build_request,
    render,
)

# What each setting means to render (its flag, metavar and check are config.py's).
_SETTING_HELP = {
    "driver_version": "the driver nodes take from a repository (default: the setting "
                      "driver_version), or the smoke test expects",
    "kernel_module_type": "proprietary or open: the module flavour nodes take from a repository "
                          "(default: the setting, else the driver's: open from 560)",
    "profile": "compute or full: the profile nodes take from a repository (default: the "
               "setting profile)",
    "agents": "what runs the GPU containers (mesos, kubelet, containerd, docker, crio, nomad, "
              "podman): the provisioning unit runs before their units (default: the bundle "
              "file's, else the setting agents)",
    "agent_units": "more units the provisioning unit runs before (default: the bundle file's, "
                   "else the setting agent_units)",
}


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


def add_render_verb(verbs: Any) -> None:
    # Not through cli.py's verb(): its setting flags are build's (--os, --output, --repository
    # mean other things there).
    helptext = ("write an Ignition config, Butane config or Terraform provisioner that "
                "installs a bundle, or a DC/OS or Kubernetes GPU smoke test")
    sub: argparse.ArgumentParser = verbs.add_parser("render", help=helptext,
                                                    description=helptext)
    sub.set_defaults(func=cmd_render)
    sub.add_argument("kind", choices=[k.value for k in Kind], metavar="KIND",
                     help=", ".join(k.value for k in Kind))
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show tracebacks")
    sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                     help="config file (default: ./coreos-gpu.toml if present)")
    sub.add_argument("--os", default=None, metavar="OS",
                     help="flatcar or coreos (default: the bundle's, else flatcar)")
    sub.add_argument("--bundle", type=Path, default=None, metavar="FILE",
                     help="the nvidia.tar.gz nodes will install: its hashes and manifest")
    sub.add_argument("--bundle-url", default="", metavar="URL",
                     help="where nodes download the bundle from (http or https)")
    sub.add_argument("--bundle-sha256", default="", metavar="HEX",
                     help="the bundle's sha256, when --bundle is not given")
    sub.add_argument("--bundle-sha512", default="", metavar="HEX",
                     help="its sha512 (Ignition spec 2.x checks sha512 only)")
    sub.add_argument("--repository", default="", metavar="URL",
                     help="a repository nodes fetch the bundle for their kernel from")
    sub.add_argument("--repository-key", type=Path, default=None, metavar="PUB.pem",
                     help="the repository's public key (coreos-gpu keygen)")
    for key in (*SETTINGS, *AGENT_SETTINGS):
        setting = SETTINGS_BY_KEY[key]
        sub.add_argument(setting.flag, dest=key, metavar=setting.metavar, default=None,
                         action="append" if setting.multiple else "store",
                         help=_SETTING_HELP[key])
    sub.add_argument("--ignition-version", default=None, choices=IGNITION_SPECS,
                     help="Ignition spec (default: 2.2.0 for coreos, 3.3.0 for flatcar)")
    sub.add_argument("--image", default=DEFAULT_IMAGE, metavar="IMAGE",
                     help=f"the smoke test's Docker image (default: {DEFAULT_IMAGE})")
    sub.add_argument("--id", default="", metavar="ID",
                     help="the smoke test's app, job or pod id")
    sub.add_argument("--output", default="", metavar="FILE",
                     help="write there (atomically) instead of to stdout")
