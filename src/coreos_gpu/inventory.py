"""What the cache holds, grouped as an operator thinks of it: one entry per OS release (its
image download and unpacked developer container), per driver (its `.run` and extraction),
per module set and per bundle, and the leftovers of runs that died (partial downloads,
unfinished work, trash).

It reads the layout the stages write, and writes nothing:

    downloads/sha256/<sha256>            each download once (fetch.py)
    downloads/urls/<url key>.json        {"url", "sha256", "size"}: a URL's download
    downloads/partial/<url key>          an unfinished download; locks/<url key>.lock
    devcontainers/<image sha256>/        root/ and devroot.json (devcontainer.py)
    drivers/<.run sha256>/               the extracted package, .manifest first (driver.py)
    modules/<key>/                       the .ko files and modules.json (modules.py)
    bundles/<key>, bundles/<key>.json    an archive and its record (bundle.py)

Each entry folder `X/<name>` has its lock at `X/<name>.lock`: its writer holds it alone while
it makes the entry, and users share it while they use it (cache.held).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from coreos_gpu.cache import lock_of
from coreos_gpu.release import SCHEMES

TRASH_PREFIX = ".gone."  # what prune renames an entry to before deleting it
_HEX64 = re.compile(r"[0-9a-f]{64}")
# The work folder a writer makes beside its entry: mkdtemp(prefix=f".{key[:12]}-").
_WORK = re.compile(r"\.([0-9a-f]{12})-")
SYNC_WORK_PREFIX = ".sync-"  # sync.py's folder for the bundle it is building
_DRIVER_URL = re.compile(r"NVIDIA-Linux-[^/]*?-(\d+\.\d+(?:\.\d+)?)\.run$")
# A file of a release folder, mirrored or not: .../<channel>.release.<domain>/<board>/<version>/
_RELEASE_URL = {
    os_name: re.compile(
        "/" + re.escape(scheme.image_host).replace(re.escape("{channel}"), "(?P<channel>[a-z]+)")
        + r"/[^/]+/(?P<version>\d+\.\d+\.\d+)/(?P<file>[^/]+)$")
    for os_name, scheme in SCHEMES.items()}


class Kind(StrEnum):
    RELEASE = "release"  # an OS release: image download and developer container
    DRIVER = "driver"  # an NVIDIA .run: download and extraction
    MODULES = "modules"  # a compiled module set
    BUNDLE = "bundle"  # a finished archive, kept for unchanged rebuilds
    PARTIAL = "partial"  # an unfinished download, kept for resuming
    WORK = "work"  # the work folder of a writer that died (its lock is free)
    TRASH = "trash"  # an entry a prune renamed and did not finish deleting
    ORPHAN = "orphan"  # a download no URL record names (a feed's older copy, say)


@dataclass(frozen=True)
class CacheEntry:
    kind: Kind
    name: str  # for people: "flatcar stable 3975.2.2", "driver 580.82.07"
    # Removed in this order: what makes the entry valid to a build goes first.
    paths: tuple[Path, ...]
    locks: tuple[Path, ...]  # its users share these; prune takes them alone
    size: int  # bytes on disk
    last_used: float  # POSIX seconds
    parts: tuple[tuple[str, int], ...] = ()  # sizes of its pieces: ("image", n), ...
    os: str = ""
    channel: str = ""  # "" where unknown (a developer container unpacked before it was kept)
    version: str = ""  # OS release, driver version (drivers, modules, bundles)
    kernels: tuple[str, ...] = ()  # kernel releases it has or is for
    releases: tuple[tuple[str, str], ...] = ()  # (os, version) of the releases it serves
    details: tuple[tuple[str, str], ...] = ()  # shown as they are: ("flavour", "open"), ...


@dataclass(frozen=True)
class Inventory:
    cache_dir: Path
    entries: tuple[CacheEntry, ...]
    other: int  # bytes no entry accounts for: feeds, keys, locks, logs

    @property
    def total(self) -> int:
        return sum(e.size for e in self.entries) + self.other

    def of(self, *kinds: Kind) -> tuple[CacheEntry, ...]:
        return tuple(e for e in self.entries if e.kind in kinds)


# --- sizes and times -------------------------------------------------------------------------


def human_size(n: int) -> str:
    """1.4 GiB, 312.0 MiB, 12.0 KiB, 512 B."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


