"""`coreos-gpu cache list|prune`: what the cache holds, and pruning it by policy without ever
removing what a build holds or what the repository lists, crash-safely.

The caches here are written by the real writers where that is cheap: downloads by fetch()
from a local HTTP mirror, driver extractions by extract_run() (of a tiny .run that extracts
a .manifest), bundles by bundle._to_cache(), locks by cache.locked(). Developer containers
and module sets would need debugfs, a sandbox and a compile: those entries are fabricated,
shaped exactly as devcontainer.unpack_image and modules.build_modules write them (noted
where it is done)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu import build as build_module
from coreos_gpu import cli as cli_module
from coreos_gpu import cli_build
from coreos_gpu import prune as prune_module
from coreos_gpu.build import hold
from coreos_gpu.bundle import Bundle, _to_cache
from coreos_gpu.cache import hash_inputs, held, locked, write_atomically
from coreos_gpu.config import Board, BuildConfig, Channel, KernelModuleType, OsName, Profile
from coreos_gpu.config import load_config as load
from coreos_gpu.devcontainer import DevRoot
from coreos_gpu.driver import extract_run
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.fetch import cached, fetch
from coreos_gpu.inventory import CacheEntry, Kind, scan_cache
from coreos_gpu.keys import fingerprint, load_private_key, load_public_key, write_key_pair
from coreos_gpu.prune import in_use, prune_cache, version_key
from coreos_gpu.publish import _write_index
from coreos_gpu.release import SCHEMES, OsRelease, release_folder_url
from coreos_gpu.repository import Entry, Index, Release, render_pointer
from coreos_gpu.sandbox import SandboxSpec
from coreos_gpu.stores import FolderStore
from coreos_gpu.sync import Plan, Target, prune_after
from testinputs.serve import serve_folder

from .conftest import run_cli

DRIVER = "535.261.03"
DAY = 86400
# A .run as small as can be: `sh X.run -x --target DIR` extracts its .manifest, which is all
# extract_run() checks and the inventory reads (its second line is the driver version).
FAKE_RUN = """#!/bin/sh
[ "$1" = -x ] && [ "$2" = --target ] || exit 2
mkdir -p "$3"
printf 'NVIDIA Accelerated Graphics Driver for Linux-x86_64 {v}\\n{v}\\n\\n' > "$3/.manifest"
"""
HOLDER = """import sys
from pathlib import Path
from coreos_gpu.cache import held, locked
with (held if sys.argv[1] == "held" else locked)(Path(sys.argv[2])):
    print("holding", flush=True)
    sys.stdin.read()
