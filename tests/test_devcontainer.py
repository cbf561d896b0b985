"""The developer container stage, end to end against the Flatcar test release over HTTP."""

from __future__ import annotations

import bz2
import json
import os
from pathlib import Path

import pytest

from coreos_gpu.cache import link_tree
from coreos_gpu.config import Board, Channel, OsName, Runtime
from coreos_gpu.devcontainer import (
    find_kernel_tree,
    find_partition,
    prepare_kernel_tree,
    read_kernel_release,
    resolve_in_root,
)
from coreos_gpu.errors import CoreosGpuError, ExitCode, KernelTreeNotPrepared
from coreos_gpu.release import OsRelease
from coreos_gpu.sandbox import EngineOptions

from .conftest import Mirror, make_busybox_root

KERNEL = "6.1.0-50-amd64"


@pytest.fixture
def mirror(http_dir: Mirror, flatcar_release) -> Mirror:  # type: ignore[no-untyped-def]
    link_tree(flatcar_release.server_root, http_dir.root)
    return http_dir


def _prepare(cli, mirror: Mirror, release, *extra: str):  # type: ignore[no-untyped-def]
    return cli("devcontainer", "prepare", "--os", "flatcar", "--channel", "stable",
               "--mirror", mirror.url, "--signing-key-fingerprint", release.key_fingerprint,
               *extra)


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # the served tree is hard-linked to the cached input: never write through
    path.write_bytes(data)


@pytest.mark.slow
def test_prepare_gives_the_release_kernel_tree(cli, mirror: Mirror, flatcar_release,
                                               tmp_path: Path) -> None:
    result = _prepare(cli, mirror, flatcar_release, "--release", flatcar_release.version,
                      "--json")
    assert result.code == 0, result.stderr
    [shown] = json.loads(result.stdout)
    assert shown["kernel_release"] == KERNEL
    assert shown["version"] == flatcar_release.version
    root = Path(shown["root"])
    # /etc is copied whole, and its os-release link followed into /usr/lib.
    assert f"VERSION={flatcar_release.version}\n" in (root / "etc/os-release").read_text()
    tree = resolve_in_root(root, shown["build_dir"])
    assert tree.is_relative_to(root) and (tree / "Module.symvers").is_file()
    assert (root / "usr/bin/make").exists() and (root / "usr/bin/gcc-12").exists()
    # Only what a module build reads: dpkg's database and the release files stay behind.
    assert not (root / "var/lib/dpkg").exists()
    assert not (root / "usr/share/flatcar/release").exists()
    # "current" is the newest release, with the other kernel; then offline, everything comes
    # from the cache.
    again = _prepare(cli, mirror, flatcar_release, "--release", "current", "--json")
    assert again.code == 0, again.stderr
    [current] = json.loads(again.stdout)
    assert (current["version"], current["kernel_release"]) == (
        flatcar_release.update.version, flatcar_release.update.kernel_release)
    assert current["root"] != shown["root"]
    import shutil

    shutil.rmtree(mirror.root)  # offline must not need the server at all
    offline = _prepare(cli, mirror, flatcar_release, "--release", "current", "--offline")
    assert offline.code == 0, offline.stderr


