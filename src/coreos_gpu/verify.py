"""Verification of downloads: Gentoo-style `.DIGESTS` (SHA512) and detached GPG signatures.

A download is checked right after it arrives, before anything extracts or runs it, and used
only once a check passed. One whose bytes are shown wrong (SHA512 mismatch, or signed other
bytes) is deleted, so a later run downloads it again; the small .DIGESTS and .sig of any
failed check are always fetched again.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from coreos_gpu import ui
from coreos_gpu.cache import sha256_of, write_atomically
from coreos_gpu.errors import CoreosGpuError, DownloadError, ExitCode, SignatureError
from coreos_gpu.fetch import cached, fetch_file, forget
from coreos_gpu.run import check_tools, run

_SECTION = re.compile(r"#\s*(\w+)\s+HASH\s*$")
_LINE = re.compile(r"([0-9a-fA-F]+)\s+\*?(\S+)\s*$")


def parse_digests(text: str) -> dict[str, dict[str, str]]:
    """`# SHA512 HASH` sections of `<hex>  <file>` lines → {"SHA512": {file: hex}}."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if header := _SECTION.match(line.strip()):
            current = sections.setdefault(header.group(1).upper(), {})
        elif current is not None and (entry := _LINE.match(line.strip())):
            current[Path(entry.group(2)).name] = entry.group(1).lower()
    return sections


def verify_digest(path: Path, digests: Path, name: str, source: str) -> None:
    expected = parse_digests(digests.read_text(errors="replace")).get("SHA512", {}).get(name)
    if expected is None:
        raise CoreosGpuError(f"{source} has no SHA512 line for {name}: cannot verify it",
                             code=ExitCode.UNVERIFIABLE)
    with path.open("rb") as f:
        actual = hashlib.file_digest(f, "sha512").hexdigest()
    if actual != expected:
        raise CoreosGpuError(
            f"{name} does not match its SHA512 in {source} (got {actual[:16]}…, "
            f"expected {expected[:16]}…): the download is corrupt or was tampered with",
            code=ExitCode.DIGEST)


def _status(lines: str, keyword: str) -> list[list[str]]:
    prefix = f"[GNUPG:] {keyword} "
    return [line[len(prefix):].split() for line in lines.splitlines() if line.startswith(prefix)]


def _issuer(errsig: list[str]) -> str:
    """ERRSIG's signer: the subkey's fingerprint where the signature carries it (its last
    field, "-" in old signatures), its long key id otherwise."""
    return errsig[6] if len(errsig) > 6 and errsig[6] != "-" else errsig[0]


class SignatureProblem(NamedTuple):
    reason: str
    file_changed: bool  # the pinned key signed other bytes (not: it cannot check them)


def signature_problem(status: str, pinned: str, key_file: str) -> SignatureProblem | None:
    """Why `gpg --verify`'s status lines do not show a good signature by the pinned primary
    key (through any of its subkeys), naming the key and subkey involved; None if they do."""
    errors, bad = _status(status, "ERRSIG"), _status(status, "BADSIG")
    valid = _status(status, "VALIDSIG")
    if errors:
        issuer, code = _issuer(errors[0]), errors[0][5] if len(errors[0]) > 5 else "?"
        if code == "9":  # no public key: Flatcar signs with new subkeys as it rotates them
            return SignatureProblem(
                f"it was made by subkey {issuer}, which {key_file} does not hold: the key "
                "file may be stale, or the file was signed by another key", file_changed=False)
        return SignatureProblem(f"gpg cannot check the signature by subkey {issuer} (gpg "
                                f"error {code})", file_changed=False)
    if bad:
        return SignatureProblem(f"subkey {bad[0][0]} of key {pinned} signed other bytes: the "
                                "file was changed after signing, or the signature is damaged",
                                file_changed=True)
    if not valid:
        return SignatureProblem("the signature file holds no signature gpg can read",
                                file_changed=False)
    if others := [fields for fields in valid if fields[-1] != pinned]:
        # VALIDSIG's last field is the signer's primary key, whichever subkey signed.
        return SignatureProblem(f"it was made by key {others[0][-1]} (subkey {others[0][0]})",
                                file_changed=False)
    return None


