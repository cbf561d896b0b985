"""`coreos-gpu sync`: build and publish every bundle the channels have and the repository lacks.

    feeds (newest releases per channel) x drivers x flavours x profiles → wanted bundles
    wanted, less what the signed index lists → the plan → build.build + publish, one at a time

A bundle holds one release (see docs/how-to/sync.md), so a wanted bundle is
one (OS, channel, release, driver, flavour, profile) and the plan needs only the feeds and the
index: no image is downloaded to know what is missing, and each entry can be a job of its own
on a CI fleet (`--plan --json`). Releases whose kernel trees are equal share their module set
through the module cache (modules.module_set_key), so they compile once.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from coreos_gpu import ui
from coreos_gpu.build import build
from coreos_gpu.cache import held, lock_of
from coreos_gpu.config import BuildConfig, Channel, KernelModuleType, OsName, Profile
from coreos_gpu.driver import default_flavour
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inventory import SYNC_WORK_PREFIX, human_size
from coreos_gpu.keys import PrivateKey, PublicKey, fingerprint, load_private_key, load_public_key
from coreos_gpu.prune import PruneResult, prune_cache
from coreos_gpu.publish import publish, refresh_if_due
from coreos_gpu.release import list_releases
from coreos_gpu.repository import Entry, load_index
from coreos_gpu.stores import open_reader, open_store


@dataclass(frozen=True)
class Target:
    """One bundle sync keeps in the repository: one release, one driver, flavour and profile."""

    os: OsName
    channel: Channel
    release: str
    driver_version: str
    flavour: KernelModuleType
    profile: Profile

    @property
    def id(self) -> str:
        return (f"{self.os.value}-{self.channel.value}-{self.release}-{self.driver_version}-"
                f"{self.flavour.value}-{self.profile.value}")

    @property
    def title(self) -> str:
        return (f"{self.os.value} {self.channel.value} {self.release}: driver "
                f"{self.driver_version}, {self.flavour.value} modules, {self.profile.value}")

    def build_flags(self) -> list[str]:
        """The `coreos-gpu build` flags that build this bundle (beside the config file)."""
        return ["--os", self.os.value, "--channel", self.channel.value, "--release",
                self.release, "--driver-version", self.driver_version,
                "--kernel-module-type", self.flavour.value, "--profile", self.profile.value]

    def listed_in(self, entries: Sequence[Entry]) -> bool:
        # Versions are unique across channels (Flatcar: <major>.<channel>.<patch>), and a
        # promoted release gets a new version, so the version alone names the release.
        return any((e.os, e.driver_version, e.flavour, e.profile) == (
            self.os.value, self.driver_version, self.flavour.value, self.profile.value)
            and self.release in {r.version for r in e.releases} for e in entries)


@dataclass(frozen=True)
class Plan:
    location: str  # the repository read
    generation: int  # of its index; 0: none yet
    wanted: tuple[Target, ...]
    missing: tuple[Target, ...]


@dataclass(frozen=True)
class Outcome:
    target: Target
    state: str  # "built", "skipped" (the repository has it) or "failed"
    seconds: float = 0.0
    sha256: str = ""  # of the published bundle
    size: int = 0
    compiled: int = 0  # module sets compiled for it; 0: all from the cache
    error: str = ""
    code: ExitCode = ExitCode.OK


@dataclass(frozen=True)
class SyncResult:
    location: str  # the repository written
    outcomes: tuple[Outcome, ...]
    seconds: float
    refreshed: bool = False  # the index was signed again, unchanged, with a new expiry
    pruned: PruneResult | None = None  # with sync_prune: what the cache prune after it did

    def of(self, state: str) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.state == state)

    @property
    def code(self) -> ExitCode:
        """OK, or the first failed build's own code."""
        failed = self.of("failed")
        return failed[0].code if failed else ExitCode.OK


# --- settings --------------------------------------------------------------------------------


def _config_error(message: str, hint: str = "") -> CoreosGpuError:
    return CoreosGpuError(message, hint=hint, code=ExitCode.CONFIG)


