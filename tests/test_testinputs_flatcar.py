"""The Flatcar test release builder's own contract: formats, layout, image, signatures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from testinputs.flatcar import (
    BETA,
    BETA_CHANNEL,
    CHANNEL,
    FEED,
    IMAGE,
    KEY,
    OLD_VERSION,
    PARTITIONS,
    RELEASE_HOST,
    UPDATE,
    VERSION,
    FlatcarRelease,
    ServedRelease,
    build_flatcar_release,
    feed_path,
    render_digests,
    render_feed,
    render_release_files,
    render_version_txt,
)

REPO = Path(__file__).resolve().parent.parent
SECTOR = 512


# --- pure renderers ---------------------------------------------------------------------------


def test_digests_have_gentoo_sections(tmp_path: Path) -> None:
    file = tmp_path / IMAGE
    file.write_bytes(b"flatcar")
    lines = render_digests(file).splitlines()
    assert lines[0::2] == ["# MD5 HASH", "# SHA1 HASH", "# SHA512 HASH"]
    for line, name in zip(lines[1::2], ("md5", "sha1", "sha512"), strict=True):
        assert line == f"{hashlib.new(name, b'flatcar').hexdigest()}  {IMAGE}"


def test_version_txt_has_flatcar_keys_in_order() -> None:
    lines = render_version_txt().splitlines()
    assert [line.partition("=")[0] for line in lines] == [
        "FLATCAR_BUILD", "FLATCAR_BRANCH", "FLATCAR_PATCH", "FLATCAR_VERSION",
        "FLATCAR_VERSION_ID", "FLATCAR_BUILD_ID", "FLATCAR_SDK_VERSION"]
    assert "FLATCAR_VERSION=3975.2.2" in lines
    assert 'FLATCAR_BUILD_ID="2024-10-23-2058"' in lines
    assert lines[:3] == ["FLATCAR_BUILD=3975", "FLATCAR_BRANCH=2", "FLATCAR_PATCH=2"]
    update = render_version_txt(UPDATE).splitlines()
    assert update[:4] == ["FLATCAR_BUILD=4081", "FLATCAR_BRANCH=2", "FLATCAR_PATCH=0",
                          "FLATCAR_VERSION=4081.2.0"]


KERNELS = {VERSION: "6.1.176", UPDATE.version: "6.1.177", BETA.version: "6.1.177"}


def test_stable_feed_lists_its_releases_and_an_older_one_newest_first() -> None:
    feed = json.loads(render_feed(KERNELS))
    assert list(feed) == ["current", UPDATE.version, VERSION, OLD_VERSION]
    assert feed["current"] == feed[UPDATE.version]  # Flatcar's "current" is the newest
    assert feed[VERSION]["major_software"]["kernel"] == ["6.1.176"]
    assert feed[UPDATE.version]["major_software"]["kernel"] == ["6.1.177"]
    assert feed[OLD_VERSION]["major_software"]["kernel"] != ["6.1.176"]
    for entry in feed.values():
        assert entry["channel"] == CHANNEL
        assert set(entry["major_software"]) == {"kernel", "docker", "systemd", "ignition"}
        assert entry["release_date"] and entry["release_notes"]


def test_beta_feed_lists_only_the_beta_release() -> None:
    feed = json.loads(render_feed(KERNELS, BETA_CHANNEL))
    assert list(feed) == ["current", BETA.version]
    assert feed["current"] == feed[BETA.version]
    assert feed[BETA.version]["channel"] == "beta"
    # Flatcar numbers a major's betas <major>.1.<patch>, its stable releases <major>.2.<patch>:
    # 4081.2.0 was promoted from 4081.1.0, a few weeks earlier, and kept its kernel.
    assert (BETA.version, UPDATE.version) == ("4081.1.0", "4081.2.0")
    assert BETA.kernel_flavour == UPDATE.kernel_flavour
    assert feed[BETA.version]["release_date"] < json.loads(render_feed(KERNELS))[
        UPDATE.version]["release_date"]


def test_release_files_name_flatcar() -> None:
    files = render_release_files()
    assert f"FLATCAR_RELEASE_VERSION={VERSION}" in files["usr/share/flatcar/release"].split()
    assert "ID=flatcar" in files["usr/lib/os-release"].splitlines()
    assert f"VERSION_ID={VERSION}" in files["usr/lib/os-release"].splitlines()
    update = render_release_files(UPDATE)
    assert "VERSION_ID=4081.2.0" in update["usr/lib/os-release"].splitlines()
    assert "FLATCAR_RELEASE_VERSION=4081.2.0" in update["usr/share/flatcar/release"].split()


def test_partition_layout_is_flatcars() -> None:
    assert [(n, label) for n, label, *_ in PARTITIONS] == [
        (1, "EFI-SYSTEM"), (2, "BIOS-BOOT"), (3, "USR-A"), (4, "USR-B"), (6, "OEM"),
        (7, "OEM-CONFIG"), (9, "ROOT")]


# --- the built release (cached; built on first use, which needs root) -------------------------


@pytest.fixture(scope="module")
def release() -> FlatcarRelease:
    if os.geteuid() != 0:
        pytest.skip("building the Flatcar test release needs root (debootstrap, chroot)")
    return build_flatcar_release()


def decompress(image: Path, raw: Path) -> Path:
    """A few seconds; lbzip2 decompresses on every core."""
    tool = "lbzip2" if shutil.which("lbzip2") else "bzip2"
    with raw.open("wb") as out:
        subprocess.run([tool, "-dc", image], stdout=out, check=True)
    return raw


@pytest.fixture(scope="module")
def disk(release: FlatcarRelease, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first release's decompressed disk image."""
    return decompress(release.image, tmp_path_factory.mktemp("flatcar") / "disk.bin")