def _no_cache_entry_left(cache: Path, *, image_kept: bool = False) -> None:
    """Nothing unpacked, nothing marked verified, and the image gone unless image_kept (an
    image that matches its SHA512 is kept when only the signature check fails)."""
    devcontainers = cache / "coreos-gpu" / "devcontainers"
    if devcontainers.exists():
        assert [p.name for p in devcontainers.iterdir() if not p.name.endswith(".lock")] == []
    blobs = cache / "coreos-gpu" / "downloads" / "sha256"
    if blobs.exists():
        assert not list(blobs.glob("*.verified"))
        big = [p for p in blobs.iterdir() if p.stat().st_size > 1 << 20]
        assert len(big) == image_kept, "image kept" if big else "image gone"
    urls = cache / "coreos-gpu" / "downloads" / "urls"
    if urls.exists():
        listed = [json.loads(p.read_text())["url"] for p in urls.iterdir()]
        assert len([u for u in listed if u.endswith(".bin.bz2")]) == image_kept


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "code", "message"),
    [
        ("flipped byte", ExitCode.DIGEST, "does not match its SHA512 in"),
        ("other key's sig", ExitCode.SIGNATURE, "the signature of "
         "flatcar_developer_container.bin.bz2 does not verify with key"),
        ("other key's sig", ExitCode.SIGNATURE, "/www.flatcar.org/security/image-signing-key/"
         "Flatcar_Image_Signing_Key.asc does not hold: the key file may be stale"),
        ("missing .DIGESTS", ExitCode.UNVERIFIABLE, ".DIGESTS does not exist (HTTP 404)"),
        ("404", ExitCode.DOWNLOAD, "flatcar stable has no release 3815.2.5: "),
        ("truncated", ExitCode.INCOMPLETE, "stopped at"),
        ("unpinned key", ExitCode.SIGNATURE, "is not the pinned key "
         "F88CFEDEFF29A5B4D9523864E25D9AED0593B34A"),
    ],
)
def test_bad_downloads_are_refused(cli, mirror: Mirror, flatcar_release, tmp_path: Path,
                                   damage: str, code: ExitCode, message: str) -> None:
    release_dir = mirror.root / flatcar_release.release_dir.relative_to(
        flatcar_release.server_root)
    image = release_dir / "flatcar_developer_container.bin.bz2"
    version = flatcar_release.version
    extra: list[str] = []
    if damage == "flipped byte":
        data = bytearray(image.read_bytes())
        data[len(data) // 2] ^= 0x01
        _replace(image, bytes(data))
    elif damage == "other key's sig":
        _replace(Path(f"{image}.sig"), flatcar_release.other_key_sig.read_bytes())
    elif damage == "missing .DIGESTS":
        Path(f"{image}.DIGESTS").unlink()
    elif damage == "404":
        version = flatcar_release.old_version
    elif damage == "truncated":
        mirror.cut_after["/" + str(image.relative_to(mirror.root))] = 1 << 20
    if damage == "unpinned key":
        result = cli("devcontainer", "prepare", "--mirror", mirror.url, "--release", version)
    else:
        result = _prepare(cli, mirror, flatcar_release, "--release", version, *extra)
    assert result.code == code, result.stderr
    assert "Traceback" not in result.stderr
    [error, *hints] = result.error_lines
    assert error.startswith("coreos-gpu: error: ") and message in error, error
    assert len(hints) <= 1
    _no_cache_entry_left(tmp_path / "cache",
                         image_kept=damage in ("other key's sig", "unpinned key"))


@pytest.mark.slow
def test_gpt_checks(flatcar_release) -> None:  # type: ignore[no-untyped-def]
    with bz2.open(flatcar_release.image) as f:
        head = f.read(34 * 512)
    start, size, name = find_partition(head, 9)
    assert name == "ROOT" and start % 512 == 0 and size > 100 << 20
    assert find_partition(head, 1)[2] == "EFI-SYSTEM"
    damaged = bytearray(head)
    damaged[512 + 40] ^= 0xFF
    with pytest.raises(CoreosGpuError, match="GPT header fails its CRC32"):
        find_partition(bytes(damaged), 9)
    with pytest.raises(CoreosGpuError, match="not a GPT disk image"):
        find_partition(bytes(34 * 512), 9)
    with pytest.raises(CoreosGpuError, match="partition 5 is empty"):
        find_partition(head, 5)


def _tree(root: Path, kernel: str, files: tuple[str, ...]) -> Path:
    src = root / "usr/src/linux-headers"
    src.mkdir(parents=True)
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(f'#define UTS_RELEASE "{kernel}"\n')
    modules = root / "usr/lib/modules" / kernel
    modules.mkdir(parents=True)
    (modules / "build").symlink_to("/usr/src/linux-headers")  # absolute: inside the root
    (root / "lib").symlink_to("usr/lib")  # merged /usr, as on Flatcar
    return src


def test_kernel_tree_found_inside_the_root_once(tmp_path: Path) -> None:
    src = _tree(tmp_path, "6.6.56-flatcar",
                (".config", "Module.symvers", "include/generated/utsrelease.h"))
    build_dir, tree = find_kernel_tree(tmp_path)
    assert build_dir == "/usr/lib/modules/6.6.56-flatcar/build"
    assert tree == src
    assert read_kernel_release(tree, build_dir, "6.6.56-flatcar") == "6.6.56-flatcar"
    with pytest.raises(CoreosGpuError, match=r"modules/6\.6\.57 was built as 6\.6\.56-flatcar"):
        read_kernel_release(tree, build_dir, "6.6.57")


def test_unprepared_tree_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path, "6.6.56-flatcar", (".config", "include/generated/utsrelease.h"))
    build_dir, tree = find_kernel_tree(tmp_path)
    with pytest.raises(KernelTreeNotPrepared) as info:  # the kind CoreOS's recipe can mend
        read_kernel_release(tree, build_dir, "6.6.56-flatcar")
    assert info.value.code is ExitCode.IMAGE
    assert info.value.message.endswith("is not prepared: it lacks Module.symvers")