"""


@dataclass
class Site:
    """A cache and the HTTP mirror its downloads come from."""

    cache: Path
    mirror_dir: Path
    mirror: str

    def download(self, url_path: str, data: bytes) -> Path:
        """Serve data at the mirror's url_path and fetch it into the cache, as a build does."""
        path = self.mirror_dir / url_path.split("/", 3)[3]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return fetch(url_path, self.cache)

    def release(self, channel: str, version: str, *, kernel: str = "", unpacked: bool = True,
                with_channel: bool = True, downloaded: bool = True) -> str:
        """A release as a build leaves it: version.txt, the image with its .DIGESTS and .sig
        fetched, and (unpacked) its developer container. Returns the image's sha256."""
        folder = release_folder_url(OsName.FLATCAR, Channel(channel), Board.AMD64_USR, version,
                                    self.mirror)
        image_name = f"{SCHEMES[OsName.FLATCAR].image_prefix}developer_container.bin.bz2"
        image = f"image of flatcar {version}\n".encode() * 2000
        if downloaded:
            self.download(folder + "version.txt", f"FLATCAR_VERSION={version}\n".encode())
            for suffix in (".DIGESTS", ".sig"):
                self.download(folder + image_name + suffix, f"{version}{suffix}".encode())
            sha = self.download(folder + image_name, image).name
        else:
            sha = hash_inputs(version)  # a developer container whose download is gone
        if unpacked:
            self.devcontainer(sha, version, kernel or f"6.6.{version_key(version)[-1]}-flatcar",
                              channel if with_channel else None)
        return sha

    def devcontainer(self, sha: str, version: str, kernel: str, channel: str | None) -> None:
        # Fabricated, as devcontainer.unpack_image writes it: under its lock, a work folder
        # holding root/ and devroot.json renamed to devcontainers/<image sha256>.
        folder = self.cache / "devcontainers"
        with locked(folder / f"{sha}.lock"):
            work = folder / f".{sha[:12]}-test"
            tree = work / "root" / "usr/lib/modules" / kernel / "build"
            (tree / "include/generated").mkdir(parents=True)
            (tree / ".config").write_text("CONFIG_MODULES=y\n" * 500)
            (tree / "include/generated/utsrelease.h").write_text(
                f'#define UTS_RELEASE "{kernel}"\n')
            data = {"kernel_release": kernel, "build_dir": f"/usr/lib/modules/{kernel}/build",
                    "image_sha256": sha, "os": "flatcar", "version": version}
            if channel is not None:  # older entries lack it
                data["channel"] = channel
            write_atomically(work / "devroot.json", json.dumps(data, indent=2).encode())
            work.rename(folder / sha)

    def driver(self, version: str = DRIVER) -> Path:
        """NVIDIA's .run downloaded and extracted, as `build` does it."""
        run_file = self.download(
            f"{self.mirror}/us.download.nvidia.com/tesla/{version}/"
            f"NVIDIA-Linux-x86_64-{version}.run", FAKE_RUN.replace("{v}", version).encode())
        return extract_run(run_file, self.cache)[0]

    def module_set(self, kernel: str, driver: str = DRIVER) -> Path:
        # Fabricated, as modules.build_modules writes it: the .ko files and modules.json in
        # modules/<key>, renamed there from its work folder under modules/<key>.lock.
        key = hash_inputs([kernel, driver])
        folder = self.cache / "modules"
        with locked(folder / f"{key}.lock"):
            out = folder / f".{key[:12]}-test" / "out"
            out.mkdir(parents=True)
            (out / "nvidia.ko").write_bytes(b"\x7fELF" + b"\0" * 40000)
            write_atomically(out / "modules.json", json.dumps({
                "key": key, "kernel_release": kernel, "flavour": "open",
                "driver_version": driver, "modules": [
                    {"name": "nvidia", "sha256": "0" * 64, "size": 40004,
                     "vermagic": f"{kernel} SMP", "version": driver, "depends": []}],
            }, indent=2).encode())
            out.rename(folder / key)
            out.parent.rmdir()
        return folder / key

    def bundle(self, *versions: str, kernel: str = "6.6.1-flatcar") -> Path:
        """A finished archive in the bundle cache, by bundle.py's own writer."""
        archive = self.cache.parent / f"bundle-{'-'.join(versions)}.tar.gz"
        archive.write_bytes(b"archive " * 5000)
        releases = [{"os": "flatcar", "channel": "stable", "version": v,
                     "kernel_release": kernel, "image_url": "", "image_sha256": "0" * 64}
                    for v in versions]
        key = hash_inputs(versions)
        _to_cache(self.cache / "bundles", key, Bundle(archive, "1" * 64, archive.stat().st_size, {
            "os": "flatcar", "driver_version": DRIVER, "flavour": "open", "profile": "compute",
            "kernel_releases": [kernel], "releases": releases}))
        return self.cache / "bundles" / key


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One server for the module: what it serves depends only on the version asked for."""
    folder = tmp_path_factory.mktemp("mirror")
    with serve_folder(folder) as url:
        yield folder, url


@pytest.fixture
def site(tmp_path: Path, mirror: tuple[Path, str]) -> Site:
    return Site(tmp_path / "xdg" / "coreos-gpu", *mirror)


def config(site: Site, **settings: Any) -> BuildConfig:
    return load({"cache_dir": str(site.cache), **settings}, None)


def entries(site: Site, kind: Kind) -> dict[str, CacheEntry]:
    return {e.name: e for e in scan_cache(site.cache).of(kind)}


def age_everything(site: Site, days: float) -> None:
    """Every file and folder of the cache last touched `days` ago."""
    moment = time.time() - days * DAY
    for path in [site.cache, *site.cache.rglob("*")]:
        os.utime(path, (moment, moment), follow_symlinks=False)


def tree(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime)
            for p in sorted(folder.rglob("*"))}


class Holder:
    """Another process that holds an entry: as a build does (held), or as its writer does
    while it makes it (locked, alone)."""

    def __init__(self, how: str, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, how, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "holding\n"

    def let_go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


# --- list ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_list_and_prune_of_a_missing_or_empty_cache(tmp_path: Path, exists: bool) -> None:
    xdg = tmp_path / "xdg"
    if exists:
        (xdg / "coreos-gpu").mkdir(parents=True)
    listed = run_cli("cache", "list", "--json", cwd=tmp_path, cache=xdg)
    assert listed.code == 0, listed.stderr
    shown = json.loads(listed.stdout)
    assert shown["total"] == 0 and shown["releases"] == shown["drivers"] == []
    pruned = run_cli("cache", "prune", "--cache-max-age-days", "1", cwd=tmp_path, cache=xdg)
    assert pruned.code == 0, pruned.stderr
    assert "0 entries, 0 B" in pruned.stdout
    assert (xdg / "coreos-gpu").exists() is exists  # nothing made


def test_list_groups_per_release_driver_module_set_and_bundle(site: Site,
                                                             tmp_path: Path) -> None:
    image = site.release("stable", "3975.2.2", kernel="6.6.54-flatcar")
    site.release("beta", "4081.1.0", with_channel=False)  # its image URL names the channel
    legacy = site.release("stable", "3815.2.5", downloaded=False, with_channel=False)
    site.driver()
    site.module_set("6.6.54-flatcar")
    site.bundle("3975.2.2")
    done = run_cli("cache", "list", "--json", cwd=tmp_path, cache=site.cache.parent)
    assert done.code == 0, done.stderr
    shown = json.loads(done.stdout)
    releases = {r["version"]: r for r in shown["releases"]}
    assert {v: (r["os"], r["channel"]) for v, r in releases.items()} == {
        "3975.2.2": ("flatcar", "stable"), "4081.1.0": ("flatcar", "beta"),
        "3815.2.5": ("flatcar", None)}
    stable = releases["3975.2.2"]
    assert stable["image_sha256"] == image and stable["kernel_releases"] == ["6.6.54-flatcar"]
    assert stable["image_size"] > 50_000 and stable["dev_container_size"] > 0
    assert stable["size"] == stable["image_size"] + stable["dev_container_size"]
    assert stable["last_used"].endswith("Z") and stable["in_use"] is False
    assert releases["3815.2.5"]["image_sha256"] == legacy
    assert releases["3815.2.5"]["image_size"] == 0
    (driver,) = shown["drivers"]
    assert driver["driver_version"] == DRIVER and driver["download_size"] > 0
    assert [m["kernel_releases"] for m in shown["module_sets"]] == [["6.6.54-flatcar"]]
    assert len(shown["bundles"]) == 1 and shown["leftovers"] == []
    assert shown["total"] == sum(e["size"] for k in ("releases", "drivers", "module_sets",
                                                     "bundles") for e in shown[k]) + shown["other"]
    text = run_cli("cache", "list", cwd=tmp_path, cache=site.cache.parent)
    assert text.code == 0 and "releases:" in text.stdout and "flatcar" in text.stdout
    assert "3975.2.2" in text.stdout and "total" in text.stdout


# --- the rules -------------------------------------------------------------------------------


def test_versions_compare_number_by_number() -> None:
    assert sorted(["3975.2.10", "3975.2.9", "4081.1.0", "3975.10.0"], key=version_key) == [
        "3975.2.9", "3975.2.10", "3975.10.0", "4081.1.0"]


def test_prune_keeps_the_newest_n_of_each_channel(site: Site) -> None:
    stable = {v: site.release("stable", v) for v in ("3975.2.2", "3975.2.9", "3975.2.10")}
    beta = {v: site.release("beta", v) for v in ("4081.1.0", "4081.1.1")}
    legacy = [site.release("stable", v, downloaded=False, with_channel=False)
              for v in ("3760.2.0", "3815.2.5", "3815.2.0")]
    old_modules = site.module_set("6.6.2-flatcar")  # 3975.2.2's kernel only
    shared = site.module_set("6.6.9-flatcar")  # 3975.2.9's, which stays
    old_bundle, kept_bundle = site.bundle("3975.2.2"), site.bundle("3975.2.9")
    result = prune_cache(config(site, cache_keep_releases=2))
    gone = {i.entry.name for i in result.removed}
    assert gone == {"flatcar stable 3975.2.2", "flatcar ? 3760.2.0",
                    "modules 535.261.03 open for 6.6.2-flatcar",
                    "bundle 3975.2.2 driver 535.261.03 compute"}, gone
    devcontainers = site.cache / "devcontainers"
    assert not (devcontainers / stable["3975.2.2"]).exists()
    assert not (site.cache / "downloads/sha256" / stable["3975.2.2"]).exists()
    assert not (devcontainers / legacy[0]).exists()
    for sha in [stable["3975.2.9"], stable["3975.2.10"], *beta.values(), *legacy[1:]]:
        assert (devcontainers / sha / "devroot.json").is_file()
    assert not old_modules.exists() and (shared / "modules.json").is_file()
    assert not old_bundle.exists() and kept_bundle.exists()
    # Every URL of the removed release is forgotten: a later build downloads it again.
    image_url = release_folder_url(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR,
                                   "3975.2.2", site.mirror)
    assert cached(image_url + "version.txt", site.cache) is None
    assert cached(image_url.replace("3975.2.2", "3975.2.9") + "version.txt", site.cache)
    assert result.freed > 0 and result.after == scan_cache(site.cache).total
    assert not list(site.cache.rglob(".gone.*"))


def test_dry_run_removes_nothing_and_says_what_prune_would(site: Site, tmp_path: Path) -> None:
    for version in ("3975.2.2", "3975.2.9", "3975.2.10"):
        site.release("stable", version)
    site.driver()
    age_everything(site, 40)
    before = tree(site.cache)
    done = run_cli("cache", "prune", "--dry-run", "--json", "--cache-keep-releases", "1",
                   "--cache-max-age-days", "30", cwd=tmp_path, cache=site.cache.parent)
    assert done.code == 0, done.stderr
    assert tree(site.cache) == before
    shown = json.loads(done.stdout)
    assert shown["dry_run"] is True
    would = {e["name"] for e in shown["removed"]}
    assert would == {"flatcar stable 3975.2.2", "flatcar stable 3975.2.9",
                     "flatcar stable 3975.2.10", f"driver {DRIVER} ({site_driver_sha(site)})"}
    real = prune_cache(config(site, cache_keep_releases=1, cache_max_age_days=30))
    assert {i.entry.name for i in real.removed} == would


def site_driver_sha(site: Site) -> str:
    (driver,) = scan_cache(site.cache).of(Kind.DRIVER)
    return dict(driver.details)["sha256"][:12]


def test_age_and_size_go_by_last_use(site: Site) -> None:
    """A build's hold marks an entry used; the age rule and the size rule (least recently
    used first) go by that."""
    shas = {v: site.release("stable", v) for v in ("3975.2.2", "3975.2.9", "3975.2.10")}
    driver = site.driver()
    age_everything(site, 40)
    with held(site.cache / "devcontainers" / shas["3975.2.2"]):  # used now, the oldest
        pass
    with held(driver):
        pass
    aged = prune_cache(config(site, cache_keep_releases=0, cache_max_age_days=30),
                       dry_run=True)
    assert {i.entry.name for i in aged.removed} == {"flatcar stable 3975.2.9",
                                                    "flatcar stable 3975.2.10"}
    one = entries(site, Kind.RELEASE)["flatcar stable 3975.2.9"].size
    inventory = scan_cache(site.cache)
    # Room for all but about one release: the least recently used of the two old ones goes.
    os.utime(site.cache / "devcontainers" / shas["3975.2.10"] / "devroot.json")
    result = prune_cache(config(site, cache_keep_releases=0,
                                cache_max_size=inventory.total - one // 2))
    assert [i.entry.name for i in result.removed] == ["flatcar stable 3975.2.9"]
    assert result.after <= inventory.total - one // 2 and not result.notes


def test_leftovers_go_unless_their_writer_lives(site: Site) -> None:
    sha = site.release("stable", "3975.2.2")
    blobs = site.cache / "downloads/sha256"
    (blobs / ("e" * 64)).write_bytes(b"a feed's older copy")  # no URL names it
    fresh_orphan = blobs / ("f" * 64)
    devcontainers = site.cache / "devcontainers"
    dead = devcontainers / f".{'d' * 12}-abc"  # an unpack that was killed
    (dead / "root").mkdir(parents=True)
    (devcontainers / f"{'d' * 64}.lock").touch()
    alive = devcontainers / f".{sha[:12]}-xyz"  # an unpack going on now
    (alive / "root").mkdir(parents=True)
    sync_work = site.cache / ".sync-dead"
    sync_work.mkdir()
    age_everything(site, 1)
    fresh_orphan.write_bytes(b"downloaded this instant, its record not yet written")
    writer = Holder("locked", devcontainers / f"{sha}.lock")
    try:
        result = prune_cache(config(site, cache_keep_releases=0))
    finally:
        writer.let_go()
    assert {i.entry.kind for i in result.removed} == {Kind.ORPHAN, Kind.WORK}
    assert not (blobs / ("e" * 64)).exists() and fresh_orphan.exists()
    assert not dead.exists() and not sync_work.exists() and alive.is_dir()
    assert (devcontainers / sha / "devroot.json").is_file()


# --- never removed ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["held", "locked"], ids=["a-build-uses-it", "its-writer"])
def test_an_entry_another_process_holds_is_never_removed(site: Site, tmp_path: Path,
                                                         how: str) -> None:
    old = site.release("stable", "3975.2.2")
    site.release("stable", "3975.2.9")
    entry = site.cache / "devcontainers" / old
    holder = Holder(how, entry if how == "held" else entry.with_name(f"{old}.lock"))
    try:
        assert in_use(entries(site, Kind.RELEASE)["flatcar stable 3975.2.2"])
        done = run_cli("cache", "prune", "--cache-keep-releases", "1", "--json", cwd=tmp_path,
                       cache=site.cache.parent)
        assert done.code == 0, done.stderr
        shown = json.loads(done.stdout)
        assert shown["removed"] == []
        assert [(s["name"], s["skipped"]) for s in shown["skipped"]] == [
            ("flatcar stable 3975.2.2", "in use")]
        assert (entry / "devroot.json").is_file() and (entry / "root").is_dir()
        text = run_cli("cache", "prune", "--cache-keep-releases", "1", cwd=tmp_path,
                       cache=site.cache.parent)
        assert "skipped" in text.stdout and "in use" in text.stdout
    finally:
        holder.let_go()
    result = prune_cache(config(site, cache_keep_releases=1))
    assert [i.entry.name for i in result.removed] == ["flatcar stable 3975.2.2"]
    assert not entry.exists()


def _repository(tmp_path: Path, *releases: tuple[str, str], driver: str = DRIVER) -> Path:
    """A signed repository whose index lists a bundle of these (channel, version)s, as
    publish writes it (its own index writer; the bundle itself is not needed here)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    pair = write_key_pair(tmp_path / "keys" / "repo.key")
    entry = Entry(sha256="1" * 64, path=f"bundles/{'1' * 64}/nvidia.tar.gz", size=1,
                  published="2025-01-31T12:00:00Z", os="flatcar", driver_version=driver,
                  flavour="open", profile="compute", kernel_releases=("6.6.2-flatcar",),
                  releases=tuple(Release(c, v, "6.6.2-flatcar") for c, v in releases),
                  tool_version="0.1.0")
    index = Index(generation=1, created="2025-01-31T12:00:00Z",
                  key=fingerprint(load_public_key(pair.public)), entries=(entry,),
                  expires="2099-01-01T00:00:00Z")
    text_sha = _write_index(FolderStore(repo), index, load_private_key(pair.private))
    (repo / "index.current").write_bytes(render_pointer(text_sha))
    return repo


