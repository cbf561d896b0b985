"""The `coreos-gpu` command: each verb parses, calls the stages, and renders."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from coreos_gpu import __version__, ui
from coreos_gpu.bundle import (
    BundleReport,
    NodeSettings,
    ReleaseInputs,
    assemble_bundle,
    inspect_bundle,
)
from coreos_gpu.cli_render import add_render_verb
from coreos_gpu.cli_repository import add_repository_verbs
from coreos_gpu.completion import SHELLS, render_completion
from coreos_gpu.config import (
    BuildConfig,
    Profile,
    add_setting_flags,
    config_rows,
    find_config_file,
    load_config,
)
from coreos_gpu.devcontainer import DevRoot, engine_options, prepare_devcontainer
from coreos_gpu.driver import DRIVER_URL, DriverPackage, check_flavour, fetch_driver
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.manifest import ManifestEntry
from coreos_gpu.modules import build_modules
from coreos_gpu.release import list_releases, mirrored
from coreos_gpu.repository import load_trust
from coreos_gpu.sandbox import SandboxSpec, chosen_runtime, run_interactive


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage; one line and a pointer to --help is clearer.
        raise CoreosGpuError(message, hint=f"see {self.prog} --help", code=ExitCode.CONFIG)


def _config(args: argparse.Namespace) -> BuildConfig:
    return load_config(vars(args), find_config_file(args.config, Path.cwd()))


# --- verbs -------------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> None:
    rows = config_rows(_config(args))
    if args.json:
        ui.print_json({key: {"value": value, "source": source} for key, value, source in rows})
    else:
        shown = [(k, v if isinstance(v, str) and v else json.dumps(v), s) for k, v, s in rows]
        ui.print_table("effective configuration", ("key", "value", "source"), shown)


def cmd_driver_inspect(args: argparse.Namespace) -> None:
    config = _config(args)
    with ui.step(f"reading driver package {Path(args.package).name}"):
        package = fetch_driver(args.package, config.cache_dir, offline=config.offline,
                               sha256=config.driver_sha256)
    if args.json:
        ui.print_json(render_driver_json(package))
    else:
        render_driver_text(package)


def cmd_releases(args: argparse.Namespace) -> None:
    config = _config(args)
    releases = list_releases(config.os, config.channel, mirror=config.mirror,
                             cache_dir=config.cache_dir, offline=config.offline)
    if args.json:
        ui.print_json([{"version": r.version, "kernel": r.kernel,
                        "release_date": r.release_date} for r in releases])
    else:
        ui.print_table(f"{config.os.value} {config.channel.value} releases",
                       ("version", "kernel", "release date"),
                       [(r.version, r.kernel or "?", r.release_date) for r in releases])


def cmd_devcontainer_prepare(args: argparse.Namespace) -> None:
    config = _config(args)
    roots = [prepare_devcontainer(config, version) for version in config.releases]
    rows = [{"os": d.release.os.value, "version": d.release.version,
             "kernel_release": d.kernel_release, "build_dir": d.build_dir,
             "root": str(d.root), "image_sha256": d.image_sha256} for d in roots]
    if args.json:
        ui.print_json(rows)
    else:
        ui.print_table("developer containers", ("release", "kernel release", "root"),
                       [(r["version"], r["kernel_release"], r["root"]) for r in rows])


def _devroot_sandbox(args: argparse.Namespace) -> tuple[DevRoot, BuildConfig]:
    config = _config(args)
    if len(config.releases) != 1:
        raise CoreosGpuError("devcontainer shell and run work on one release; "
                             f"{len(config.releases)} are configured",
                             hint="pick one with --release", code=ExitCode.CONFIG)
    return prepare_devcontainer(config, config.releases[0]), config


def cmd_devcontainer_shell(args: argparse.Namespace) -> int:
    devroot, config = _devroot_sandbox(args)
    ui.log(f"    shell in {devroot.release.os.value} {devroot.release.version}'s developer "
           f"container; the kernel tree is {devroot.build_dir}")
    return run_interactive(SandboxSpec(root=devroot.root), ("/bin/sh", "-l"),
                           runtime=config.runtime, engine_options=engine_options(config),
                           image_key=devroot.image_sha256)


def cmd_devcontainer_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CoreosGpuError("devcontainer run needs a command", hint="coreos-gpu "
                             "devcontainer run -- make --version", code=ExitCode.CONFIG)
    devroot, config = _devroot_sandbox(args)
    return run_interactive(SandboxSpec(root=devroot.root), command, runtime=config.runtime,
                           engine_options=engine_options(config),
                           image_key=devroot.image_sha256)


def cmd_build(args: argparse.Namespace) -> None:
    config = _config(args)
    # The repository's key is read before anything is downloaded: a bad one stops the build.
    trust = load_trust(config.repository, config.repository_key)
    # The driver first: a wrong driver_version should not wait for gigabytes of images.
    source = config.driver_url or mirrored(DRIVER_URL.format(v=config.driver_version),
                                           config.mirror)
    with ui.step(f"reading driver package {Path(source).name}"):
        package = fetch_driver(source, config.cache_dir, offline=config.offline,
                               sha256=config.driver_sha256)
    if package.version != config.driver_version:
        raise CoreosGpuError(
            f"{source} is driver {package.version}, not driver_version {config.driver_version}",
            hint=f"set --driver-version {package.version}, or point driver_url at the "
            f"{config.driver_version} .run", code=ExitCode.CONFIG)
    check_flavour(package, config.kernel_module_type)
    devroots = [prepare_devcontainer(config, version) for version in config.releases]
    # One module set per distinct kernel: several releases may share one.
    by_kernel = {d.kernel_release: d for d in reversed(devroots)}
    module_sets = [
        build_modules(package, devroot, config.kernel_module_type, runtime=config.runtime,
                      engine=engine_options(config), jobs=config.jobs,
                      cache_dir=config.cache_dir)
        for devroot in by_kernel.values()]
    with ui.step(f"writing {config.output}"):
        bundle = assemble_bundle(
            package=package, module_sets=module_sets, profile=config.profile,
            compression=config.compression, output=config.output,
            releases=[ReleaseInputs(os=d.release.os.value, channel=d.release.channel.value,
                                    version=d.release.version, kernel_release=d.kernel_release,
                                    image_url=d.release.canonical_image_url,
                                    image_sha256=d.image_sha256)
                      for d in devroots],
            node=NodeSettings(config.agent_units, config.on_driver_failure, trust),
            tool_version=__version__,
            cache_dir=config.cache_dir)
    sandbox = chosen_runtime()  # None when every module set came from the cache
    if args.json:
        ui.print_json({"path": str(bundle.path), "sha256": bundle.sha256, "size": bundle.size,
                       "manifest": bundle.manifest,
                       "sandbox": sandbox.to_json() if sandbox else None})
    else:
        ui.print_fields([
            ("archive", bundle.path), ("sha256", bundle.sha256), ("size", _mib(bundle.size)),
            ("driver", f"{package.version} ({config.kernel_module_type.value} modules, "
                       f"{config.profile.value} profile)"),
            ("kernels", ", ".join(m.kernel_release for m in module_sets)),
            ("sandbox", sandbox.runtime if sandbox else "none needed (all cached)"),
        ])


def cmd_completion(args: argparse.Namespace) -> None:
    sys.stdout.write(render_completion(build_parser(), args.shell))


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_bundle(args.archive)
    if args.json:
        ui.print_json(report.to_json())
    else:
        render_bundle_text(report)
    return int(ExitCode.OK if report.ok else ExitCode.BUNDLE)


# --- rendering -----------------------------------------------------------------------------


def _by_profile(package: DriverPackage) -> dict[Profile, tuple[ManifestEntry, ...]]:
    return {p: package.files(p) for p in Profile}


def render_driver_json(package: DriverPackage) -> dict[str, Any]:
    selected = _by_profile(package)
    members = {p: {id(e) for e in entries} for p, entries in selected.items()}
    return {
        "version": package.version,
        "description": package.description,
        "source": package.source,
        "sha256": package.sha256,
        "extracted_to": str(package.root),
        "flavours": [f.value for f in package.flavours],
        "kernel_modules": list(package.kernel_modules),
        "profiles": {
            p.value: {"files": len(entries),
                      "bytes": sum(package.size_of(e) for e in entries)}
            for p, entries in selected.items()
        },
        "files": [
            {
                "file": e.file,
                "type": e.type,
                "arch": e.arch.value if e.arch else None,
                "mode": f"{e.mode:04o}",
                "size": package.size_of(e),
                "target": e.target,
                "profiles": [p.value for p, ids in members.items() if id(e) in ids],
            }
            for e in selected[Profile.FULL]
        ],
    }


def render_driver_text(package: DriverPackage) -> None:
    ui.print_fields([
        ("driver version", package.version),
        ("description", package.description),
        ("sha256", package.sha256),
        ("flavours", ", ".join(f"{f.value} ({package.kernel_source_dir(f).name}/)"
                               for f in package.flavours) or "none"),
        ("kernel modules", " ".join(package.kernel_modules)),
    ])
    selected = _by_profile(package)
    members = {p: {id(e) for e in entries} for p, entries in selected.items()}
    ui.print_table(
        "profiles", ("profile", "files", "size"),
        [(p.value, len(entries), _mib(sum(package.size_of(e) for e in entries)))
         for p, entries in selected.items()])
    ui.print_table(
        "userspace files", ("file", "type", "arch", "size", *(p.value for p in Profile)),
        [(e.file + (f" -> {e.target}" if e.target else ""), e.type,
          e.arch.value if e.arch else "", _mib(package.size_of(e)),
          *("yes" if id(e) in members[p] else "" for p in Profile))
         for e in selected[Profile.FULL]])


def render_bundle_text(report: BundleReport) -> None:
    ui.print_fields(report.summary())
    ui.print_table("parts", ("part", "files", "size"),
                   [(p.part, p.files, _mib(p.size)) for p in report.parts])
    ui.print_table("kernel modules", ("module", "vermagic", "version", "size"),
                   [(m.path, m.vermagic, m.version, _mib(m.size)) for m in report.modules])
    if report.ok:
        ui.print_fields([("verification", "OK: every file matches SHA256SUMS and MANIFEST.json, "
                          "every module its kernel and driver version")])
    else:
        ui.print_fields([("verification", f"FAILED: {len(report.problems)} problem(s)")])
        for problem in report.problems:
            sys.stdout.write(f"  {problem}\n")


def _mib(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="config file (default: ./coreos-gpu.toml if present)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")

    parser = _Parser(prog="coreos-gpu", parents=[common],
                     description="NVIDIA GPU drivers for Mesos/DC/OS agents on Flatcar and "
                     "CoreOS Container Linux.")
    parser.add_argument("--version", action="version", version=f"coreos-gpu {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(
        group: Any, name: str, helptext: str,
        func: Callable[[argparse.Namespace], int | None]
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=helptext, description=helptext)
        sub.add_argument("--json", action="store_true", help="print JSON")
        add_setting_flags(sub)
        sub.set_defaults(func=func)
        return sub

    config = verbs.add_parser("config", help="configuration").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    verb(config, "show", "print the effective configuration and where each value came from",
         cmd_config_show)

    driver = verbs.add_parser("driver", help="NVIDIA driver packages").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    inspect = verb(driver, "inspect", "show what an NVIDIA .run holds and what each profile "
                   "takes", cmd_driver_inspect)
    inspect.add_argument("package", metavar="PATH_OR_URL", help="NVIDIA-Linux-*.run")
    verb(verbs, "build", "compile the NVIDIA modules for each release's kernel and write the "
         "archive nodes install", cmd_build)
    inspect_archive = verb(verbs, "inspect", "show and verify what a coreos-gpu archive holds",
                           cmd_inspect)
    inspect_archive.add_argument("archive", type=Path, metavar="ARCHIVE",
                                 help="nvidia.tar.gz (or .tar.xz, .tar.zst)")
    verb(verbs, "releases", "list an OS channel's releases and their kernels", cmd_releases)
    add_repository_verbs(verbs, verb)  # keygen, publish, repository list/verify
    add_render_verb(verbs)  # render ignition|butane|terraform|marathon-app|metronome-job

    devcontainer = verbs.add_parser(
        "devcontainer", help="the OS's developer container, the module build's root"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    verb(devcontainer, "prepare", "download, verify and unpack the developer container of "
         "each configured release", cmd_devcontainer_prepare)
    verb(devcontainer, "shell", "open a shell in the developer container (for debugging)",
         cmd_devcontainer_shell)
    run = verb(devcontainer, "run", "run a command in the developer container; its exit code "
               "is coreos-gpu's", cmd_devcontainer_run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the command and its arguments")
    completion = verbs.add_parser("completion", parents=[common], help="print the shell "
                                  "completion script", description="print the completion script "
                                  "for SHELL, generated from this command's own options")
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help=", ".join(SHELLS))
    completion.set_defaults(func=cmd_completion)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.config = getattr(args, "config", None)
        return int(args.func(args) or ExitCode.OK)
    except CoreosGpuError as e:
        if debug:
            traceback.print_exc()
        ui.print_error(e.message, e.hint)
        return int(e.code)
    except KeyboardInterrupt:
        ui.print_error("interrupted")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # stdout is the one pipe coreos-gpu writes to itself: its reader stopped reading.
        return int(ExitCode.BROKEN_PIPE)
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        ui.print_error(f"internal error: {type(e).__name__}: {e}",
                       "rerun with --debug for the traceback, and report it")
        return int(ExitCode.INTERNAL)


def _flush_stdout() -> bool:
    """Write out what stdout still holds; False when its reader has gone (`| head -1`)."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        # Python flushes stdout once more at exit and would print "Exception ignored" for
        # that; what is left can go nowhere, so let it go to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def main(argv: Sequence[str] | None = None) -> int:
    code = _run(argv)
    # A reader that stops early (`coreos-gpu releases | head -1`) is no error to report:
    # exit quietly with 141, as a tool killed by SIGPIPE does (a pipeline without pipefail
    # shows head's 0), unless the verb failed on its own: its code says more.
    if not _flush_stdout() and code == ExitCode.OK:
        return int(ExitCode.BROKEN_PIPE)
    return code
