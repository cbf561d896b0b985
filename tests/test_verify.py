from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.fetch import cached
from coreos_gpu.verify import (
    Published,
    fetch_verified,
    parse_digests,
    verify_digest,
    verify_signature,
)

from .conftest import Mirror


@dataclass(frozen=True)
class Key:
    home: Path
    fingerprint: str  # primary
    public: Path


def _make_key(home: Path, name: str) -> Key:
    """A certify-only primary key with a signing subkey: the shape Flatcar's key has."""
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--pinentry-mode",
           "loopback"]
    subprocess.run([*gpg, "--quick-gen-key", f"{name} <{name}@test.invalid>", "ed25519",
                    "cert", "never"], check=True, capture_output=True)
    listing = subprocess.run([*gpg, "--with-colons", "--list-keys"], check=True,
                             capture_output=True, text=True).stdout
    fingerprint = next(line.split(":")[9] for line in listing.splitlines()
                       if line.startswith("fpr:"))
    subprocess.run([*gpg, "--quick-add-key", fingerprint, "ed25519", "sign", "never"],
                   check=True, capture_output=True)
    public = home / "public.asc"
    subprocess.run([*gpg, "--armor", "--export", "--output", str(public), fingerprint],
                   check=True, capture_output=True)
    return Key(home, fingerprint, public)


def _sign(key: Key, path: Path, sig: Path) -> None:
    subprocess.run(["gpg", "--homedir", str(key.home), "--batch", "--yes", "--detach-sign",
                    "--output", str(sig), str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Key, Key]:
    base = tmp_path_factory.mktemp("gpg")
    return _make_key(base / "good", "Good"), _make_key(base / "other", "Other")


def _digests(data: bytes, name: str) -> str:
    return (f"# MD5 HASH\n{hashlib.md5(data).hexdigest()}  {name}\n"
            f"# SHA1 HASH\n{hashlib.sha1(data).hexdigest()}  {name}\n"
            f"# SHA512 HASH\n{hashlib.sha512(data).hexdigest()}  {name}\n")


def test_parse_digests() -> None:
    sections = parse_digests(_digests(b"x", "image.bin.bz2") + "# SHA512 HASH\nabc  other\n")
    assert sections["SHA512"] == {"image.bin.bz2": hashlib.sha512(b"x").hexdigest(),
                                  "other": "abc"}
    assert set(sections) == {"MD5", "SHA1", "SHA512"}


def test_digest_mismatch_and_missing_line(tmp_path: Path) -> None:
    image, digests = tmp_path / "image", tmp_path / "image.DIGESTS"
    image.write_bytes(b"good")
    digests.write_text(_digests(b"good", "image.bin.bz2"))
    verify_digest(image, digests, "image.bin.bz2", "D")
    image.write_bytes(b"evil")
    with pytest.raises(CoreosGpuError) as info:
        verify_digest(image, digests, "image.bin.bz2", "D")
    assert info.value.code is ExitCode.DIGEST
    with pytest.raises(CoreosGpuError) as info:
        verify_digest(image, digests, "other.bin.bz2", "D")
    assert info.value.code is ExitCode.UNVERIFIABLE


def test_signature_by_subkey_is_checked_against_the_primary(keys: tuple[Key, Key],
                                                            tmp_path: Path) -> None:
    good, other = keys
    path, sig = tmp_path / "f", tmp_path / "f.sig"
    path.write_bytes(b"payload")
    _sign(good, path, sig)
    verify_signature(path, sig, good.public, good.fingerprint, "f")
    # The key file must hold the pinned primary key...
    with pytest.raises(CoreosGpuError) as info:
        verify_signature(path, sig, other.public, good.fingerprint, "f")
    assert info.value.code is ExitCode.SIGNATURE
    assert "is not the pinned key" in info.value.message
    # ...and the signature must be by it, over exactly these bytes.
    _sign(other, path, sig)
    with pytest.raises(CoreosGpuError) as info:
        verify_signature(path, sig, good.public, good.fingerprint, "f")
    assert info.value.code is ExitCode.SIGNATURE
    _sign(good, path, sig)
    path.write_bytes(b"payloaD")
    with pytest.raises(CoreosGpuError) as info:
        verify_signature(path, sig, good.public, good.fingerprint, "f")
    assert info.value.code is ExitCode.SIGNATURE


def _publish(mirror: Mirror, key: Key, data: bytes) -> Published:
    (mirror.root / "img.bz2").write_bytes(data)
    (mirror.root / "img.bz2.DIGESTS").write_text(_digests(data, "img.bz2"))
    _sign(key, mirror.root / "img.bz2", mirror.root / "img.bz2.sig")
    url = f"{mirror.url}/img.bz2"
    return Published(url, url + ".DIGESTS", url + ".sig", str(key.public), key.fingerprint)


def test_fetch_verified(http_dir: Mirror, keys: tuple[Key, Key], tmp_path: Path) -> None:
    published = _publish(http_dir, keys[0], b"image" * 1000)
    path = fetch_verified(published, tmp_path, offline=False)
    assert path.read_bytes() == b"image" * 1000
    assert fetch_verified(published, tmp_path, offline=True) == path


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("flip", ExitCode.DIGEST),
        ("other_sig", ExitCode.SIGNATURE),
        ("no_digests", ExitCode.UNVERIFIABLE),
        ("no_sig", ExitCode.UNVERIFIABLE),
        ("no_image", ExitCode.DOWNLOAD),
    ],
)
def test_fetch_verified_refuses(http_dir: Mirror, keys: tuple[Key, Key], tmp_path: Path,
                                damage: str, code: ExitCode) -> None:
    good, other = keys
    published = _publish(http_dir, good, b"image" * 1000)
    image = http_dir.root / "img.bz2"
    if damage == "flip":
        image.write_bytes(b"imagE" + image.read_bytes()[5:])
    elif damage == "other_sig":
        _sign(other, image, http_dir.root / "img.bz2.sig")
    elif damage == "no_digests":
        (http_dir.root / "img.bz2.DIGESTS").unlink()
    elif damage == "no_sig":
        (http_dir.root / "img.bz2.sig").unlink()
    else:
        image.unlink()
    with pytest.raises(CoreosGpuError) as info:
        fetch_verified(published, tmp_path, offline=False)
    assert info.value.code is code
    assert cached(published.url, tmp_path) is None
    blobs = tmp_path / "downloads" / "sha256"
    assert not [p for p in blobs.iterdir() if p.read_bytes().startswith(b"imag")]
