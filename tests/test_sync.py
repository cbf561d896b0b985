"""`coreos-gpu sync`: the repository kept ahead of the channels, on the real test server.

The test Flatcar server has three releases on two channels (testinputs/flatcar.py): stable
4081.2.0 (cloud kernel) and 3975.2.2 (amd64 kernel), and beta 4081.1.0, the release 4081.2.0
was promoted from, whose image holds the very same kernel tree as 4081.2.0's. Sync really
compiles (the real 535 sources, bwrap), so three releases cost two compiles, and everything
after the first sync runs from its cache.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreos_gpu.config import Channel, KernelModuleType, OsName, Profile, load_config
from coreos_gpu.errors import ExitCode
from coreos_gpu.repository import Entry, Release
from coreos_gpu.sync import Target
from testinputs.flatcar import BETA, FIRST, IMAGE, OLD_VERSION, UPDATE
from testinputs.serve import serve_folder

from .conftest import DRIVER, CliResult, Site, Synced, keygen, make_site, run_cli

ENTRY_KEYS = {"id", "os", "channel", "release", "driver_version", "kernel_module_type",
              "profile", "build_flags", "output"}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- settings, refused before anything is read or written -----------------------------------


@pytest.mark.parametrize(("toml", "flags", "message"), [
    ("", [], "sync builds bundles for nodes that fetch from a repository: set repository "
     "and repository_key"),
    ('repository = "file://{repo}"\nrepository_key = "repo.key.pub"\n', [],
     "sync needs publish_key: the private key that signs the index"),
    ('repository = "file://{repo}"\nrepository_key = "repo.key.pub"\n'
     'publish_key = "other.key"\n', [], "publish_key other.key ("),
    ('repository = "https://gpu-bundles.example.invalid"\nrepository_key = "repo.key.pub"\n'
     'publish_key = "repo.key"\n', [], "sync cannot write to https://gpu-bundles.example."
     "invalid: nodes read it, publishing needs publish_to"),
    ('repository = "file://{repo}"\nrepository_key = "repo.key.pub"\npublish_key = "repo.key"\n'
     'driver_url = "/srv/NVIDIA-Linux-x86_64-535.261.03.run"\n',
     ["--sync-driver", "535.261.03", "--sync-driver", "580.82.07"],
     "driver_url /srv/NVIDIA-Linux-x86_64-535.261.03.run is one .run, but sync_drivers lists 2"),
    ('repository = "file://{repo}"\nrepository_key = "repo.key.pub"\npublish_key = "repo.key"\n'
     f'driver_sha256 = "{"a" * 64}"\nsync_drivers = ["535.261.03", "580.82.07"]\n', ["--plan"],
     "driver_sha256 checks one .run, but sync_drivers lists 2 driver versions"),
    ("sync_since = \"31.01.2025\"\n", [], "invalid sync_since in "),
    ("", ["--sync-channel", "nightly"], "invalid --sync-channel: 'nightly' (allowed: stable"),
    ("", ["--sync-latest", "0"], "invalid --sync-latest: '0' (expected a whole number"),
], ids=["no-repository", "no-publish-key", "another-key", "http-without-publish-to",
        "one-driver-url-for-two", "one-sha256-for-two", "bad-date", "bad-channel", "zero-latest"])
def test_bad_sync_settings_are_one_line_and_touch_nothing(tmp_path: Path, toml: str,
                                                          flags: list[str],
                                                          message: str) -> None:
    keygen(tmp_path)
    keygen(tmp_path, "other.key")
    repo = tmp_path / "repo"
    (tmp_path / "coreos-gpu.toml").write_text(toml.replace("{repo}", str(repo)))
    # No mirror serves anything: a setting refused late would show as a download error.
    done = run_cli("sync", "--mirror", "http://127.0.0.1:9", *flags, cwd=tmp_path,
                   cache=tmp_path / "cache")
    assert done.code == ExitCode.CONFIG, done.stderr
    assert len(done.error_lines) in (1, 2) and message in done.error_lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not repo.exists() and not (tmp_path / "cache").exists()


def test_a_toml_date_is_a_sync_since(tmp_path: Path) -> None:
    config = tmp_path / "coreos-gpu.toml"
    config.write_text("sync_since = 2025-01-31\n")  # a TOML date, not a string
    assert load_config({}, config).sync_since == "2025-01-31"


def _entry(**changes: object) -> Entry:
    fields: dict[str, object] = {
        "sha256": "1" * 64, "path": f"bundles/{'1' * 64}/nvidia.tar.gz", "size": 1,
        "published": "2025-01-31T12:00:00Z", "os": "flatcar", "driver_version": DRIVER,
        "flavour": "proprietary", "profile": "compute", "kernel_releases": ("6.1.0-50-amd64",),
        "releases": (Release("stable", "3975.2.2", "6.1.0-50-amd64"),), "tool_version": "0.1.0"}
    return Entry(**(fields | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "listed"), [
    ({}, True),
    ({"driver_version": "580.82.07"}, False),
    ({"flavour": "open"}, False),
    ({"profile": "full"}, False),
    ({"os": "coreos"}, False),
    ({"releases": (Release("stable", "3975.2.3", "6.1.0-50-amd64"),)}, False),
    # A bundle of several releases lists each; the channel it was built from does not matter.
    ({"releases": (Release("stable", "3975.2.3", "6.1.0-50-amd64"),
                   Release("beta", "3975.2.2", "6.1.0-50-amd64"))}, True),
])
def test_a_target_is_present_only_with_its_driver_flavour_profile_and_release(
        changes: dict[str, object], listed: bool) -> None:
    target = Target(OsName.FLATCAR, Channel.STABLE, "3975.2.2", DRIVER,
                    KernelModuleType.PROPRIETARY, Profile.COMPUTE)
    assert target.listed_in([_entry(**changes)]) is listed


# --- the plan: feeds and index only ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "releases"), [
    ([], [("beta", BETA.version), ("stable", UPDATE.version), ("stable", FIRST.version)]),
    (["--sync-latest", "1"], [("beta", BETA.version), ("stable", UPDATE.version)]),
    # The feeds' release dates: 3975.2.2 came out on 2024-10-23, 4081.1.0 on 2024-11-19.
    (["--sync-since", "2024-11-01"], [("beta", BETA.version), ("stable", UPDATE.version)]),
    (["--sync-latest", "3", "--sync-channel", "stable"],
     [("stable", UPDATE.version), ("stable", FIRST.version), ("stable", OLD_VERSION)]),
    (["--sync-latest", "1", "--sync-profile", "compute", "--sync-profile", "full",
      "--sync-flavour", "open"], [("beta", BETA.version), ("beta", BETA.version),
                                  ("stable", UPDATE.version), ("stable", UPDATE.version)]),
], ids=["default", "latest-1", "since", "stable-3", "profiles-and-flavour"])
def test_the_plan_lists_every_wanted_bundle_of_an_empty_repository(
        tmp_path: Path, flatcar_release, nvidia_run: Path, flags: list[str],  # type: ignore[no-untyped-def]
        releases: list[tuple[str, str]]) -> None:
    site = make_site(tmp_path, flatcar_release, nvidia_run)
    with serve_folder(flatcar_release.server_root) as mirror:
        done = site.sync("--plan", "--json", *flags, mirror=mirror)
        text = site.sync("--plan", *flags, mirror=mirror)
    assert done.code == 0, done.stderr
    include = json.loads(done.stdout)["include"]
    assert [(e["channel"], e["release"]) for e in include] == releases
    for entry in include:
        assert set(entry) == ENTRY_KEYS
        assert entry["id"] == (f"flatcar-{entry['channel']}-{entry['release']}-{DRIVER}-"
                               f"{entry['kernel_module_type']}-{entry['profile']}")
        assert entry["output"] == f"nvidia-{entry['id']}.tar.gz"
        assert entry["build_flags"] == (
            f"--os flatcar --channel {entry['channel']} --release {entry['release']} "
            f"--driver-version {DRIVER} --kernel-module-type {entry['kernel_module_type']} "
            f"--profile {entry['profile']}")
    if "--sync-flavour" in flags:
        assert {(e["kernel_module_type"], e["profile"]) for e in include} == {
            ("open", "compute"), ("open", "full")}
    assert text.code == 0 and f"{len(include)} of {len(include)} wanted bundles" in text.stdout
    assert not site.repo.exists()  # a plan writes nothing


# --- sync, for real -------------------------------------------------------------------------


def _compiles(result: CliResult) -> list[str]:
    return [line for line in result.stderr.splitlines()
            if line.startswith("==> compiling the proprietary NVIDIA")]


@pytest.mark.slow
def test_sync_compiles_once_per_kernel_tree_and_publishes_every_release(
        synced: Synced, flatcar_release) -> None:  # type: ignore[no-untyped-def]
    result, site = synced.result, synced.site
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    built = [(b["channel"], b["release"], b["compiled"]) for b in report["built"]]
    # 4081.2.0's kernel tree is 4081.1.0's: the beta's compile serves the stable release.
    assert built == [("beta", BETA.version, 1), ("stable", UPDATE.version, 0),
                     ("stable", FIRST.version, 1)]
    assert report["skipped"] == [] and report["failed"] == []
    assert [line.rsplit(" ", 1)[1] for line in _compiles(result)] == [
        flatcar_release.update.kernel_release, flatcar_release.kernel_release]
    assert len(list((site.cache / "coreos-gpu/modules").glob("*/modules.json"))) == 2
    # Progress: a line per planned build and the total.
    for number, (channel, release, _) in enumerate(built, 1):
        assert f"==> [{number}/3] flatcar {channel} {release}: driver {DRIVER}" in result.stderr
    assert "==> sync: 3 built, 0 skipped, 0 failed in " in result.stderr
    # One bundle per release, each listing its own, signed and intact.
    listed = {b["releases"][0]["version"]: b for b in site.listing()}
    assert sorted(listed) == sorted([BETA.version, UPDATE.version, FIRST.version])
    assert all(len(b["releases"]) == 1 for b in listed.values())
    assert listed[BETA.version]["kernel_releases"] == listed[UPDATE.version]["kernel_releases"]
    assert {b["sha256"] for b in listed.values()} == {b["sha256"] for b in report["built"]}
    done = run_cli("repository", "verify", site.repo, "--key", site.folder / "repo.key.pub",
                   cwd=site.folder)
    assert done.code == 0, done.stdout + done.stderr
    assert not list(site.cache.glob("coreos-gpu/.sync-*"))


@pytest.mark.slow
def test_a_second_sync_builds_and_uploads_nothing(synced: Synced, flatcar_release) -> None:  # type: ignore[no-untyped-def]
    site = synced.site
    before = _tree(site.repo)
    with serve_folder(flatcar_release.server_root) as mirror:
        again = site.sync("--json", mirror=mirror)
        plan = site.plan(mirror)
    assert again.code == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["built"] == [] and report["failed"] == []
    assert [s["release"] for s in report["skipped"]] == [BETA.version, UPDATE.version,
                                                         FIRST.version]
    assert _tree(site.repo) == before
    assert "developer container" not in again.stderr and not _compiles(again)
    assert plan == []


@dataclass(frozen=True)
class Partial:
    site: Site
    result: CliResult  # of `sync --json` with the beta image corrupted on the server


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory, flatcar_release, nvidia_run: Path,  # type: ignore[no-untyped-def]
            synced: Synced) -> Partial:
    """A sync into a new repository from a server whose beta image is damaged (one byte
    flipped halfway), with the first sync's cache: the stable builds compile nothing."""
    folder = tmp_path_factory.mktemp("partial")
    server = folder / "server"
    shutil.copytree(flatcar_release.server_root, server, symlinks=True,
                    copy_function=os.link)
    image = server / flatcar_release.beta.release_dir.relative_to(
        flatcar_release.server_root) / IMAGE
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.unlink()  # a hard link to the cached input: never write through it
    image.write_bytes(bytes(data))
    site = make_site(folder / "site", flatcar_release, nvidia_run, cache=synced.site.cache)
    with serve_folder(server) as mirror:
        return Partial(site, site.sync("--json", mirror=mirror))


