"""Throw-away GPG signing keys shaped like Flatcar's: a certify-only primary key that pins the
identity, and a signing subkey that makes the signatures (Flatcar rotates those subkeys).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu.run import run


@dataclass(frozen=True)
class SigningKey:
    home: Path  # the GNUPGHOME that holds its secret parts
    fingerprint: str  # of the primary key: what a verifier pins
    subkey_fingerprint: str  # of the signing subkey: what VALIDSIG's first field names


@contextmanager
def gnupg_home() -> Iterator[Path]:
    """A private GNUPGHOME, its agent stopped and its secrets deleted on exit.

    It lives in /tmp rather than the (possibly deep) test-input cache: gpg-agent's socket goes
    into it when /run/user/<uid> is missing, and socket paths are limited to 107 bytes.
    """
    with tempfile.TemporaryDirectory(prefix="coreos-gpu-gpg.") as home:
        os.chmod(home, 0o700)  # gpg warns about "unsafe permissions" otherwise
        try:
            yield Path(home)
        finally:
            run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"],
                what="stopping the test key's gpg-agent")


def gpg(home: Path, *args: str | os.PathLike[str], what: str) -> str:
    argv = ["gpg", "--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback",
            "--passphrase", "", *args]
    return run(argv, what=what).stdout


def read_fingerprints(home: Path) -> tuple[str, list[str]]:
    """(primary fingerprint, subkey fingerprints) of the one key in home."""
    listing = gpg(home, "--with-colons", "--list-keys", what="listing the test key")
    primary, subkeys, kind = "", [], ""
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub"):
            kind = fields[0]
        elif fields[0] == "fpr" and kind == "pub":
            primary = fields[9]
        elif fields[0] == "fpr" and kind == "sub":
            subkeys.append(fields[9])
    return primary, subkeys


def generate_signing_key(home: Path, uid: str) -> SigningKey:
    """A new ed25519 key in home: certify-only primary plus one signing subkey, no passphrase."""
    gpg(home, "--quick-generate-key", uid, "ed25519", "cert", "never",
        what="generating the test primary key")
    primary, _ = read_fingerprints(home)
    gpg(home, "--quick-add-key", primary, "ed25519", "sign", "never",
        what="adding the test signing subkey")
    _, subkeys = read_fingerprints(home)
    if len(subkeys) != 1:
        raise RuntimeError(f"expected one subkey in {home}, found {subkeys}")
    return SigningKey(home, primary, subkeys[0])


def export_public_key(key: SigningKey, dest: Path) -> None:
    gpg(key.home, "--armor", "--output", dest, "--export", key.fingerprint,
        what="exporting the test public key")


def sign_detached(key: SigningKey, file: Path, sig: Path) -> None:
    """A binary detached signature of file, made by the subkey (the `!` forces that exact key)."""
    gpg(key.home, "--local-user", f"{key.subkey_fingerprint}!", "--output", sig,
        "--detach-sign", file, what=f"signing {file.name}")