def _drivers(config: BuildConfig) -> tuple[str, ...]:
    drivers = config.sync_drivers or (config.driver_version,)
    if len(drivers) > 1 and config.driver_url and "{version}" not in config.driver_url:
        raise _config_error(f"driver_url {config.driver_url} is one .run, but sync_drivers "
                            f"lists {len(drivers)} driver versions",
                            hint="put {version} in driver_url where the version goes, or "
                            "leave it empty and use NVIDIA's URL (or a mirror)")
    if len(drivers) > 1 and config.driver_sha256:
        raise _config_error("driver_sha256 checks one .run, but sync_drivers lists "
                            f"{len(drivers)} driver versions", hint="leave driver_sha256 "
                            "empty, or sync one driver at a time with its own driver_sha256")
    return drivers


def read_location(config: BuildConfig) -> str:
    """The repository sync reads: where it publishes, else the URL the nodes read."""
    location = config.publish_to or config.repository
    if not location:
        raise _config_error("sync needs a repository: set repository and repository_key (what "
                            "the nodes read) and publish_to and publish_key (where sync writes)",
                            hint="see man coreos-gpu, or docs/how-to/sync.md")
    return location


def publish_location(config: BuildConfig) -> str:
    if config.publish_to:
        return config.publish_to
    if config.repository.startswith("file://"):
        return config.repository
    raise _config_error(f"sync cannot write to {config.repository or 'the repository'}: nodes "
                        "read it, publishing needs publish_to", hint="set publish_to: a folder, "
                        "file://PATH or s3://BUCKET[/PREFIX] that the repository URL serves")


def signing_key(config: BuildConfig) -> PrivateKey:
    """The private key, checked against repository_key before anything is built: a bundle
    whose nodes trust another key than the index's would be published in vain."""
    if not config.repository or not config.repository_key:
        raise _config_error("sync builds bundles for nodes that fetch from a repository: set "
                            "repository and repository_key", hint="see man coreos-gpu, or "
                            "docs/how-to/os-updates.md")
    if not config.publish_key:
        raise _config_error("sync needs publish_key: the private key that signs the index",
                            hint="coreos-gpu keygen made it; set publish_key or --publish-key")
    key = load_private_key(Path(config.publish_key).expanduser())
    trusted = load_public_key(Path(config.repository_key).expanduser())
    if fingerprint(key.public_key()) != fingerprint(trusted):
        raise _config_error(
            f"publish_key {config.publish_key} ({fingerprint(key.public_key())}) is not the "
            f"key of repository_key {config.repository_key} ({fingerprint(trusted)}): nodes "
            "would refuse the index it signs", hint="use the pair coreos-gpu keygen made")
    return key


# --- the plan --------------------------------------------------------------------------------


def wanted_releases(config: BuildConfig) -> list[tuple[Channel, str]]:
    """(channel, version) of every release sync keeps built, channel by channel, newest
    first."""
    chosen = []
    for channel in dict.fromkeys(config.sync_channels or (config.channel,)):
        releases = list_releases(config.os, channel, mirror=config.mirror,
                                 cache_dir=config.cache_dir, offline=config.offline)
        if config.sync_since:  # the feed's dates start "2024-10-23 20:58:00 +0000"
            releases = [r for r in releases if r.release_date[:10] >= config.sync_since]
        else:
            releases = releases[:config.sync_latest]
        chosen += [(channel, r.version) for r in releases]
    return chosen


def sync_flavours(config: BuildConfig, driver: str) -> tuple[KernelModuleType, ...]:
    """The flavours sync keeps built for a driver: sync_flavours, else kernel_module_type,
    else the driver's default (known from its version: the plan reads no .run)."""
    if config.sync_flavours:
        return tuple(dict.fromkeys(config.sync_flavours))
    return (config.kernel_module_type or default_flavour(driver),)


def make_plan(config: BuildConfig, key: PublicKey | None) -> Plan:
    """What the channels want and the repository lacks. With a key, the index must be signed
    by it; an empty repository (no index.current yet) lacks everything."""
    drivers = _drivers(config)
    location = read_location(config)
    wanted = tuple(
        Target(config.os, channel, version, driver, flavour, profile)
        for channel, version in wanted_releases(config)
        for driver in drivers
        for flavour in sync_flavours(config, driver)
        for profile in dict.fromkeys(config.sync_profiles or (config.profile,)))
    reader = open_reader(location, cache_dir=config.cache_dir,
                         s3_endpoint_url=config.s3_endpoint_url)
    loaded = load_index(reader, key)
    entries = loaded.index.entries if loaded else ()
    return Plan(reader.location, loaded.index.generation if loaded else 0, wanted,
                tuple(t for t in wanted if not t.listed_in(entries)))