@pytest.mark.slow
def test_a_corrupt_image_fails_its_release_and_the_others_are_published(
        partial: Partial) -> None:
    result, site = partial.result, partial.site
    assert result.code == ExitCode.DIGEST, result.stderr
    report = json.loads(result.stdout)
    assert [(b["release"], b["compiled"]) for b in report["built"]] == [
        (UPDATE.version, 0), (FIRST.version, 0)]
    [failed] = report["failed"]
    assert failed["release"] == BETA.version and failed["code"] == ExitCode.DIGEST
    assert "SHA512" in failed["error"] or "sha512" in failed["error"].lower()
    assert sorted(b["releases"][0]["version"] for b in site.listing()) == sorted(
        [UPDATE.version, FIRST.version])
    [error] = [line for line in result.error_lines if not line.startswith("coreos-gpu: hint")]
    assert error.startswith(f"coreos-gpu: error: 1 of 3 builds failed; the first, "
                            f"flatcar-beta-{BETA.version}-{DRIVER}-proprietary-compute: ")
    assert not _compiles(result) and "Traceback" not in result.stderr
    assert not list(site.cache.glob("coreos-gpu/.sync-*"))


@pytest.mark.slow
def test_a_plan_entry_built_and_published_by_hand_completes_the_repository(
        tmp_path: Path, partial: Partial, flatcar_release, nvidia_run: Path) -> None:  # type: ignore[no-untyped-def]
    """What one CI matrix job does: `build $build_flags --output $output`, then `publish`."""
    site = make_site(tmp_path / "job", flatcar_release, nvidia_run,
                     key_folder=partial.site.folder, cache=partial.site.cache)
    shutil.copytree(partial.site.repo, site.repo)
    with serve_folder(flatcar_release.server_root) as mirror:
        [entry] = site.plan(mirror)
        assert entry["release"] == BETA.version
        built = run_cli("build", "--mirror", mirror, *shlex.split(entry["build_flags"]),
                        "--output", entry["output"], cwd=site.folder, cache=site.cache,
                        timeout=1800)
        assert built.code == 0, built.stderr
        published = run_cli("publish", entry["output"], cwd=site.folder)  # publish_key, …
        assert published.code == 2 and "publish needs --to" in published.stderr
        published = run_cli("publish", entry["output"], "--to", site.repo, cwd=site.folder)
        assert published.code == 0, published.stderr
        assert site.plan(mirror) == []
    assert sorted(b["releases"][0]["version"] for b in site.listing()) == sorted(
        [BETA.version, UPDATE.version, FIRST.version])



def test_the_docs_sync_config_loads(tmp_path: Path) -> None:
    """docs/how-to/sync.md shows a minimal sync config: it must stay valid."""
    from .conftest import REPO

    text = (REPO / "docs" / "how-to" / "sync.md").read_text()
    block = text.split("A minimal sync config:\n\n", 1)[1].split("\n\n", 1)[0]
    config_file = tmp_path / "coreos-gpu.toml"
    config_file.write_text("".join(line[4:] + "\n" for line in block.splitlines()))
    config = load_config({}, config_file)
    assert config.repository.startswith("https://") and config.publish_to.startswith("s3://")
    assert config.sync_channels == (Channel.BETA, Channel.STABLE)
    assert config.publish_key and config.repository_key and config.sync_drivers
