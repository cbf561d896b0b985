"""`coreos-gpu build` end to end: the Flatcar test release over HTTP, the 535 .run, a real
compile in the developer container (about 2-4 minutes per flavour here), and the archive."""

from __future__ import annotations

import functools
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreos_gpu.cache import link_tree
from coreos_gpu.errors import ExitCode

from .bundletools import dangling_links, extract
from .conftest import CliResult, Mirror, run_cli

KERNEL = "6.1.0-50-amd64"
VERSION = "535.261.03"
MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")


@dataclass(frozen=True)
class Build:
    result: CliResult
    archive: Path
    workdir: Path


def _build(cli, mirror: Mirror, flatcar_release, nvidia_run: Path, output: Path,  # type: ignore[no-untyped-def]
           *extra: str) -> CliResult:
    return cli("build", "--mirror", mirror.url, "--release", flatcar_release.version,
               "--signing-key-fingerprint", flatcar_release.key_fingerprint,
               "--driver-url", str(nvidia_run), "--driver-version", VERSION,
               "--runtime", "bwrap", "--output", str(output), "--json", *extra)


@pytest.fixture
def mirror(http_dir: Mirror, flatcar_release) -> Mirror:  # type: ignore[no-untyped-def]
    link_tree(flatcar_release.server_root, http_dir.root)
    return http_dir


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def _read(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["proprietary", "open"])
def test_build_both_flavours(build_bundle, mirror: Mirror, flatcar_release,  # type: ignore[no-untyped-def]
                             nvidia_run: Path, tmp_path: Path, flavour: str) -> None:
    built = build_bundle("--kernel-module-type", flavour)
    archive, result = built.archive, built.result
    shown = json.loads(result.stdout)
    assert shown["manifest"]["driver_version"] == VERSION
    members = _members(archive)
    payload = f"payload/{VERSION}"
    for name in MODULES:
        assert f"{payload}/modules/{KERNEL}/{name}.ko" in members, name
    assert f"{payload}/lib64/libnvidia-ml.so.{VERSION}" in members
    assert f"{payload}/bin/nvidia-smi" in members
    assert [n for n in members if n.startswith(f"{payload}/firmware/") and n.endswith(".bin")]
    assert not [n for n in members if "/lib32/" in n or "/32/" in n]
    assert "MANIFEST.json" in members and "SHA256SUMS" in members
    for name in ("install_nvidia.sh", "startup.sh", "nvidia.service", "node/bundle.env",
                 "node/nvidia-doctor"):
        assert name in members, name
    manifest = json.loads(_read(archive, "MANIFEST.json"))
    assert manifest["flavour"] == flavour
    assert manifest["kernel_releases"] == [KERNEL]
    modules = {f["path"]: f for f in manifest["files"] if f["path"].endswith(".ko")}
    assert len(modules) >= len(MODULES)
    cli = functools.partial(run_cli, cwd=tmp_path, cache=built.cache)
    # inspect checks every checksum and every module's vermagic.
    inspected = cli("inspect", archive, "--json")
    assert inspected.code == 0, inspected.stdout + inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["ok"] is True
    assert report["kernel_releases"] == [KERNEL]
    for module in report["modules"]:
        assert module["vermagic"].startswith(f"{KERNEL} ")

    # Unchanged inputs: the same bytes, without compiling. First assembled anew (without
    # the finished-archive cache: the assembly itself is reproducible), then from the cache.
    shutil.rmtree(built.cache / "coreos-gpu" / "bundles")
    for name in ("again.tar.gz", "cached.tar.gz"):
        again = _build(cli, mirror, flatcar_release, nvidia_run, tmp_path / name,
                       "--kernel-module-type", flavour)
        assert again.code == 0, again.stderr
        assert json.loads(again.stdout)["sha256"] == shown["sha256"]
        assert (tmp_path / name).read_bytes() == archive.read_bytes()
        assert "compiling" not in again.stderr