def plan_key(config: BuildConfig) -> PublicKey | None:
    """The key a plan checks the index with: repository_key, where it is set."""
    if config.repository_key:
        return load_public_key(Path(config.repository_key).expanduser())
    return None


def target_config(config: BuildConfig, target: Target, output: Path) -> BuildConfig:
    driver_url = config.driver_url.replace("{version}", target.driver_version)
    return replace(config, os=target.os, channel=target.channel, releases=(target.release,),
                   driver_version=target.driver_version, driver_url=driver_url,
                   kernel_module_type=target.flavour, profile=target.profile, output=output)


# --- the run ---------------------------------------------------------------------------------


def sync(config: BuildConfig, plan: Plan, key: PrivateKey) -> SyncResult:
    """Build and publish each missing bundle in turn; one that fails is reported and the
    others go on. Each is published as soon as it is built, so nodes get it as early as
    possible and a sync stopped halfway keeps what it did."""
    start = time.monotonic()
    store = open_store(publish_location(config), s3_endpoint_url=config.s3_endpoint_url)
    missing = set(plan.missing)
    outcomes = [Outcome(t, "skipped") for t in plan.wanted if t not in missing]
    total = len(plan.missing)
    ui.log(f"==> sync: {total} of {len(plan.wanted)} wanted bundles are missing from "
           f"{plan.location}")
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    for number, target in enumerate(plan.missing, 1):
        ui.log(f"==> [{number}/{total}] {target.title}")
        began = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=SYNC_WORK_PREFIX, dir=config.cache_dir))
        try:
            with held(work):  # cache prune removes the work folders of syncs that died only
                made = build(target_config(config, target, work / "nvidia.tar.gz"))
                with ui.step(f"publishing it to {store.location}"):
                    publish([made.bundle.path], store, key,
                            lifetime=timedelta(days=config.index_lifetime))
            outcome = Outcome(target, "built", time.monotonic() - began, made.bundle.sha256,
                              made.bundle.size, made.compiled)
        except CoreosGpuError as e:
            ui.log(f"    [{number}/{total}] failed: {e.message}")
            outcome = Outcome(target, "failed", time.monotonic() - began, error=e.message,
                              code=e.code)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            lock_of(work).unlink(missing_ok=True)
        outcomes.append(outcome)
        ui.log(f"    [{number}/{total}] {outcome.state} in {_duration(outcome.seconds)}")
    # Nodes refuse an expired index: keep it fresh even when nothing was missing.
    with ui.step(f"refreshing the index of {store.location} if due"):
        refreshed = refresh_if_due(store, key, lifetime=timedelta(days=config.index_lifetime))
    pruned = prune_after(config, plan) if config.sync_prune else None
    order = {t: i for i, t in enumerate(plan.wanted)}
    result = SyncResult(store.location, tuple(sorted(outcomes, key=lambda o: order[o.target])),
                        time.monotonic() - start, refreshed, pruned)
    ui.log(f"==> sync: {len(result.of('built'))} built, {len(result.of('skipped'))} skipped, "
           f"{len(result.of('failed'))} failed in {_duration(result.seconds)}")
    return result


def prune_after(config: BuildConfig, plan: Plan) -> PruneResult | None:
    """sync_prune: the cache pruned by the cache_* settings, keeping the releases the plan
    wants (a failed one is built again next time) and those the repository lists. A prune
    that cannot run is said, and the sync's own result stands."""
    with ui.step("pruning the cache"):
        try:
            result = prune_cache(config, keep={(t.os.value, t.release) for t in plan.wanted})
        except CoreosGpuError as e:
            ui.log(f"    cache prune skipped: {e.message}")
            return None
        ui.log(f"    removed {len(result.removed)} entries ({human_size(result.freed)}); the "
               f"cache holds {human_size(result.after)}"
               + (f"; {len(result.skipped)} in use or not removable" if result.skipped else ""))
        for note in result.notes:
            ui.log(f"    note: {note}")
        return result


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f} s"