@pytest.fixture(params=["first", "update", "beta"])
def served(request: pytest.FixtureRequest, release: FlatcarRelease) -> ServedRelease:
    """Each release on the server, the first one seen through the same fields as the others."""
    if request.param != "first":
        return getattr(release, request.param)  # type: ignore[no-any-return]
    return ServedRelease(release.release_dir, release.version, release.channel,
                         release.kernel_release, release.kernel_version, release.image_sha512)


def read_gpt(disk: Path) -> dict[int, tuple[str, int]]:
    """{partition number: (name, first byte)} from the primary GPT."""
    with disk.open("rb") as f:
        f.seek(SECTOR)
        header = f.read(92)
        assert header[:8] == b"EFI PART"
        entries_lba, count, size = struct.unpack_from("<QII", header, 72)
        f.seek(entries_lba * SECTOR)
        table = f.read(count * size)
    partitions = {}
    for index in range(count):
        entry = table[index * size:(index + 1) * size]
        if entry[:16] != bytes(16):  # an all-zero type GUID marks an unused entry
            name = entry[56:128].decode("utf-16-le").rstrip("\0")
            partitions[index + 1] = (name, struct.unpack_from("<Q", entry, 32)[0] * SECTOR)
    return partitions


def debugfs(disk: Path, offset: int, request: str) -> str:
    # e2fsprogs opens a file system inside a larger file with `FILE?offset=BYTES`.
    done = subprocess.run(["debugfs", "-R", request, f"{disk}?offset={offset}"],
                          capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.slow
def test_partition_9_is_an_ext4_root_of_the_release(disk: Path, release: FlatcarRelease) -> None:
    partitions = read_gpt(disk)
    assert {n: name for n, (name, _) in partitions.items()} == {
        n: label for n, label, *_ in PARTITIONS}
    offset = partitions[9][1]
    with disk.open("rb") as f:
        f.seek(offset + 1024 + 0x38)
        assert f.read(2) == b"\x53\xef"  # the ext2/3/4 superblock magic
    text = debugfs(disk, offset, "cat /usr/share/flatcar/release")
    assert f"FLATCAR_RELEASE_VERSION={release.version}" in text.splitlines()
    build = f"/usr/lib/modules/{release.kernel_release}/build"
    uts = debugfs(disk, offset, f"cat {build}/include/generated/utsrelease.h")
    assert f'"{release.kernel_release}"' in uts
    # A relative link: it resolves inside the root, also when read from outside it.
    assert "../../../src/linux-headers-" in debugfs(disk, offset, f"stat {build}")


@pytest.mark.slow
def test_the_update_image_holds_the_cloud_kernel_tree(release: FlatcarRelease,
                                                      tmp_path: Path) -> None:
    update = release.update
    assert (update.version, update.kernel_release) == ("4081.2.0", "6.1.0-50-cloud-amd64")
    assert update.kernel_release != release.kernel_release
    assert update.kernel_version == release.kernel_version  # the same Debian packages
    disk = decompress(update.image, tmp_path / "disk.bin")
    partitions = read_gpt(disk)
    assert [name for name, _ in partitions.values()] == [label for _, label, *_ in PARTITIONS]
    offset = partitions[9][1]
    text = debugfs(disk, offset, "cat /usr/lib/os-release")
    assert f"VERSION_ID={update.version}" in text.splitlines()
    uts = debugfs(disk, offset,
                  f"cat /usr/lib/modules/{update.kernel_release}/build/include/generated/"
                  "utsrelease.h")
    assert f'UTS_RELEASE "{update.kernel_release}"' in uts
    # Only the cloud flavour's tree: a copy of the first root with its headers swapped.
    # `ls -p` lines: /INODE/MODE/UID/GID/NAME/SIZE/
    listing = debugfs(disk, offset, "ls -p /usr/lib/modules").splitlines()
    names = {line.split("/")[5] for line in listing if line.startswith("/")}
    assert names - {".", ".."} == {update.kernel_release}


@pytest.mark.slow
def test_digests_match_the_image(served: ServedRelease) -> None:
    with served.image.open("rb") as f:
        sha512 = hashlib.file_digest(f, "sha512").hexdigest()
    digests = (served.release_dir / f"{IMAGE}.DIGESTS").read_text()
    assert f"{sha512}  {IMAGE}" in digests.splitlines()
    assert served.image_sha512 == sha512


def gpg_verify(tmp_path: Path, key: Path, sig: Path, file: Path) -> tuple[int, list[list[str]]]:
    """(exit code, VALIDSIG fields) of verifying sig against key alone.

    gpgv with a dearmored keyring: unlike gpg --import, it starts no gpg-agent.
    """
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, parents=True)
    keyring = home / "key.gpg"
    subprocess.run(["gpg", "--homedir", home, "--batch", "--dearmor", "--output", keyring, key],
                   capture_output=True, check=True)
    done = subprocess.run(["gpgv", "--homedir", home, "--keyring", keyring, "--status-fd", "1",
                           sig, file], capture_output=True, text=True, check=False)
    prefix = "[GNUPG:] VALIDSIG "
    return done.returncode, [line[len(prefix):].split() for line in done.stdout.splitlines()
                             if line.startswith(prefix)]