def test_what_the_repository_lists_is_never_removed(site: Site, tmp_path: Path) -> None:
    listed = site.release("stable", "3975.2.2")
    site.release("stable", "3975.2.9")
    unlisted = site.release("stable", "3975.2.10")
    driver = site.driver()
    age_everything(site, 400)
    site.release("stable", "4081.2.0")
    repo = _repository(tmp_path, ("stable", "3975.2.2"))
    settings = {"repository": repo.as_uri(), "repository_key": str(tmp_path / "keys/repo.key.pub"),
                "cache_keep_releases": 1, "cache_max_age_days": 30, "cache_max_size": "1"}
    result = prune_cache(config(site, **settings))
    # 4081.2.0 is the newest and was used now, but cache_max_size is 1 byte: it goes last.
    removed = [i.entry.name for i in result.removed]
    # The listed release keeps its image; its unpacked root is made again from it.
    assert set(removed[:3]) == {"flatcar stable 3975.2.9", "flatcar stable 3975.2.10",
                                "flatcar stable 3975.2.2, unpacked"}
    assert removed[3:] == ["flatcar stable 4081.2.0"]
    assert {e.name for e in result.protected} == {"flatcar stable 3975.2.2",
                                                  f"driver {DRIVER} ({driver.name[:12]})"}
    assert not (site.cache / "devcontainers" / listed).exists()
    assert (site.cache / "downloads/sha256" / listed).is_file() and driver.is_dir()
    assert not (site.cache / "devcontainers" / unlisted).exists()
    assert result.notes and "over cache_max_size" in result.notes[0]