@dataclass
class _Meter:
    """Disk usage, each inode once: hard links (link_tree's) are not counted twice."""

    seen: set[tuple[int, int]] = field(default_factory=set)

    def usage(self, path: Path, *, skip: frozenset[str] = frozenset()) -> int:
        """What path takes, less what lies under the paths in skip."""
        try:
            st = path.lstat()
        except OSError:
            return 0
        total = self._count(st)
        if path.is_dir() and not path.is_symlink():
            total += sum(self.walk(path, skip))
        return total

    def _count(self, st: os.stat_result) -> int:
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in self.seen:
                return 0
            self.seen.add((st.st_dev, st.st_ino))
        return st.st_blocks * 512

    def walk(self, folder: Path, skip: frozenset[str]) -> Iterator[int]:
        try:
            with os.scandir(folder) as items:
                for item in items:
                    if item.path in skip:
                        continue
                    try:
                        yield self._count(item.stat(follow_symlinks=False))
                        if item.is_dir(follow_symlinks=False):
                            yield from self.walk(Path(item.path), skip)
                    except OSError:
                        continue
        except OSError:  # a folder the image made unreadable: what it holds is not counted
            return


def latest_mtime(paths: Iterable[Path]) -> float:
    """The newest mtime of those paths that exist (links not followed)."""
    times = []
    for path in paths:
        try:
            times.append(path.lstat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


# --- the scan --------------------------------------------------------------------------------


@dataclass
class _Release:
    os: str
    version: str
    channel: str = ""
    kernels: set[str] = field(default_factory=set)
    devcontainers: list[Path] = field(default_factory=list)
    records: list[Path] = field(default_factory=list)
    blobs: list[Path] = field(default_factory=list)
    images: set[str] = field(default_factory=set)  # sha256 of its images
    url_keys: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Record:
    path: Path
    url: str
    sha256: str

    @property
    def url_key(self) -> str:
        return self.path.name.removesuffix(".json")


def _records(urls: Path) -> dict[str, list[_Record]]:
    """Download records by the sha256 of the file they name."""
    by_blob: dict[str, list[_Record]] = {}
    for path in _children(urls):
        if path.suffix == ".json" and not path.name.startswith("."):
            data = _read_json(path)
            sha, url = str(data.get("sha256", "")), str(data.get("url", ""))
            if _HEX64.fullmatch(sha):
                by_blob.setdefault(sha, []).append(_Record(path, url, sha))
    return by_blob


def _release_of(url: str) -> tuple[str, str, str, str] | None:
    """(os, channel, version, file name) of a file in a release folder."""
    for os_name, pattern in _RELEASE_URL.items():
        if found := pattern.search(url.split("?")[0]):
            return os_name.value, found["channel"], found["version"], found["file"]
    return None


def _driver_version(extracted: Path, records: list[_Record]) -> str:
    try:  # the .manifest's second line, as nvidia-installer reads it
        with (extracted / ".manifest").open(encoding="utf-8", errors="replace") as f:
            f.readline()
            version = f.readline().strip()
        if version:
            return version
    except OSError:
        pass
    for record in records:
        if found := _DRIVER_URL.search(record.url):
            return found.group(1)
    return ""


class _Scan:
    def __init__(self, cache_dir: Path) -> None:
        self.cache = cache_dir
        self.meter = _Meter()
        self.entries: list[CacheEntry] = []
        downloads = cache_dir / "downloads"
        self.blobs, self.urls = downloads / "sha256", downloads / "urls"
        self.partial, self.url_locks = downloads / "partial", downloads / "locks"
        self.records = _records(self.urls)

    def url_lock(self, key: str) -> Path:
        return self.url_locks / f"{key}.lock"

    def add(self, kind: Kind, name: str, paths: list[Path], locks: Iterable[Path] = (),
            parts: Iterable[tuple[str, list[Path]]] = (), used: Iterable[Path] = (),
            **fields: Any) -> None:
        locks = tuple(dict.fromkeys(locks))
        sizes = tuple((label, sum(self.meter.usage(p) for p in group))
                      for label, group in parts)
        size = sum(s for _, s in sizes) + sum(self.meter.usage(p) for p in paths
                                              if not any(p in g for _, g in parts))
        self.entries.append(CacheEntry(
            kind, name, tuple(paths), locks, size, latest_mtime([*paths, *locks, *used]),
            sizes, **fields))

    def scan(self) -> Inventory:
        driver_shas = self.scan_drivers()
        self.scan_releases(driver_shas)
        self.scan_modules()
        self.scan_bundles()
        self.scan_leftovers()
        counted = frozenset(str(p) for e in self.entries for p in e.paths)
        other = sum(self.meter.walk(self.cache, counted)) if self.cache.is_dir() else 0
        return Inventory(self.cache, tuple(self.entries), other)

    def scan_drivers(self) -> set[str]:
        drivers = self.cache / "drivers"
        extracted = {p.name: p for p in _children(drivers)
                     if _HEX64.fullmatch(p.name) and p.is_dir()}
        shas = set(extracted) | {sha for sha, records in self.records.items()
                                 if any(_DRIVER_URL.search(r.url) for r in records)}
        for sha in sorted(shas):
            records = self.records.get(sha, [])
            blob = self.blobs / sha
            download = [*(r.path for r in records), *([blob] if blob.is_file() else [])]
            tree = [extracted[sha]] if sha in extracted else []
            version = _driver_version(extracted.get(sha, drivers / sha), records)
            self.add(Kind.DRIVER, f"driver {version or '?'} ({sha[:12]})", [*tree, *download],
                     [lock_of(drivers / sha), *(self.url_lock(r.url_key) for r in records)],
                     parts=[("download", download), ("extracted", tree)],
                     version=version, details=(("sha256", sha),))
        return shas

    def scan_releases(self, driver_shas: set[str]) -> None:
        releases: dict[tuple[str, str], _Release] = {}
        for sha, records in sorted(self.records.items()):
            if sha in driver_shas:
                continue
            for record in records:
                if (found := _release_of(record.url)) is None:
                    continue
                os_name, channel, version, file = found
                release = releases.setdefault((os_name, version), _Release(os_name, version))
                release.channel = release.channel or channel
                release.records.append(record.path)
                release.url_keys.add(record.url_key)
                if (self.blobs / sha).is_file() and self.blobs / sha not in release.blobs:
                    release.blobs.append(self.blobs / sha)
                if file.endswith("_developer_container.bin.bz2"):
                    release.images.add(sha)
        folder = self.cache / "devcontainers"
        for entry in _children(folder):
            if not (_HEX64.fullmatch(entry.name) and entry.is_dir()):
                continue
            data = _read_json(entry / "devroot.json")
            os_name, version = str(data.get("os", "")), str(data.get("version", ""))
            # Unpacked before devroot.json named its channel: the image's URL may still say.
            key = (os_name, version) if os_name and version else ("", entry.name)
            release = releases.setdefault(key, _Release(*key))
            release.channel = str(data.get("channel", "")) or release.channel
            if kernel := str(data.get("kernel_release", "")):
                release.kernels.add(kernel)
            release.devcontainers.append(entry)
            release.images.add(entry.name)
        for release in releases.values():
            logs = [p for sha in sorted(release.images)
                    if (p := folder / f"{sha}.prepare.log").is_file()]
            download = [*release.records, *release.blobs]
            name = (f"{release.os} {release.channel or '?'} {release.version}" if release.os
                    else f"developer container {release.version[:12]} (no devroot.json)")
            self.add(Kind.RELEASE, name, [*release.devcontainers, *download, *logs],
                     [*(lock_of(folder / sha) for sha in sorted(release.images)),
                      *(self.url_lock(k) for k in sorted(release.url_keys))],
                     parts=[("image", download), ("dev container", release.devcontainers)],
                     used=[d / "devroot.json" for d in release.devcontainers],
                     os=release.os, channel=release.channel,
                     version=release.version if release.os else "",
                     kernels=tuple(sorted(release.kernels)),
                     releases=((release.os, release.version),) if release.os else (),
                     details=tuple(("image_sha256", s) for s in sorted(release.images)))

    def scan_modules(self) -> None:
        folder = self.cache / "modules"
        for entry in _children(folder):
            if not (_HEX64.fullmatch(entry.name) and entry.is_dir()):
                continue
            data = _read_json(entry / "modules.json")
            kernel, driver = str(data.get("kernel_release", "")), str(data.get("driver_version",
                                                                                ""))
            flavour = str(data.get("flavour", ""))
            log = folder / f"{entry.name}.build.log"
            self.add(Kind.MODULES, f"modules {driver or '?'} {flavour} for {kernel or '?'}",
                     [entry, *([log] if log.is_file() else [])], [lock_of(entry)],
                     used=[entry / "modules.json"], version=driver,
                     kernels=(kernel,) if kernel else (), details=(("flavour", flavour),))

    def scan_bundles(self) -> None:
        folder = self.cache / "bundles"
        for archive in _children(folder):
            if not (_HEX64.fullmatch(archive.name) and archive.is_file()):
                continue
            record = archive.with_name(f"{archive.name}.json")
            manifest = _read_json(record).get("manifest", {})
            manifest = manifest if isinstance(manifest, dict) else {}
            releases = tuple((str(r.get("os", "")), str(r.get("version", "")))
                             for r in manifest.get("releases", []) if isinstance(r, dict))
            driver = str(manifest.get("driver_version", ""))
            profile = str(manifest.get("profile", ""))
            names = ",".join(v for _, v in releases) or "?"
            self.add(Kind.BUNDLE, f"bundle {names} driver {driver or '?'} {profile}".rstrip(),
                     [*([record] if record.is_file() else []), archive], version=driver,
                     kernels=tuple(str(k) for k in manifest.get("kernel_releases", [])),
                     releases=releases, details=(("profile", profile),
                                                 ("flavour", str(manifest.get("flavour", "")))))

    def scan_leftovers(self) -> None:
        named = {r.sha256 for records in self.records.values() for r in records}
        for blob in _children(self.blobs):
            if _HEX64.fullmatch(blob.name) and blob.name not in named and blob.is_file():
                self.add(Kind.ORPHAN, f"download {blob.name[:12]} (no URL names it)", [blob])
        for partial in _children(self.partial):
            if _HEX64.fullmatch(partial.name):
                sidecar = partial.with_name(f"{partial.name}.validator")
                self.add(Kind.PARTIAL, f"partial download {partial.name[:12]}",
                         [*([sidecar] if sidecar.is_file() else []), partial],
                         [self.url_lock(partial.name)])
        for stage in ("devcontainers", "drivers", "modules"):
            for work in _children(self.cache / stage):
                if (found := _WORK.match(work.name)) and work.is_dir():
                    # Its writer holds the lock of the entry it makes for the folder's life.
                    locks = sorted(work.parent.glob(f"{found.group(1)}*.lock"))
                    self.add(Kind.WORK, f"unfinished {stage} work {work.name}", [work], locks)
        for work in _children(self.cache):
            if work.name.startswith(SYNC_WORK_PREFIX) and work.is_dir():
                self.add(Kind.WORK, f"unfinished sync work {work.name}", [work, lock_of(work)],
                         [lock_of(work)])
        for folder in (self.cache, *(self.cache / f for f in (
                "devcontainers", "drivers", "modules", "bundles")), self.blobs):
            for trash in _children(folder):
                if trash.name.startswith(TRASH_PREFIX):
                    self.add(Kind.TRASH, f"trash {trash.relative_to(self.cache)}", [trash])


def scan_cache(cache_dir: Path) -> Inventory:
    """Everything the cache holds; an empty inventory where there is no cache."""
    return _Scan(cache_dir).scan()