@pytest.mark.slow
def test_build_the_legacy_470_branch(build_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The second driver generation, without --kernel-module-type: 470 has no kernel-open/ and
    NVIDIA's installer defaults to proprietary before 560, its nvidia-uvm.ko declares no
    version, and there is no GSP firmware to ship."""
    built = build_bundle(driver="470.256.02")
    manifest = json.loads(built.result.stdout)["manifest"]
    assert (manifest["driver_version"], manifest["flavour"]) == ("470.256.02", "proprietary")
    members = _members(built.archive)
    payload = "payload/470.256.02"
    for name in (*MODULES, "nvidia-peermem"):
        assert f"{payload}/modules/{KERNEL}/{name}.ko" in members, name
    assert f"{payload}/lib64/libnvidia-ml.so.470.256.02" in members
    assert not [n for n in members if n.startswith(f"{payload}/firmware/")]
    inspected = run_cli("inspect", built.archive, "--json", cwd=tmp_path, cache=built.cache)
    assert inspected.code == 0, inspected.stdout + inspected.stderr
    versions = {m["path"].rsplit("/", 1)[1]: m["version"]
                for m in json.loads(inspected.stdout)["modules"]}
    assert versions.pop("nvidia-uvm.ko") == ""
    assert set(versions.values()) == {"470.256.02"}


@pytest.mark.slow
def test_unprepared_tree_fails_before_compiling_and_writes_no_archive(
        cli, mirror: Mirror, flatcar_release, nvidia_run: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prepared = cli("devcontainer", "prepare", "--mirror", mirror.url, "--release",
                   flatcar_release.version, "--signing-key-fingerprint",
                   flatcar_release.key_fingerprint, "--json")
    assert prepared.code == 0, prepared.stderr
    [devroot] = json.loads(prepared.stdout)
    tree = Path(devroot["root"]) / "usr/src" / f"linux-headers-{KERNEL}"
    (tree / "Module.symvers").unlink()  # a tree that cannot build modules that load
    archive = tmp_path / "nvidia.tar.gz"
    result = _build(cli, mirror, flatcar_release, nvidia_run, archive)
    assert result.code == ExitCode.IMAGE, result.stderr
    assert "is not prepared: it lacks Module.symvers" in result.error_lines[0]
    assert "compiling" not in result.stderr
    assert not archive.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("nvidia", ".nvidia"))]


@pytest.mark.slow
def test_driver_version_must_match_the_run(cli, nvidia_run: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(nvidia_run, tmp_path / "driver.run")
    result = cli("build", "--driver-url", str(tmp_path / "driver.run"), "--driver-version",
                 "580.82.07", "--offline", "--release", "3975.2.2")
    assert result.code == ExitCode.CONFIG, result.stderr
    assert result.error_lines[0].endswith("driver.run is driver 535.261.03, not driver_version "
                                          "580.82.07")


@pytest.mark.slow
@pytest.mark.parametrize("driver", [VERSION, "470.256.02"])
def test_every_link_of_a_full_bundle_resolves(build_bundle, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              driver: str) -> None:
    """Issue 31's acceptance, for 535 and the second driver generation: `build --profile
    full` then `inspect` exits 0, and every symlink of the extracted payload ends at a file
    inside it. No compile of its own: the module sets are the session's (the profile is not
    part of a module set's key), seeded from the first sync for 535, shared with the other
    470 builds of build_bundle's cache for 470."""
    built = build_bundle("--profile", "full", driver=driver)
    assert json.loads(built.result.stdout)["manifest"]["profile"] == "full"
    inspected = run_cli("inspect", built.archive, "--json", cwd=tmp_path, cache=built.cache)
    assert inspected.code == 0, inspected.stdout + inspected.stderr
    root = extract(built.archive, tmp_path / "extracted")
    links = [p for p in (root / "payload" / driver).rglob("*") if p.is_symlink()]
    assert any(p.parent.name == "lib32" for p in links)  # full: the 32-bit links too
    assert len(links) == len([p for p in root.rglob("*") if p.is_symlink()])
    assert dangling_links(root) == []