def verify_signature(path: Path, sig: Path, key: Path, fingerprint: str, name: str, *,
                     key_source: str = "") -> None:
    """Check a detached signature against a key file whose primary key must be `fingerprint`.
    key_source names the key file in errors (its URL: a cached copy's name is a hash)."""
    shown = key_source or str(key)
    check_tools("gpg", why="verifying signatures")
    pinned = fingerprint.replace(" ", "").upper()
    with tempfile.TemporaryDirectory(prefix="coreos-gpu-gpg-") as home:
        # No agent: only public keys are handled, and an agent would outlive the home.
        gpg = ["gpg", "--homedir", home, "--batch", "--no-tty", "--no-autostart",
               "--status-fd", "1"]
        imported = run([*gpg, "--import", key], check=False, what="importing the signing key")
        primaries = [fields[1] for fields in _status(imported.stdout, "IMPORT_OK")]
        if pinned not in primaries:
            found = ", ".join(primaries) or "no usable key"
            raise SignatureError(
                f"signing key {shown} is not the pinned key {pinned} (it holds {found})",
                hint="check signing_key, or set signing_key_fingerprint if you really use "
                "another key", file_changed=False)
        checked = run([*gpg, "--verify", sig, path], check=False, what="verifying a signature")
    problem = signature_problem(checked.stdout, pinned, f"key file {shown}")
    if problem is not None:
        raise SignatureError(
            f"the signature of {name} does not verify with key {pinned}: {problem.reason}",
            hint="the signing key is fetched again on every run unless --offline; a "
            "signing_key given as a file must be a current copy",
            file_changed=problem.file_changed)


@dataclass(frozen=True)
class Published:
    """A published file and what vouches for it."""

    url: str
    digests_url: str
    sig_url: str
    key: str  # URL or path of the armored signing key
    fingerprint: str  # of the key's primary key


def _fetch_proof(url: str, what: str, cache_dir: Path, offline: bool) -> Path:
    try:
        return fetch_file(url, cache_dir, offline=offline)
    except DownloadError as e:
        if not e.not_found:
            raise
        status = f" (HTTP {e.status})" if e.status else ""
        raise CoreosGpuError(f"{what} {url} does not exist{status}: nothing to verify the "
                             "download with", code=ExitCode.UNVERIFIABLE) from e


def _fetch_key(key: str, cache_dir: Path, *, offline: bool) -> Path:
    """The signing key file, fetched again on every run unless offline: it is small, and it
    gains new signing subkeys as Flatcar rotates them. Where it cannot be fetched, the copy
    fetched before still serves, and a stale one is named if a signature then fails."""
    try:
        return fetch_file(key, cache_dir, offline=offline, fresh=True)
    except DownloadError as e:
        held = cached(key, cache_dir)
        if held is None:
            raise
        ui.log(f"    note: using the signing key fetched before: {e.message}")
        return held


def fetch_verified(published: Published, cache_dir: Path, *, offline: bool) -> Path:
    """Download a file with its .DIGESTS and .sig and verify both; return the cached file."""
    digests = _fetch_proof(published.digests_url, "checksum file", cache_dir, offline)
    sig = _fetch_proof(published.sig_url, "signature", cache_dir, offline)
    key = _fetch_key(published.key, cache_dir, offline=offline)
    path = fetch_file(published.url, cache_dir, offline=offline)
    # Verification is remembered per exact content of file, digests, signature and key.
    proof = json.dumps([sha256_of(p) for p in (digests, sig, key)] + [published.fingerprint])
    marker = path.with_name(path.name + ".verified")
    if marker.is_file() and marker.read_text() == proof:
        return path
    marker.unlink(missing_ok=True)
    name = Path(published.url.rsplit("/", 1)[-1]).name
    with ui.step(f"verifying {name}"):
        _verify_digest_or_forget(published, path, digests, name, cache_dir)
        try:
            verify_signature(path, sig, key, published.fingerprint, name,
                             key_source=published.key)
        except SignatureError as e:
            _forget_after_signature(published, cache_dir, file_changed=e.file_changed)
            raise
    write_atomically(marker, proof.encode())
    return path


def _verify_digest_or_forget(published: Published, path: Path, digests: Path, name: str,
                             cache_dir: Path) -> None:
    try:
        verify_digest(path, digests, name, published.digests_url)
    except CoreosGpuError as e:
        forget(published.digests_url, cache_dir)  # it may be the damaged one
        if e.code is ExitCode.DIGEST:  # the file is not what was published: download again
            forget(published.url, cache_dir)
        raise


def _forget_after_signature(published: Published, cache_dir: Path, *,
                            file_changed: bool) -> None:
    """Drop what a failed signature check blames.

    The file matches its published SHA512 here. Unless the pinned key says it signed other
    bytes, the fault is a stale key (Flatcar's new subkeys), a bad .sig or another signer:
    keep the file, as downloading gigabytes again mends none of those, and nothing uses it
    before a check passes (the marker). The small .sig and .DIGESTS are fetched again next
    run either way: the kept file then verifies, or no longer matches its SHA512 and goes.
    """
    forget(published.sig_url, cache_dir)
    forget(published.digests_url, cache_dir)
    if file_changed:
        forget(published.url, cache_dir)