@pytest.mark.parametrize("damage", ["no-index", "garbled-pointer", "other-key"])
def test_an_unreadable_index_stops_prune_before_anything_goes(site: Site, tmp_path: Path,
                                                              damage: str) -> None:
    site.release("stable", "3975.2.2")
    site.release("stable", "3975.2.9")
    repo = _repository(tmp_path, ("stable", "3975.2.9"))
    key = tmp_path / "keys/repo.key.pub"
    if damage == "no-index":
        (repo / "index.current").unlink()
    elif damage == "garbled-pointer":
        (repo / "index.current").write_text("not a pointer\n")
    else:
        key = write_key_pair(tmp_path / "other" / "repo.key").public
    before = tree(site.cache)
    done = run_cli("cache", "prune", "--cache-keep-releases", "1", "--repository",
                   repo.as_uri(), "--repository-key", key, cwd=tmp_path,
                   cache=site.cache.parent)
    errors = [line for line in done.error_lines if ": error: " in line]
    assert done.code in (ExitCode.REPOSITORY, ExitCode.SIGNATURE), done.stderr
    assert len(errors) == 1 and "cache prune cannot tell what the repository" in errors[0]
    assert "Traceback" not in done.stderr and tree(site.cache) == before
    # Without the repository (flags over the config file), it prunes.
    done = run_cli("cache", "prune", "--cache-keep-releases", "1", "--repository", "",
                   "--repository-key", "", cwd=tmp_path, cache=site.cache.parent)
    assert done.code == 0 and "flatcar stable 3975.2.2" in done.stdout, done.stderr