@pytest.mark.slow
def test_sig_is_made_by_a_subkey_of_the_pinned_primary(
    release: FlatcarRelease, served: ServedRelease, tmp_path: Path
) -> None:
    code, valid = gpg_verify(tmp_path, release.public_key,
                             served.release_dir / f"{IMAGE}.sig", served.image)
    assert code == 0 and len(valid) == 1
    # VALIDSIG: the signing key's fingerprint first, the primary key's last.
    assert valid[0][0] == release.subkey_fingerprint != release.key_fingerprint
    assert valid[0][-1] == release.key_fingerprint


@pytest.mark.slow
def test_other_keys_sig_does_not_verify_against_the_key(
    release: FlatcarRelease, tmp_path: Path
) -> None:
    code, valid = gpg_verify(tmp_path / "a", release.public_key, release.other_key_sig,
                             release.image)
    assert code != 0 and valid == []
    code, valid = gpg_verify(tmp_path / "b", release.other_public_key, release.other_key_sig,
                             release.image)
    assert code == 0 and valid[0][-1] == release.other_key_fingerprint != release.key_fingerprint
    assert not release.other_key_sig.is_relative_to(release.server_root)


@pytest.mark.slow
def test_server_root_has_the_mirror_layout(release: FlatcarRelease) -> None:
    board = release.server_root / RELEASE_HOST / release.board
    names = {IMAGE, f"{IMAGE}.DIGESTS", f"{IMAGE}.sig", "version.txt"}
    assert {p.name for p in board.iterdir()} == {release.version, release.update.version,
                                                 "current"}
    for version in (release.version, release.update.version):
        assert {p.name for p in (board / version).iterdir()} == names
        assert f"FLATCAR_VERSION={version}" in (board / version / "version.txt").read_text()
    assert release.update.release_dir == board / release.update.version
    assert {p.name for p in (board / "current").iterdir()} == names
    assert "FLATCAR_VERSION=4081.2.0" in (board / "current/version.txt").read_text().split()
    assert not (board / release.old_version).exists()
    assert release.public_key == release.server_root / KEY
    assert release.public_key.read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    feed = json.loads((release.server_root / FEED).read_text())
    assert feed["current"] == feed[release.update.version]
    for version in (release.version, release.update.version):
        assert feed[version]["major_software"]["kernel"] == [release.kernel_version]
    assert release.old_version in feed
    assert BETA.version not in feed


@pytest.mark.slow
def test_the_beta_release_is_served_from_the_beta_server(release: FlatcarRelease) -> None:
    board = release.server_root / "beta.release.flatcar-linux.net" / release.board
    assert {p.name for p in board.iterdir()} == {release.beta.version, "current"}
    assert release.beta.release_dir == board / release.beta.version
    assert (board / "current").resolve() == release.beta.release_dir
    assert release.beta.channel == "beta"
    feed = json.loads((release.server_root / feed_path("beta")).read_text())
    assert list(feed) == ["current", release.beta.version]
    assert feed[release.beta.version]["major_software"]["kernel"] == [release.kernel_version]


@pytest.mark.slow
def test_beta_and_update_hold_the_same_kernel_tree_in_different_images(
        release: FlatcarRelease, tmp_path: Path) -> None:
    """What sync's module cache relies on: the same tree, byte for byte, where it matters."""
    beta, update = release.beta, release.update
    assert beta.kernel_release == update.kernel_release
    assert beta.image_sha512 != update.image_sha512
    read = {}
    for name, served in (("beta", beta), ("update", update)):
        disk = decompress(served.image, tmp_path / f"{name}.bin")
        offset = read_gpt(disk)[9][1]
        build = f"/usr/lib/modules/{served.kernel_release}/build"
        read[name] = [debugfs(disk, offset, f"cat {build}/{f}") for f in (
            ".config", "Module.symvers")]
        assert f"VERSION_ID={served.version}" in debugfs(
            disk, offset, "cat /usr/lib/os-release").splitlines()
        disk.unlink()
    assert read["beta"] == read["update"]
    assert all(len(text) > 1000 for text in read["beta"])


@pytest.mark.slow
def test_cli_prints_server_root(release: FlatcarRelease) -> None:
    done = subprocess.run([sys.executable, "-m", "testinputs", "flatcar-release"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(release.server_root)
