"""The build verbs of the `coreos-gpu` command: config show, releases, driver inspect,
devcontainer prepare|shell|run, build, inspect and sync. cli.py declares their arguments and
runs them; like the other verbs, each calls the stages and returns a Result that cli.py
prints (devcontainer shell and run return the command's exit code: their output is its own).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreos_gpu import ui
from coreos_gpu.build import Build, build, hold_devcontainer
from coreos_gpu.bundle import BundleReport, inspect_bundle
from coreos_gpu.cli_cache import CachePruneResult
from coreos_gpu.config import BuildConfig, Profile, config_of, config_rows
from coreos_gpu.devcontainer import DevRoot, engine_options, prepare_devcontainer
from coreos_gpu.driver import DriverPackage, fetch_driver
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.manifest import ManifestEntry
from coreos_gpu.release import FeedEntry, list_releases
from coreos_gpu.results import Block, Error, Fields, Log, Result, Table, Text
from coreos_gpu.sandbox import SandboxSpec, run_interactive
from coreos_gpu.sync import (
    Outcome,
    Plan,
    SyncResult,
    Target,
    make_plan,
    plan_key,
    publish_location,
    signing_key,
    sync,
)

# --- verbs -------------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> ConfigShowResult:
    return ConfigShowResult(tuple(config_rows(config_of(args))))


def cmd_driver_inspect(args: argparse.Namespace) -> DriverInspectResult:
    config = config_of(args)
    with ui.step(f"reading driver package {Path(args.package).name}"):
        package = fetch_driver(args.package, config.cache_dir, offline=config.offline,
                               sha256=config.driver_sha256)
    return DriverInspectResult(package)


def cmd_releases(args: argparse.Namespace) -> ReleasesResult:
    config = config_of(args)
    releases = list_releases(config.os, config.channel, mirror=config.mirror,
                             cache_dir=config.cache_dir, offline=config.offline)
    return ReleasesResult(f"{config.os.value} {config.channel.value} releases",
                          tuple(releases))


def cmd_devcontainer_prepare(args: argparse.Namespace) -> DevcontainerPrepareResult:
    config = config_of(args)
    return DevcontainerPrepareResult(tuple(prepare_devcontainer(config, version)
                                           for version in config.releases))


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


def cmd_build(args: argparse.Namespace) -> BuildResult:
    config = config_of(args)
    return BuildResult(build(config), config.profile)


def cmd_sync(args: argparse.Namespace) -> SyncPlanResult | SyncRunResult:
    config = config_of(args)
    if args.plan:
        return SyncPlanResult(make_plan(config, plan_key(config)))
    # Before the feeds: a wrong key or nowhere to publish stops sync at once.
    key = signing_key(config)
    publish_location(config)
    return SyncRunResult(sync(config, make_plan(config, key.public_key()), key))


def cmd_inspect(args: argparse.Namespace) -> InspectResult:
    return InspectResult(inspect_bundle(args.archive))


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigShowResult(Result):
    rows: Sequence[tuple[str, Any, str]]  # config_rows: key, value, where it came from

    def to_json(self) -> Any:
        return {key: {"value": value, "source": source} for key, value, source in self.rows}

    def to_text(self) -> Iterable[Block]:
        shown = [(k, _shown_value(v), s) for k, v, s in self.rows]
        yield Table("effective configuration", ("key", "value", "source"), shown)


def _shown_value(value: Any) -> str:
    if value is None:  # kernel_module_type, unset
        return "(the driver's default)"
    return value if isinstance(value, str) and value else json.dumps(value)


@dataclass(frozen=True)
class ReleasesResult(Result):
    title: str
    releases: Sequence[FeedEntry]

    def to_json(self) -> Any:
        return [{"version": r.version, "kernel": r.kernel, "release_date": r.release_date}
                for r in self.releases]

    def to_text(self) -> Iterable[Block]:
        yield Table(self.title, ("version", "kernel", "release date"),
                       [(r.version, r.kernel or "?", r.release_date) for r in self.releases])


@dataclass(frozen=True)
class DevcontainerPrepareResult(Result):
    roots: Sequence[DevRoot]

    def to_json(self) -> Any:
        return [{"os": d.release.os.value, "version": d.release.version,
                 "kernel_release": d.kernel_release, "build_dir": d.build_dir,
                 "root": str(d.root), "image_sha256": d.image_sha256} for d in self.roots]

    def to_text(self) -> Iterable[Block]:
        yield Table("developer containers", ("release", "kernel release", "root"),
                       [(d.release.version, d.kernel_release, str(d.root)) for d in self.roots])


@dataclass(frozen=True)
class BuildResult(Result):
    made: Build
    profile: Profile

    def to_json(self) -> Any:
        bundle, made = self.made.bundle, self.made
        return {"path": str(bundle.path), "sha256": bundle.sha256, "size": bundle.size,
                "manifest": bundle.manifest,
                "sandbox": made.sandbox.to_json() if made.sandbox else None}

    def to_text(self) -> Iterable[Block]:
        bundle, made = self.made.bundle, self.made
        yield Fields([
            ("archive", bundle.path), ("sha256", bundle.sha256), ("size", _mib(bundle.size)),
            ("driver", f"{made.package.version} ({made.flavour.value} modules, "
                       f"{self.profile.value} profile)"),
            ("kernels", ", ".join(m.kernel_release for m in made.module_sets)),
            ("sandbox", made.sandbox.runtime if made.sandbox else "none needed (all cached)"),
        ])


@dataclass(frozen=True)
class SyncPlanResult(Result):
    plan: Plan

    def to_json(self) -> Any:
        # GitHub Actions' matrix takes this object as it is: one job per "include" entry.
        return {"include": [_plan_entry(t) for t in self.plan.missing]}

    def to_text(self) -> Iterable[Block]:
        plan = self.plan
        yield Fields([("repository", plan.location), ("generation", plan.generation),
                         ("missing", f"{len(plan.missing)} of {len(plan.wanted)} wanted "
                                     "bundles")])
        yield Table("missing bundles", ("id", "build flags"),
                       [(t.id, " ".join(t.build_flags())) for t in plan.missing])


@dataclass(frozen=True)
class SyncRunResult(Result):
    result: SyncResult

    def to_json(self) -> Any:
        result = self.result
        return {"repository": result.location, "seconds": round(result.seconds, 1),
                "refreshed": result.refreshed,
                "pruned": CachePruneResult(result.pruned).to_json() if result.pruned else None
                } | {state: [_outcome_json(o) for o in result.of(state)]
                     for state in ("built", "skipped", "failed")}

    def to_text(self) -> Iterable[Block]:
        yield Table(f"sync of {self.result.location}",
                       ("release", "driver", "flavour", "profile", "state", "detail"),
                       [(f"{o.target.channel.value} {o.target.release}",
                         o.target.driver_version, o.target.flavour.value,
                         o.target.profile.value, o.state, _outcome_detail(o))
                        for o in self.result.outcomes])

    def messages(self) -> Iterable[Log | Error]:
        failed = self.result.of("failed")
        if failed:
            yield Error(f"{len(failed)} of {len(failed) + len(self.result.of('built'))} "
                           f"builds failed; the first, {failed[0].target.id}: "
                           f"{failed[0].error}",
                           "the others are published; sync again once it is fixed")

    @property
    def code(self) -> int:
        return int(self.result.code)


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


def _by_profile(package: DriverPackage) -> dict[Profile, tuple[ManifestEntry, ...]]:
    return {p: package.files(p) for p in Profile}


@dataclass(frozen=True)
class DriverInspectResult(Result):
    package: DriverPackage

    def to_json(self) -> Any:
        package = self.package
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

    def to_text(self) -> Iterable[Block]:
        package = self.package
        yield Fields([
            ("driver version", package.version),
            ("description", package.description),
            ("sha256", package.sha256),
            ("flavours", ", ".join(f"{f.value} ({package.kernel_source_dir(f).name}/)"
                                   for f in package.flavours) or "none"),
            ("default flavour", f"{package.default_flavour.value} (what NVIDIA's installer "
                                "picks; --kernel-module-type overrides it)"
                                if package.flavours else "none"),
            ("kernel modules", " ".join(package.kernel_modules)),
        ])
        selected = _by_profile(package)
        members = {p: {id(e) for e in entries} for p, entries in selected.items()}
        yield Table(
            "profiles", ("profile", "files", "size"),
            [(p.value, len(entries), _mib(sum(package.size_of(e) for e in entries)))
             for p, entries in selected.items()])
        yield Table(
            "userspace files", ("file", "type", "arch", "size", *(p.value for p in Profile)),
            [(e.file + (f" -> {e.target}" if e.target else ""), e.type,
              e.arch.value if e.arch else "", _mib(package.size_of(e)),
              *("yes" if id(e) in members[p] else "" for p in Profile))
             for e in selected[Profile.FULL]])


@dataclass(frozen=True)
class InspectResult(Result):
    report: BundleReport

    def to_json(self) -> Any:
        return self.report.to_json()

    def to_text(self) -> Iterable[Block]:
        report = self.report
        yield Fields(report.summary())
        yield Table("parts", ("part", "files", "size"),
                       [(p.part, p.files, _mib(p.size)) for p in report.parts])
        yield Table("kernel modules", ("module", "vermagic", "version", "size"),
                       [(m.path, m.vermagic,
                         m.version or "none (checked by its link to nvidia.ko)", _mib(m.size))
                        for m in report.modules])
        if report.ok:
            yield Fields([("verification", "OK: every file matches SHA256SUMS and "
                              "MANIFEST.json, every module its kernel and driver version")])
        else:
            yield Fields([("verification", f"FAILED: {len(report.problems)} problem(s)")])
            yield Text("".join(f"  {problem}\n" for problem in report.problems))

    @property
    def code(self) -> int:
        return int(ExitCode.OK if self.report.ok else ExitCode.BUNDLE)


def _mib(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"