def test_sync_keeps_what_it_wants_and_survives_a_prune_that_cannot_run(site: Site,
                                                                       tmp_path: Path) -> None:
    wanted = site.release("stable", "3975.2.2")
    site.release("stable", "3975.2.9")
    site.release("stable", "3975.2.10")
    target = Target(OsName.FLATCAR, Channel.STABLE, "3975.2.2", DRIVER,
                    KernelModuleType.OPEN, Profile.COMPUTE)
    plan = Plan("file:///repo", 0, (target,), (target,))
    result = prune_after(config(site, cache_keep_releases=1), plan)
    assert result is not None
    assert [i.entry.name for i in result.removed] == ["flatcar stable 3975.2.9"]
    assert (site.cache / "devcontainers" / wanted / "devroot.json").is_file()
    broken = config(site, cache_keep_releases=1, repository=(tmp_path / "none").as_uri())
    assert prune_after(broken, plan) is None


# --- holds and crashes -----------------------------------------------------------------------


def test_a_build_holds_what_it_made_and_makes_again_what_was_pruned(site: Site) -> None:
    sha = site.release("stable", "3975.2.2")
    entry = site.cache / "devcontainers" / sha
    made = []

    def make() -> Path:
        if not made:  # pruned between its making and the hold
            prune_module.remove_entry(entries(site, Kind.RELEASE)["flatcar stable 3975.2.2"])
        elif not entry.exists():
            site.devcontainer(sha, "3975.2.2", "6.6.2-flatcar", "stable")
        made.append(entry)
        return entry

    with ExitStack() as holds:
        assert hold(holds, make, lambda e: e, "devroot.json") == entry
        assert len(made) == 2 and (entry / "devroot.json").is_file()
        assert in_use(entries(site, Kind.RELEASE)["flatcar stable 3975.2.2"])
    assert not in_use(entries(site, Kind.RELEASE)["flatcar stable 3975.2.2"])


