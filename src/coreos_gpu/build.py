"""The build pipeline, end to end: `BuildConfig` → `Build` (a verified bundle on disk).

    driver (.run) → developer containers → module sets (one per distinct kernel) → bundle

`coreos-gpu build` calls it once; `coreos-gpu sync` once per missing bundle. Neither verb
strings the stages together itself, so both build the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from coreos_gpu import __version__, ui
from coreos_gpu.bundle import (
    Bundle,
    NodeSettings,
    ReleaseInputs,
    assemble_bundle,
    check_persistence,
)
from coreos_gpu.cache import held
from coreos_gpu.config import BuildConfig, KernelModuleType
from coreos_gpu.devcontainer import DevRoot, engine_options, prepare_devcontainer
from coreos_gpu.driver import (
    DRIVER_URL,
    MANIFEST_NAME,
    DriverPackage,
    fetch_driver,
    resolve_flavour,
)
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.modules import ModuleSet, build_modules
from coreos_gpu.release import mirrored
from coreos_gpu.repository import load_trust
from coreos_gpu.sandbox import RuntimeChoice


@dataclass(frozen=True)
class Build:
    bundle: Bundle
    package: DriverPackage
    flavour: KernelModuleType
    module_sets: tuple[ModuleSet, ...]
    compiled: int  # module sets compiled by this build; the others came from the cache
    sandbox: RuntimeChoice | None  # the sandbox the compiles ran in; None: nothing compiled


def driver_source(config: BuildConfig) -> str:
    return config.driver_url or mirrored(DRIVER_URL.format(v=config.driver_version),
                                         config.mirror)


def read_driver(config: BuildConfig) -> tuple[DriverPackage, KernelModuleType]:
    """The configured .run, checked to be the configured version, and the flavour to build:
    the configured one, which it must have, or its default."""
    source = driver_source(config)
    with ui.step(f"reading driver package {Path(source).name}"):
        package = fetch_driver(source, config.cache_dir, offline=config.offline,
                               sha256=config.driver_sha256)
    if package.version != config.driver_version:
        raise CoreosGpuError(
            f"{source} is driver {package.version}, not driver_version {config.driver_version}",
            hint=f"set --driver-version {package.version}, or point driver_url at the "
            f"{config.driver_version} .run", code=ExitCode.CONFIG)
    return package, resolve_flavour(package, config.kernel_module_type)


Made = TypeVar("Made")


def hold(holds: ExitStack, make: Callable[[], Made], entry: Callable[[Made], Path],
         marker: str) -> Made:
    """make() a cache entry and hold it (cache.held) until holds closes, so that `cache prune`
    leaves it alone while it is used. One pruned between make() and the hold (its marker
    file gone) is made again."""
    for _ in range(3):
        made = make()
        folder = entry(made)
        with ExitStack() as one:
            one.enter_context(held(folder))
            if (folder / marker).exists():
                holds.enter_context(one.pop_all())
                return made
    raise CoreosGpuError(f"{folder} was removed from the cache each time it was made",
                         hint="is a `coreos-gpu cache prune` running in a loop?")


def hold_devcontainer(holds: ExitStack, config: BuildConfig, version: str) -> DevRoot:
    """The release's developer container, prepared, held until holds closes."""
    return hold(holds, lambda: prepare_devcontainer(config, version), lambda d: d.root.parent,
                "devroot.json")


def build(config: BuildConfig) -> Build:
    """Build the bundle config describes into config.output (atomically)."""
    # Every cache entry the build reads is held until it is done: prune leaves them alone.
    with ExitStack() as holds:
        return _build(config, holds)


def _build(config: BuildConfig, holds: ExitStack) -> Build:
    # The repository's key is read before anything is downloaded: a bad one stops the build.
    trust = load_trust(config.repository, config.repository_key)
    # The driver first: a wrong driver_version should not wait for gigabytes of images.
    package, flavour = hold(holds, lambda: read_driver(config), lambda made: made[0].root,
                            MANIFEST_NAME)
    check_persistence(package, config.profile, config.persistence)
    devroots = [hold_devcontainer(holds, config, version) for version in config.releases]
    # One module set per distinct kernel: several releases may share one.
    by_kernel = {d.kernel_release: d for d in reversed(devroots)}
    module_sets, compiled = [], 0
    for devroot in by_kernel.values():
        compile_or_find = partial(build_modules, package, devroot, flavour,
                                  runtime=config.runtime, engine=engine_options(config),
                                  jobs=config.jobs, cache_dir=config.cache_dir)
        module_set = hold(holds, compile_or_find, lambda m: m.folder, "modules.json")
        module_sets.append(module_set)
        compiled += module_set.compiled
    with ui.step(f"writing {config.output}"):
        bundle = assemble_bundle(
            package=package, module_sets=module_sets, profile=config.profile,
            compression=config.compression, output=config.output,
            releases=[ReleaseInputs(os=d.release.os.value, channel=d.release.channel.value,
                                    version=d.release.version, kernel_release=d.kernel_release,
                                    image_url=d.release.canonical_image_url,
                                    image_sha256=d.image_sha256)
                      for d in devroots],
            node=NodeSettings(config.agent_units, config.on_driver_failure, trust,
                              persistence=config.persistence, mesos_path=config.mesos_path),
            tool_version=__version__,
            cache_dir=config.cache_dir)
    # Each compile returns the sandbox it took; all ask for config.runtime in like roots.
    sandbox = next((m.sandbox for m in reversed(module_sets) if m.sandbox), None)
    return Build(bundle, package, flavour, tuple(module_sets), compiled, sandbox)

