"""Verification of downloads: Gentoo-style `.DIGESTS` (SHA512) and detached GPG signatures.

A download is checked right after it arrives, before anything extracts or runs it; one that
fails is deleted from the cache, so a later run downloads it again instead of trusting it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu import ui
from coreos_gpu.cache import sha256_of, write_atomically
from coreos_gpu.errors import CoreosGpuError, DownloadError, ExitCode
from coreos_gpu.fetch import fetch, forget
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


def verify_signature(path: Path, sig: Path, key: Path, fingerprint: str, name: str) -> None:
    """Check a detached signature against a key file whose primary key must be `fingerprint`."""
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
            raise CoreosGpuError(
                f"signing key {key.name} is not the pinned key {pinned} (it holds {found})",
                hint="check signing_key, or set signing_key_fingerprint if you really use "
                "another key", code=ExitCode.SIGNATURE)
        checked = run([*gpg, "--verify", sig, path], check=False, what="verifying a signature")
    # VALIDSIG's last field is the primary key's fingerprint, whichever subkey signed.
    valid = [fields for fields in _status(checked.stdout, "VALIDSIG") if fields[-1] == pinned]
    broken = _status(checked.stdout, "BADSIG") + _status(checked.stdout, "ERRSIG")
    if not valid or broken:
        raise CoreosGpuError(
            f"the signature of {name} does not verify with key {pinned}: the file was not "
            "signed by it, or was changed after signing",
            code=ExitCode.SIGNATURE)


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
        return fetch(url, cache_dir, offline=offline)
    except DownloadError as e:
        if not e.not_found:
            raise
        raise CoreosGpuError(f"{what} {url} does not exist (HTTP {e.status}): nothing to "
                             "verify the download with", code=ExitCode.UNVERIFIABLE) from e


def fetch_verified(published: Published, cache_dir: Path, *, offline: bool) -> Path:
    """Download a file with its .DIGESTS and .sig and verify both; return the cached file."""
    digests = _fetch_proof(published.digests_url, "checksum file", cache_dir, offline)
    sig = _fetch_proof(published.sig_url, "signature", cache_dir, offline)
    key = fetch(published.key, cache_dir, offline=offline)
    path = fetch(published.url, cache_dir, offline=offline)
    # Verification is remembered per exact content of file, digests, signature and key.
    proof = json.dumps([sha256_of(p) for p in (digests, sig, key)] + [published.fingerprint])
    marker = path.with_name(path.name + ".verified")
    if marker.is_file() and marker.read_text() == proof:
        return path
    name = Path(published.url.rsplit("/", 1)[-1]).name
    with ui.step(f"verifying {name}"):
        try:
            verify_digest(path, digests, name, published.digests_url)
            verify_signature(path, sig, key, published.fingerprint, name)
        except CoreosGpuError:
            forget(published.url, cache_dir)
            marker.unlink(missing_ok=True)
            raise
    write_atomically(marker, proof.encode())
    return path
