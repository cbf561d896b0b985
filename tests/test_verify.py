from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreos_gpu.errors import CoreosGpuError, ExitCode, SignatureError
from coreos_gpu.fetch import cached
from coreos_gpu.verify import (
    Published,
    fetch_verified,
    parse_digests,
    signature_problem,
    verify_digest,
    verify_signature,
)
from testinputs.gpg import (
    SigningKey,
    export_public_key,
    generate_signing_key,
    gnupg_home,
    gpg,
    read_fingerprints,
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
    with pytest.raises(SignatureError) as signed:
        verify_signature(path, sig, good.public, good.fingerprint, "f")
    assert signed.value.code is ExitCode.SIGNATURE and not signed.value.file_changed
    assert signed.value.message == (
        f"the signature of f does not verify with key {good.fingerprint}: it was made by "
        f"subkey {other.signing.subkey_fingerprint}, which key file {good.public} does "
        "not hold: the key file may be stale, or the file was signed by another key")
    _sign(good, path, sig)
    path.write_bytes(b"payloaD")
    with pytest.raises(SignatureError) as signed:
        verify_signature(path, sig, good.public, good.fingerprint, "f")
    assert signed.value.code is ExitCode.SIGNATURE and signed.value.file_changed
    assert (f"subkey {good.signing.subkey_fingerprint[-16:]} of key {good.fingerprint} signed "
            "other bytes") in signed.value.message


def _publish(mirror: Mirror, key: Key, data: bytes, name: str = "img.bz2",
             key_url: str = "") -> Published:
    (mirror.root / name).write_bytes(data)
    (mirror.root / f"{name}.DIGESTS").write_text(_digests(data, name))
    _sign(key, mirror.root / name, mirror.root / f"{name}.sig")
    url = f"{mirror.url}/{name}"
    return Published(url, url + ".DIGESTS", url + ".sig", key_url or str(key.public),
                     key.fingerprint)


def test_fetch_verified(http_dir: Mirror, keys: tuple[Key, Key], tmp_path: Path) -> None:
    published = _publish(http_dir, keys[0], b"image" * 1000)
    path = fetch_verified(published, tmp_path, offline=False)
    assert path.read_bytes() == b"image" * 1000
    assert fetch_verified(published, tmp_path, offline=True) == path


@pytest.mark.parametrize(
    ("damage", "code", "kept"),
    [
        ("flip", ExitCode.DIGEST, False),
        ("flip with its DIGESTS", ExitCode.SIGNATURE, False),  # the key signed other bytes
        # The image matches its SHA512; the signature is another key's: keep the image.
        ("other_sig", ExitCode.SIGNATURE, True),
        ("no_digests", ExitCode.UNVERIFIABLE, False),
        ("no_sig", ExitCode.UNVERIFIABLE, False),
        ("no_image", ExitCode.DOWNLOAD, False),
    ],
)
def test_fetch_verified_refuses(http_dir: Mirror, keys: tuple[Key, Key], tmp_path: Path,
                                damage: str, code: ExitCode, kept: bool) -> None:
    good, other = keys
    published = _publish(http_dir, good, b"image" * 1000)
    image = http_dir.root / "img.bz2"
    if damage.startswith("flip"):
        image.write_bytes(b"imagE" + image.read_bytes()[5:])
        if damage == "flip with its DIGESTS":
            (http_dir.root / "img.bz2.DIGESTS").write_text(_digests(image.read_bytes(),
                                                                    "img.bz2"))
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
    assert (cached(published.url, tmp_path) is not None) is kept
    blobs = tmp_path / "downloads" / "sha256"
    assert len([p for p in blobs.iterdir() if p.read_bytes().startswith(b"imag")]) == kept
    assert not list(blobs.glob("*.verified"))
    if code in (ExitCode.DIGEST, ExitCode.SIGNATURE):  # the small proofs come afresh next run
        assert cached(published.digests_url, tmp_path) is None
    if kept:  # and a kept image is still refused until a check passes
        with pytest.raises(CoreosGpuError) as info:
            fetch_verified(published, tmp_path, offline=False)
        assert info.value.code is code


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


# --- signing keys that change: Flatcar adds signing subkeys to its key file over time --------


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Key, Key]]:
    """One primary key before and after a new signing subkey was added: (the key file with
    only the old subkey, signing with it; the key file with both, signing with the new)."""
    base = tmp_path_factory.mktemp("rotating")
    with gnupg_home() as home:
        before = generate_signing_key(home, "Rotating <rotating@test.invalid>")
        export_public_key(before, base / "before.asc")
        gpg(home, "--quick-add-key", before.fingerprint, "ed25519", "sign", "never",
              what="adding a second signing subkey")
        _, subkeys = read_fingerprints(home)
        after = SigningKey(home, before.fingerprint,
                           next(s for s in subkeys if s != before.subkey_fingerprint))
        export_public_key(after, base / "after.asc")
        yield Key(before, base / "before.asc"), Key(after, base / "after.asc")


