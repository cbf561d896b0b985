"""The build verbs of the `coreos-gpu` command: config show, releases, driver inspect,
devcontainer prepare|shell|run, build, inspect and sync. cli.py declares their arguments and
runs them; like the other verbs, each calls the stages and renders through ui.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from coreos_gpu import ui
from coreos_gpu.build import build, hold_devcontainer
from coreos_gpu.bundle import BundleReport, inspect_bundle
from coreos_gpu.cli_cache import prune_json
from coreos_gpu.config import BuildConfig, Profile, config_of, config_rows
from coreos_gpu.devcontainer import DevRoot, engine_options, prepare_devcontainer
from coreos_gpu.driver import DriverPackage, fetch_driver
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.manifest import ManifestEntry
from coreos_gpu.release import list_releases
from coreos_gpu.sandbox import SandboxSpec, run_interactive
from coreos_gpu.sync import (
    Outcome,
    Target,
    make_plan,
    plan_key,
    publish_location,
    signing_key,
    sync,
)

# --- verbs -------------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> None:
    rows = config_rows(config_of(args))
    if args.json:
        ui.print_json({key: {"value": value, "source": source} for key, value, source in rows})
    else:
        shown = [(k, _shown_value(v), s) for k, v, s in rows]
        ui.print_table("effective configuration", ("key", "value", "source"), shown)


def _shown_value(value: Any) -> str:
    if value is None:  # kernel_module_type, unset
        return "(the driver's default)"
    return value if isinstance(value, str) and value else json.dumps(value)


def cmd_driver_inspect(args: argparse.Namespace) -> None:
    config = config_of(args)
    with ui.step(f"reading driver package {Path(args.package).name}"):
        package = fetch_driver(args.package, config.cache_dir, offline=config.offline,
                               sha256=config.driver_sha256)
    if args.json:
        ui.print_json(render_driver_json(package))
    else:
        render_driver_text(package)


def cmd_releases(args: argparse.Namespace) -> None:
    config = config_of(args)
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
    config = config_of(args)
    roots = [prepare_devcontainer(config, version) for version in config.releases]
    rows = [{"os": d.release.os.value, "version": d.release.version,
             "kernel_release": d.kernel_release, "build_dir": d.build_dir,
             "root": str(d.root), "image_sha256": d.image_sha256} for d in roots]
    if args.json:
        ui.print_json(rows)
    else:
        ui.print_table("developer containers", ("release", "kernel release", "root"),
                       [(r["version"], r["kernel_release"], r["root"]) for r in rows])


def _devroot_sandbox(args: argparse.Namespace, holds: ExitStack) -> tuple[DevRoot, BuildConfig]:
    """The one configured release's developer container, held (cache prune leaves it alone)
    until holds closes."""
    config = config_of(args)
    if len(config.releases) != 1:
        raise CoreosGpuError("devcontainer shell and run work on one release; "
                             f"{len(config.releases)} are configured",
                             hint="pick one with --release", code=ExitCode.CONFIG)
    return hold_devcontainer(holds, config, config.releases[0]), config


def cmd_devcontainer_shell(args: argparse.Namespace) -> int:
    with ExitStack() as holds:
        devroot, config = _devroot_sandbox(args, holds)
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
    with ExitStack() as holds:
        devroot, config = _devroot_sandbox(args, holds)
        return run_interactive(SandboxSpec(root=devroot.root), command, runtime=config.runtime,
                               engine_options=engine_options(config),
                               image_key=devroot.image_sha256)


def cmd_build(args: argparse.Namespace) -> None:
    config = config_of(args)
    made = build(config)
    bundle, package = made.bundle, made.package
    if args.json:
        ui.print_json({"path": str(bundle.path), "sha256": bundle.sha256, "size": bundle.size,
                       "manifest": bundle.manifest,
                       "sandbox": made.sandbox.to_json() if made.sandbox else None})
    else:
        ui.print_fields([
            ("archive", bundle.path), ("sha256", bundle.sha256), ("size", _mib(bundle.size)),
            ("driver", f"{package.version} ({made.flavour.value} modules, "
                       f"{config.profile.value} profile)"),
            ("kernels", ", ".join(m.kernel_release for m in made.module_sets)),
            ("sandbox", made.sandbox.runtime if made.sandbox else "none needed (all cached)"),
        ])


def cmd_sync(args: argparse.Namespace) -> int:
    config = config_of(args)
    if args.plan:
        plan = make_plan(config, plan_key(config))
        if args.json:
            # GitHub Actions' matrix takes this object as it is: one job per "include" entry.
            ui.print_json({"include": [_plan_entry(t) for t in plan.missing]})
        else:
            ui.print_fields([("repository", plan.location), ("generation", plan.generation),
                             ("missing", f"{len(plan.missing)} of {len(plan.wanted)} wanted "
                                         "bundles")])
            ui.print_table("missing bundles", ("id", "build flags"),
                           [(t.id, " ".join(t.build_flags())) for t in plan.missing])
        return int(ExitCode.OK)
    # Before the feeds: a wrong key or nowhere to publish stops sync at once.
    key = signing_key(config)
    publish_location(config)
    result = sync(config, make_plan(config, key.public_key()), key)
    if args.json:
        ui.print_json({"repository": result.location, "seconds": round(result.seconds, 1),
                       "refreshed": result.refreshed,
                       "pruned": prune_json(result.pruned) if result.pruned else None} | {
            state: [_outcome_json(o) for o in result.of(state)]
            for state in ("built", "skipped", "failed")})
    else:
        ui.print_table(f"sync of {result.location}",
                       ("release", "driver", "flavour", "profile", "state", "detail"),
                       [(f"{o.target.channel.value} {o.target.release}", o.target.driver_version,
                         o.target.flavour.value, o.target.profile.value, o.state,
                         _outcome_detail(o)) for o in result.outcomes])
    failed = result.of("failed")
    if failed:
        ui.print_error(f"{len(failed)} of {len(failed) + len(result.of('built'))} builds "
                       f"failed; the first, {failed[0].target.id}: {failed[0].error}",
                       "the others are published; sync again once it is fixed")
    return int(result.code)


def _plan_entry(target: Target) -> dict[str, Any]:
    return {"id": target.id, "os": target.os.value, "channel": target.channel.value,
            "release": target.release, "driver_version": target.driver_version,
            "kernel_module_type": target.flavour.value, "profile": target.profile.value,
            "build_flags": " ".join(target.build_flags()),
            "output": f"nvidia-{target.id}.tar.gz"}


def _outcome_json(outcome: Outcome) -> dict[str, Any]:
    return _plan_entry(outcome.target) | {
        "seconds": round(outcome.seconds, 1), "sha256": outcome.sha256 or None,
        "size": outcome.size or None, "compiled": outcome.compiled,
        "error": outcome.error or None, "code": int(outcome.code) or None}


def _outcome_detail(outcome: Outcome) -> str:
    if outcome.state == "built":
        compiled = (f"compiled {outcome.compiled} module set(s)" if outcome.compiled
                    else "modules from the cache")
        return f"{_mib(outcome.size)}, {compiled}, {outcome.seconds:.0f} s"
    if outcome.state == "failed":
        return f"exit {int(outcome.code)}: {outcome.error}"
    return "in the repository"


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
        "default_flavour": package.default_flavour.value if package.flavours else None,
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
        ("default flavour", f"{package.default_flavour.value} (what NVIDIA's installer picks; "
                            "--kernel-module-type overrides it)" if package.flavours else "none"),
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
                   [(m.path, m.vermagic, m.version or "none (checked by its link to nvidia.ko)",
                      _mib(m.size)) for m in report.modules])
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
