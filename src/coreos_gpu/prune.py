"""`coreos-gpu cache prune`: remove from the cache, by policy, what no build needs any more.

The rules, in this order (inventory.py says what an entry is):

- always: the trash of an interrupted prune, the work folders of writers that died (their
  lock is free), and downloads that no URL names any more (a feed's older copies);
- `cache_keep_releases` N: the newest N releases of each (OS, channel), versions compared
  number by number; older ones go, with the module sets and bundles that served only them;
- `cache_max_age_days`: whatever was not used for that many days;
- `cache_max_size`: the least recently used first, until the cache is under that size.

Never removed: an entry that a build, `devcontainer shell|run` or a writer holds (cache.held;
prune takes each entry's locks alone, without waiting, and says what it skipped), and the
images of the releases and the drivers that the configured repository's index lists (their
unpacked developer containers, made again from the image, fall to the rules), and the
releases the caller keeps (sync: the releases it wants). Module sets and bundles are
outputs, made again from those, and fall to the rules.

Removal is crash-safe: a folder is renamed to `.gone.*` beside it (atomic) and deleted after;
files are unlinked, the record that makes an entry valid first. So an entry is whole or
absent to a later build, and the next prune deletes any trash left.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from coreos_gpu.config import BuildConfig
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inventory import (
    TRASH_PREFIX,
    CacheEntry,
    Inventory,
    Kind,
    human_size,
    latest_mtime,
    scan_cache,
)
from coreos_gpu.keys import load_public_key
from coreos_gpu.repository import POINTER, load_index
from coreos_gpu.stores import open_reader

DAY = 86400.0
# A download no URL names is garbage, unless its download finished this instant: fetch.py
# moves the file into place before it writes the record that names it.
ORPHAN_GRACE_S = 3600.0
# sync.py makes its work folder, then holds it: one this young may not be held yet.
WORK_GRACE_S = 3600.0
ALWAYS = (Kind.TRASH, Kind.WORK, Kind.ORPHAN)


@dataclass(frozen=True)
class Policy:
    keep_releases: int  # newest releases kept per (OS, channel); 0: no limit
    max_age_days: int  # 0: no limit
    max_size: int  # bytes; 0: no limit

    @classmethod
    def of(cls, config: BuildConfig) -> Policy:
        return cls(config.cache_keep_releases, config.cache_max_age_days, config.cache_max_size)


@dataclass(frozen=True)
class Needs:
    """What must stay: releases as (OS, version), drivers by version."""

    releases: frozenset[tuple[str, str]] = frozenset()
    drivers: frozenset[str] = frozenset()
    source: str = ""  # the repository read, for messages

    def protects(self, entry: CacheEntry) -> bool:
        if entry.kind is Kind.RELEASE:
            return (entry.os, entry.version) in self.releases
        return entry.kind is Kind.DRIVER and entry.version in self.drivers


@dataclass(frozen=True)
class Item:
    entry: CacheEntry
    reason: str  # why the policy removes it
    skipped: str = ""  # why it stayed after all: "in use", an error; "": removed


@dataclass(frozen=True)
class PruneResult:
    cache_dir: Path
    dry_run: bool
    before: int  # bytes
    items: tuple[Item, ...]
    protected: tuple[CacheEntry, ...]  # what the rules would remove, kept for the repository
    notes: tuple[str, ...] = ()

    @property
    def removed(self) -> tuple[Item, ...]:
        return tuple(i for i in self.items if not i.skipped)

    @property
    def skipped(self) -> tuple[Item, ...]:
        return tuple(i for i in self.items if i.skipped)

    @property
    def freed(self) -> int:
        return sum(i.entry.size for i in self.removed)

    @property
    def after(self) -> int:
        return self.before - self.freed


# --- what the repository needs ---------------------------------------------------------------


def repository_needs(config: BuildConfig) -> Needs:
    """The releases and drivers the configured repository's index lists: what it needs to
    build its entries again (another driver, flavour or profile for a release nodes run). An
    index that cannot be read stops prune: guessing would remove what it needs."""
    location = config.publish_to or config.repository
    if not location:
        return Needs()
    hint = ("check the repository (coreos-gpu repository verify), or prune without it: "
            "--repository '' --publish-to ''")
    try:
        key = (load_public_key(Path(config.repository_key).expanduser())
               if config.repository_key else None)
        reader = open_reader(location, cache_dir=config.cache_dir,
                             s3_endpoint_url=config.s3_endpoint_url)
        loaded = load_index(reader, key)
    except CoreosGpuError as e:
        raise CoreosGpuError(f"cache prune cannot tell what the repository {location} needs: "
                             f"{e.message}", hint=hint, code=e.code) from e
    if loaded is None:
        raise CoreosGpuError(f"cache prune cannot tell what the repository {location} needs: "
                             f"it has no {POINTER}", hint=hint, code=ExitCode.REPOSITORY)
    entries = loaded.index.entries
    return Needs(frozenset((e.os, r.version) for e in entries for r in e.releases),
                 frozenset(e.driver_version for e in entries), location)


# --- the rules -------------------------------------------------------------------------------


def version_key(version: str) -> tuple[int, ...]:
    """3975.2.10 after 3975.2.9: versions compare number by number (release.py's order)."""
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def _newest_kept(releases: Sequence[CacheEntry], keep: int) -> dict[CacheEntry, str]:
    """The releases beyond the newest `keep` of their (OS, channel); an unknown channel is a
    group of its own, so an old entry is never compared with a channel it may not be of."""
    groups: dict[tuple[str, str], list[CacheEntry]] = {}
    for entry in releases:
        if entry.version:
            groups.setdefault((entry.os, entry.channel), []).append(entry)
    beyond = {}
    for (os_name, channel), members in groups.items():
        members.sort(key=lambda e: version_key(e.version), reverse=True)
        for entry in members[keep:]:
            beyond[entry] = (f"older than the newest {keep} {os_name} "
                             f"{channel or '(channel unknown)'} releases")
    return beyond


def _always(entry: CacheEntry, now: float) -> str:
    if entry.kind is Kind.TRASH:
        return "left by an interrupted prune"
    if entry.kind is Kind.ORPHAN and now - entry.last_used > ORPHAN_GRACE_S:
        return "no URL names it any more"
    if entry.kind is Kind.WORK and now - entry.last_used > WORK_GRACE_S:
        return "its writer died (its lock is free)"
    return ""


# --- locks and removal -----------------------------------------------------------------------


IN_USE = "in use"


@contextmanager
def _alone(locks: Sequence[Path], *, create: bool) -> Iterator[str]:
    """Each lock taken alone without waiting, for the block: "" when all are, else why not
    (IN_USE: someone holds one). Without create, a lock file that does not exist is one
    nobody holds."""
    with ExitStack() as stack:
        why_not = ""
        for lock in locks:
            try:
                if create:
                    lock.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                continue
            except OSError as e:
                why_not = f"cannot take its lock {lock}: {e.strerror or e}"
                break
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                why_not = IN_USE
                break
        yield why_not


def in_use(entry: CacheEntry) -> bool:
    """Whether someone holds the entry now (a probe: its locks taken and let go at once)."""
    with _alone(entry.locks, create=False) as why_not:
        return why_not == IN_USE


def _writable(folder: Path) -> None:
    """Give every folder in the tree its owner's rwx: an image's read-only folders (0555)
    cannot be emptied otherwise. Symlinks are never followed: they point into the image."""
    os.chmod(folder, 0o700)
    for top, folders, _ in os.walk(folder):
        for name in folders:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


def delete_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError:
        _writable(path)
        shutil.rmtree(path)


def remove_entry(entry: CacheEntry) -> str:
    """Remove the entry's paths in order; "" or what could not be deleted. A folder is renamed
    into trash first: a crash then leaves trash, never a half entry that looks whole."""
    trash = []
    for path in entry.paths:
        if path.is_dir() and not path.is_symlink():
            if path.name.startswith(TRASH_PREFIX):
                trash.append(path)
                continue
            gone = path.with_name(f"{TRASH_PREFIX}{path.name}.{secrets.token_hex(4)}")
            path.rename(gone)
            trash.append(gone)
        else:
            path.unlink(missing_ok=True)
    problems = []
    for gone in trash:
        try:
            delete_tree(gone)
        except OSError as e:
            problems.append(f"{gone}: {e.strerror or e}")
    return "; ".join(problems)


# --- the prune -------------------------------------------------------------------------------


def _unpacked(release: CacheEntry) -> CacheEntry | None:
    """A release's unpacked developer container(s) alone, as an entry; None if none."""
    folders = tuple(p for p in release.paths if p.parent.name == "devcontainers")
    if release.kind is not Kind.RELEASE or not folders:
        return None
    size = dict(release.parts).get("dev container", 0)
    return replace(release, name=f"{release.name}, unpacked", paths=folders, size=size,
                   parts=(("dev container", size),))


class _Pruner:
    def __init__(self, inventory: Inventory, needs: Needs, keep: frozenset[tuple[str, str]],
                 *, dry_run: bool, now: float) -> None:
        self.inventory, self.needs, self.keep = inventory, needs, keep
        self.dry_run, self.now = dry_run, now
        self.items: list[Item] = []
        self.notes: list[str] = []
        self.done: set[CacheEntry] = set()  # removed, or tried
        self.protected: dict[CacheEntry, None] = {}
        self.total = inventory.total

    def kept(self, entry: CacheEntry) -> bool:
        if self.needs.protects(entry) or (entry.kind is Kind.RELEASE and (
                entry.os, entry.version) in self.keep):
            self.protected[entry] = None
            return True
        return False

    def remove(self, entry: CacheEntry, reason: str) -> None:
        if entry in self.done:
            return
        if self.kept(entry):
            # A release the repository lists keeps its image, from which a rebuild unpacks
            # it again (a minute or so); its unpacked root (up to 1 GB) falls to the rules,
            # or a sync host would keep every root it ever built.
            unpacked = _unpacked(entry) if self.needs.protects(entry) else None
            if unpacked is None or unpacked in self.done:
                return
            entry, reason = unpacked, f"{reason}; its image is kept for the repository"
        self.done.add(entry)
        skipped = ""
        existed = [lock for lock in entry.locks if lock.exists()]  # not those prune makes
        with _alone(entry.locks, create=not self.dry_run) as why_not:
            if why_not:
                skipped = why_not
            elif not self.dry_run:
                # Used and let go between the scan and now: the reason may not hold any more.
                if entry.kind not in ALWAYS and latest_mtime(
                        [*entry.paths, *existed]) > entry.last_used:
                    skipped = "used while the prune ran"
                else:
                    try:
                        problem = remove_entry(entry)
                    except OSError as e:
                        skipped = f"cannot remove it: {e.strerror or e}"
                    else:
                        if problem:
                            self.notes.append(f"could not delete all of {problem}")
        self.items.append(Item(entry, reason, skipped))
        if not skipped:
            self.total -= entry.size

    def run(self, policy: Policy) -> None:
        entries = self.inventory.entries
        for entry in entries:
            if entry.kind in ALWAYS and (reason := _always(entry, self.now)):
                self.remove(entry, reason)
        releases = [e for e in entries if e.kind is Kind.RELEASE]
        if policy.keep_releases:
            for entry, reason in _newest_kept(releases, policy.keep_releases).items():
                self.remove(entry, reason)
        if policy.max_age_days:
            cutoff = self.now - policy.max_age_days * DAY
            for entry in entries:
                if entry.kind not in ALWAYS and entry.last_used < cutoff:
                    self.remove(entry, f"not used for {policy.max_age_days} days")
        self.remove_dependents(releases)
        if policy.max_size:
            self.fit(policy.max_size)

    def remove_dependents(self, releases: Sequence[CacheEntry]) -> None:
        """Module sets and bundles that served only releases this prune removed."""
        gone = {e for e in releases if e in self.done and self.removed(e)}
        if not gone:
            return
        gone_releases = {r for e in gone for r in e.releases}
        kernels = {k for e in gone for k in e.kernels} - {
            k for e in releases if e not in gone for k in e.kernels}
        for entry in self.inventory.of(Kind.MODULES):
            if entry.kernels and set(entry.kernels) <= kernels:
                self.remove(entry, "the releases of its kernel were removed")
        for entry in self.inventory.of(Kind.BUNDLE):
            if entry.releases and set(entry.releases) <= gone_releases:
                self.remove(entry, "its releases were removed")

    def removed(self, entry: CacheEntry) -> bool:
        return any(i.entry == entry and not i.skipped for i in self.items)

    def fit(self, max_size: int) -> None:
        candidates = sorted((e for e in self.inventory.entries
                             if e.kind not in ALWAYS and e not in self.done),
                            key=lambda e: e.last_used)
        for entry in candidates:
            if self.total <= max_size:
                break
            self.remove(entry, f"least recently used while the cache is over "
                               f"cache_max_size ({human_size(max_size)})")
        if self.total > max_size:
            self.notes.append(f"the cache is still {human_size(self.total - max_size)} over "
                              "cache_max_size: what is left is in use, kept for the "
                              "repository, or small files no rule removes (feeds, keys, locks)")


def prune_cache(config: BuildConfig, *, dry_run: bool = False,
                keep: Iterable[tuple[str, str]] = (), now: float | None = None) -> PruneResult:
    """Apply config's cache_* policy. keep: (OS, version) of releases to keep besides what
    the repository needs."""
    cache_dir = config.cache_dir
    if not cache_dir.is_dir():
        return PruneResult(cache_dir, dry_run, 0, (), ())
    needs = repository_needs(config)  # before anything is touched: it may refuse
    pruner = _Pruner(scan_cache(cache_dir), needs, frozenset(keep), dry_run=dry_run,
                     now=time.time() if now is None else now)
    pruner.run(Policy.of(config))
    return PruneResult(cache_dir, dry_run, pruner.inventory.total, tuple(pruner.items),
                       tuple(pruner.protected), tuple(pruner.notes))