def test_devcontainer_run_holds_its_root_while_the_command_runs(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real verb, with the release's preparation (downloads, unpack) and the sandbox
    stood in for: what it runs in is held for as long as the command runs."""
    sha = site.release("stable", "3975.2.2")
    entry = site.cache / "devcontainers" / sha
    release = OsRelease(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "3975.2.2", None, "")
    seen = []

    def prepared(config: BuildConfig, version: str) -> DevRoot:
        return DevRoot(entry / "root", "6.6.2-flatcar", "/usr/lib/modules/6.6.2-flatcar/build",
                       sha, release)

    def run_interactive(spec: SandboxSpec, argv: object, **options: object) -> int:
        seen.append(in_use(entries(site, Kind.RELEASE)["flatcar stable 3975.2.2"]))
        return 3

    monkeypatch.setattr(build_module, "prepare_devcontainer", prepared)
    monkeypatch.setattr(cli_build, "run_interactive", run_interactive)
    monkeypatch.setenv("XDG_CACHE_HOME", str(site.cache.parent))
    assert cli_module.main(["devcontainer", "run", "--release", "3975.2.2", "--", "true"]) == 3
    assert seen == [True]
    assert not in_use(entries(site, Kind.RELEASE)["flatcar stable 3975.2.2"])


@pytest.mark.parametrize("crash_at", ["delete", "records"])
def test_a_crash_mid_removal_leaves_nothing_that_looks_valid(
        site: Site, monkeypatch: pytest.MonkeyPatch, crash_at: str) -> None:
    """Killed after an entry's folder was renamed into trash: while deleting the trash, or
    before the download records went. No name a stage looks up points at half an entry,
    and the next prune deletes the trash, half-deleted or not."""
    sha = site.release("stable", "3975.2.2", kernel="6.6.2-flatcar")
    driver = site.driver()
    modules = site.module_set("6.6.2-flatcar")
    image_url = release_folder_url(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "3975.2.2",
                                   site.mirror) + "flatcar_developer_container.bin.bz2"
    inventory = scan_cache(site.cache)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        if crash_at == "delete":
            patch.setattr(prune_module, "delete_tree", crash)
        else:
            patch.setattr(Path, "unlink", crash)
        for entry in inventory.of(Kind.RELEASE, Kind.DRIVER, Kind.MODULES):
            with suppress(KeyboardInterrupt):
                prune_module.remove_entry(entry)
    # What each stage looks up before it uses an entry:
    assert not (site.cache / "devcontainers" / sha / "devroot.json").exists()  # unpack_image
    assert not driver.is_dir()  # extract_run
    assert not (modules / "modules.json").exists()  # build_modules
    if crash_at == "records":  # the image is whole and its URL still names it: usable
        assert cached(image_url, site.cache) == site.cache / "downloads/sha256" / sha
    else:
        assert cached(image_url, site.cache) is None
    trash = list(site.cache.rglob(".gone.*"))
    assert trash and {e.kind for e in scan_cache(site.cache).entries} >= {Kind.TRASH}
    for gone in trash:  # killed again, halfway through deleting it
        for path in [p for p in gone.rglob("*") if p.is_file()][:1]:
            path.unlink()
    result = prune_cache(config(site, cache_keep_releases=0))
    assert not list(site.cache.rglob(".gone.*"))
    assert {i.entry.kind for i in result.removed} == {Kind.TRASH}


def test_a_read_only_folder_from_an_image_is_deleted(site: Site) -> None:
    sha = site.release("stable", "3975.2.2")
    site.release("stable", "3975.2.9")
    locked_up = site.cache / "devcontainers" / sha / "root" / "usr" / "lib"
    (locked_up / "sealed").mkdir()
    (locked_up / "sealed" / "file").write_text("x")
    os.chmod(locked_up / "sealed", 0o555)
    os.chmod(locked_up, 0o500)
    result = prune_cache(config(site, cache_keep_releases=1))
    assert [i.entry.name for i in result.removed] == ["flatcar stable 3975.2.2"]
    assert not list(site.cache.rglob(".gone.*")) and not result.notes


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--cache-max-size", "lots"], "invalid --cache-max-size: 'lots' (expected a size like"),
    (["--cache-keep-releases", "-1"], "invalid --cache-keep-releases: '-1' (expected a whole"),
    (["--cache-max-age-days", "a week"], "invalid --cache-max-age-days: 'a week'"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    done = run_cli("cache", "prune", *argv, cwd=tmp_path, cache=tmp_path / "xdg")
    assert done.code == ExitCode.CONFIG
    assert len(done.error_lines) == 1 and message in done.error_lines[0], done.stderr


@pytest.mark.parametrize(("raw", "size"), [("20G", 20 << 30), ("512MiB", 512 << 20),
                                           ("1.5T", int(1.5 * (1 << 40))), ("4096", 4096),
                                           (0, 0), ("10 kB", 10 << 10)])
def test_a_size_takes_units(raw: object, size: int) -> None:
    assert load({"cache_max_size": raw}, None).cache_max_size == size


def test_defaults_keep_two_releases_and_sync_does_not_prune() -> None:
    defaults = load({}, None)
    assert (defaults.cache_keep_releases, defaults.cache_max_age_days,
            defaults.cache_max_size, defaults.sync_prune) == (2, 0, 0, False)


def test_errors_say_which_repository(site: Site, tmp_path: Path) -> None:
    site.release("stable", "3975.2.2")
    with pytest.raises(CoreosGpuError) as raised:
        prune_cache(config(site, repository=(tmp_path / "nowhere").as_uri()))
    assert raised.value.code is ExitCode.REPOSITORY and "nowhere" in raised.value.message