def test_the_key_is_fetched_again_for_a_new_subkey(http_dir: Mirror,
                                                   rotating: tuple[Key, Key],
                                                   tmp_path: Path) -> None:
    before, after = rotating
    key_url = f"{http_dir.url}/key.asc"
    shutil.copy(before.public, http_dir.root / "key.asc")
    first = _publish(http_dir, before, b"first" * 1000, "first.bz2", key_url)
    fetch_verified(first, tmp_path, offline=False)
    # The next release is signed by a new subkey, which only the key file published now holds.
    shutil.copy(after.public, http_dir.root / "key.asc")
    second = _publish(http_dir, after, b"second" * 1000, "second.bz2", key_url)
    assert fetch_verified(second, tmp_path, offline=False).read_bytes() == b"second" * 1000


def test_a_stale_key_is_named_and_the_image_kept(http_dir: Mirror, rotating: tuple[Key, Key],
                                                 tmp_path: Path) -> None:
    before, after = rotating
    published = _publish(http_dir, after, b"image" * 1000)
    stale = dataclasses.replace(published, key=str(before.public))  # a signing_key file
    with pytest.raises(SignatureError) as info:
        fetch_verified(stale, tmp_path, offline=False)
    assert info.value.message == (
        f"the signature of img.bz2 does not verify with key {after.fingerprint}: it was made "
        f"by subkey {after.signing.subkey_fingerprint}, which key file {before.public} does "
        "not hold: the key file may be stale, or the file was signed by another key")
    assert cached(published.url, tmp_path) is not None  # it matched its SHA512: no fault of it
    (http_dir.root / "img.bz2").unlink()  # so a current key verifies it without downloading
    path = fetch_verified(published, tmp_path, offline=False)
    assert path.read_bytes() == b"image" * 1000


def test_the_key_fetched_before_serves_when_it_cannot_be_fetched(
        http_dir: Mirror, keys: tuple[Key, Key], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(keys[0].public, http_dir.root / "key.asc")
    published = _publish(http_dir, keys[0], b"image" * 1000,
                         key_url=f"{http_dir.url}/key.asc")
    path = fetch_verified(published, tmp_path, offline=False)
    (http_dir.root / "key.asc").unlink()
    assert fetch_verified(published, tmp_path, offline=False) == path
    assert "note: using the signing key fetched before: download of " in capsys.readouterr().err


PINNED = "F88CFEDEFF29A5B4D9523864E25D9AED0593B34A"
SUBKEY = "2C645433218F6940C981A7443E2D5D62D151338E"


@pytest.mark.parametrize(
    ("status", "reason", "file_changed"),
    [
        (f"[GNUPG:] GOODSIG {SUBKEY[-16:]} F\n[GNUPG:] VALIDSIG {SUBKEY} 2024-01-01 1 0 4 0 22 8 "
         f"00 {PINNED}", None, False),
        (f"[GNUPG:] ERRSIG {SUBKEY[-16:]} 22 8 00 1 9 {SUBKEY}\n[GNUPG:] NO_PUBKEY "
         f"{SUBKEY[-16:]}", f"it was made by subkey {SUBKEY}, which K does not hold: the key "
         "file may be stale, or the file was signed by another key", False),
        (f"[GNUPG:] ERRSIG {SUBKEY[-16:]} 22 8 00 1 9 -",  # no issuer fingerprint: the key id
         f"it was made by subkey {SUBKEY[-16:]}, which K does not hold", False),
        (f"[GNUPG:] ERRSIG {SUBKEY[-16:]} 99 8 00 1 4 {SUBKEY}",
         f"gpg cannot check the signature by subkey {SUBKEY} (gpg error 4)", False),
        (f"[GNUPG:] BADSIG {SUBKEY[-16:]} F", f"subkey {SUBKEY[-16:]} of key {PINNED} signed "
         "other bytes", True),
        ("[GNUPG:] NODATA 1\n[GNUPG:] NODATA 2",
         "the signature file holds no signature gpg can read", False),
        (f"[GNUPG:] VALIDSIG {SUBKEY} 2024-01-01 1 0 4 0 22 8 00 {SUBKEY}",
         f"it was made by key {SUBKEY} (subkey {SUBKEY})", False),
    ],
    ids=["good", "no subkey", "no subkey, old signature", "unsupported", "bad", "no signature",
         "other primary"],
)
def test_signature_problems_name_key_and_subkey(status: str, reason: str | None,
                                                file_changed: bool) -> None:
    problem = signature_problem(status, PINNED, "K")
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.reason.startswith(reason)
        assert problem.file_changed is file_changed


@pytest.mark.parametrize(("missing", "code"), [(".DIGESTS", ExitCode.UNVERIFIABLE),
                                               (".sig", ExitCode.UNVERIFIABLE),
                                               ("", ExitCode.DOWNLOAD)])
def test_a_file_mirror_without_a_proof(keys: tuple[Key, Key], tmp_path: Path, missing: str,
                                       code: ExitCode) -> None:
    data = b"image" * 1000
    image = tmp_path / "img.bz2"
    image.write_bytes(data)
    Path(f"{image}.DIGESTS").write_text(_digests(data, "img.bz2"))
    _sign(keys[0], image, Path(f"{image}.sig"))
    url = image.as_uri()
    Path(f"{image}{missing}").unlink()
    published = Published(url, url + ".DIGESTS", url + ".sig", str(keys[0].public),
                          keys[0].fingerprint)
    with pytest.raises(CoreosGpuError) as info:
        fetch_verified(published, tmp_path / "cache", offline=False)
    assert info.value.code is code
    if missing:
        assert info.value.message.endswith(f"img.bz2{missing} does not exist: nothing to "
                                           "verify the download with")