def test_no_kernel_tree(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/modules").mkdir(parents=True)
    with pytest.raises(CoreosGpuError, match="holds no kernel build tree"):
        find_kernel_tree(tmp_path)


def test_symlinks_never_leave_the_root(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("/../../../etc")
    assert resolve_in_root(tmp_path, "/a/passwd") == tmp_path / "etc/passwd"
    assert os.path.commonpath([resolve_in_root(tmp_path, "../../x"), tmp_path]) == str(tmp_path)


@pytest.mark.slow
def test_releases_lists_the_feed(cli, mirror: Mirror, flatcar_release) -> None:  # type: ignore[no-untyped-def]
    result = cli("releases", "--os", "flatcar", "--channel", "stable", "--mirror", mirror.url,
                 "--json")
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert [r["version"] for r in shown] == [flatcar_release.update.version,
                                              flatcar_release.version,
                                              flatcar_release.old_version]
    assert shown[0]["kernel"] == flatcar_release.update.kernel_version
    assert shown[1]["kernel"] == flatcar_release.kernel_version
    text = cli("releases", "--mirror", mirror.url)
    assert f"{flatcar_release.version}  {flatcar_release.kernel_version}" in text.stdout


# The podman options this kind of machine needs (no CAP_SYS_RESOURCE, hybrid cgroups).
PODMAN_HERE = """\
podman_options = ["--storage-driver=vfs", "--cgroup-manager=cgroupfs",
                  "--events-backend=file", "--runtime=runc"]
podman_run_options = ["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["bwrap", "podman"])
def test_a_command_runs_inside_the_root(cli, mirror: Mirror, flatcar_release, tmp_path: Path,
                                        runtime: str) -> None:
    if runtime == "podman":
        (tmp_path / "coreos-gpu.toml").write_text(PODMAN_HERE)
    script = ("cat /etc/os-release; uname -s; "
              "make -s -C /usr/lib/modules/*/build kernelversion; gcc-12 -dumpversion")
    result = _prepare(cli, mirror, flatcar_release, "--release", flatcar_release.version)
    assert result.code == 0, result.stderr
    run = cli("devcontainer", "run", "--runtime", runtime, "--mirror", mirror.url,
              "--release", flatcar_release.version, "--signing-key-fingerprint",
              flatcar_release.key_fingerprint, "--", "sh", "-c", script)
    assert run.code == 0, run.stderr
    assert f"VERSION={flatcar_release.version}\n" in run.stdout
    # kbuild itself runs inside the root and names the kernel's upstream version.
    assert f"\n{flatcar_release.kernel_version}\n" in run.stdout
    assert run.stdout.rstrip().endswith("12")
    failed = cli("devcontainer", "run", "--runtime", runtime, "--mirror", mirror.url,
                 "--release", flatcar_release.version, "--signing-key-fingerprint",
                 flatcar_release.key_fingerprint, "--", "sh", "-c", "exit 7")
    assert failed.code == 7


COREOS_KERNEL = "4.19.106-coreos"
# Stand-ins for CoreOS's tools, which no server offers any more: they record their calls and
# do what the real ones leave behind (coreos-sources unpacked, modules_prepare's output).
STAND_INS = {
    "emerge-gitclone": 'echo "emerge-gitclone $*" >> /record\n'
                       "grep -c : /proc/net/dev >> /record",
    "emerge": 'echo "emerge $*" >> /record\nmkdir -p /usr/src/linux',
    "make": 'echo "make $*" >> /record\n'
            '[ "$1 $3" = "-C modules_prepare" ] && [ -f "$2/.config" ] || exit 2\n'
            'mkdir -p "$2/include/generated" && touch "$2/Module.symvers"\n'
            f'echo \'#define UTS_RELEASE "{COREOS_KERNEL}"\' > "$2/include/generated/utsrelease.h"',
}


def _coreos_root(tmp_path: Path) -> Path:
    root = make_busybox_root(tmp_path / "root")
    build = root / "usr/lib64/modules" / COREOS_KERNEL / "build"
    build.mkdir(parents=True)
    (build / ".config").write_text("CONFIG_MODULES=y\n")  # shipped, but not prepared
    for name, script in STAND_INS.items():
        (root / "usr/bin" / name).write_text(f"#!/bin/sh\n{script}\n")
        (root / "usr/bin" / name).chmod(0o755)
    return root


def _release(os_name: OsName) -> OsRelease:
    return OsRelease(os_name, Channel.STABLE, Board.AMD64_USR, "2512.3.0", None, "http://x/")


def test_coreos_tree_is_prepared_by_the_documented_recipe(tmp_path: Path) -> None:
    root = _coreos_root(tmp_path)
    log = tmp_path / "prepare.log"
    build_dir, kernel = prepare_kernel_tree(
        root, _release(OsName.COREOS), runtime=Runtime.BWRAP, engine=EngineOptions(),
        log_file=log, image_key="k")
    assert (build_dir, kernel) == ("/usr/src/linux", COREOS_KERNEL)
    record = (root / "record").read_text().splitlines()
    assert record[0] == "emerge-gitclone "
    assert int(record[1]) > 1, "emerge needs the network: more than lo must be visible"
    assert record[2:] == ["emerge -gKv coreos-sources", "make -C /usr/src/linux modules_prepare"]
    assert (root / "usr/src/linux/.config").read_text() == "CONFIG_MODULES=y\n"
    assert log.is_file()


def test_flatcar_tree_that_is_not_prepared_is_refused(tmp_path: Path) -> None:
    root = _coreos_root(tmp_path)
    with pytest.raises(CoreosGpuError) as info:
        prepare_kernel_tree(root, _release(OsName.FLATCAR), runtime=Runtime.BWRAP,
                            engine=EngineOptions(), log_file=tmp_path / "log", image_key="k")
    assert info.value.code is ExitCode.IMAGE
    assert not (root / "record").exists()


@pytest.mark.slow
def test_signing_key_from_a_file(cli, mirror: Mirror, flatcar_release) -> None:  # type: ignore[no-untyped-def]
    # Air-gapped sites hand the key over as a file; the published one is then not fetched.
    (mirror.root / "www.flatcar.org/security/image-signing-key/"
     "Flatcar_Image_Signing_Key.asc").unlink()
    result = _prepare(cli, mirror, flatcar_release, "--release", flatcar_release.version,
                      "--signing-key", str(flatcar_release.public_key))
    assert result.code == 0, result.stderr
    wrong = _prepare(cli, mirror, flatcar_release, "--release", flatcar_release.version,
                     "--signing-key", str(flatcar_release.other_public_key))
    assert wrong.code == ExitCode.SIGNATURE
