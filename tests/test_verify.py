from __future__ import annotations

import hashlib
from collections.abc import Iterator
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
from testinputs.gpg import (
    SigningKey,
    export_public_key,
    generate_signing_key,
    gnupg_home,
    sign_detached,
)

from .conftest import Mirror
from .test_fetch import Statuses, handler_with, served


@dataclass(frozen=True)
class Key:
    signing: SigningKey
    public: Path

    @property
    def fingerprint(self) -> str:
        return self.signing.fingerprint


def _sign(key: Key, path: Path, sig: Path) -> None:
    sig.unlink(missing_ok=True)
    sign_detached(key.signing, path, sig)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Key, Key]]:
    """Two keys shaped like Flatcar's (a signing subkey under a certify-only primary)."""
    base = tmp_path_factory.mktemp("gpg")
    with gnupg_home() as good_home, gnupg_home() as other_home:
        made = []
        for home, name in ((good_home, "Good"), (other_home, "Other")):
            signing = generate_signing_key(home, f"{name} <{name.lower()}@test.invalid>")
            export_public_key(signing, base / f"{name}.asc")
            made.append(Key(signing, base / f"{name}.asc"))
        yield made[0], made[1]


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


@pytest.mark.parametrize(
    ("suffix", "status", "code"),
    [
        (".DIGESTS", 404, ExitCode.UNVERIFIABLE),
        (".DIGESTS", 410, ExitCode.UNVERIFIABLE),
        (".DIGESTS", 500, ExitCode.DOWNLOAD),  # a failing server says nothing about the file
        (".sig", 404, ExitCode.UNVERIFIABLE),
        (".sig", 503, ExitCode.DOWNLOAD),
        ("", 404, ExitCode.DOWNLOAD),  # the image itself
    ],
)
def test_a_missing_proof_is_told_by_the_status(keys: tuple[Key, Key], tmp_path: Path,
                                               suffix: str, status: int,
                                               code: ExitCode) -> None:
    data = b"image" * 1000
    image, sig = tmp_path / "img.bz2", tmp_path / "img.bz2.sig"
    image.write_bytes(data)
    _sign(keys[0], image, sig)
    files = {"/img.bz2": data, "/img.bz2.DIGESTS": _digests(data, "img.bz2").encode(),
             "/img.bz2.sig": sig.read_bytes()}
    handler = handler_with(Statuses, requests=[], files=files,
                           statuses={f"/img.bz2{suffix}": status})
    with served(handler) as base:
        url = f"{base}/img.bz2"
        published = Published(url, url + ".DIGESTS", url + ".sig", str(keys[0].public),
                              keys[0].fingerprint)
        with pytest.raises(CoreosGpuError) as info:
            fetch_verified(published, tmp_path / "cache", offline=False)
    assert info.value.code is code
    if code is ExitCode.UNVERIFIABLE:
        assert info.value.message.endswith(f"does not exist (HTTP {status}): nothing to verify "
                                           "the download with")
