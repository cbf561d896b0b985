"""The repository's signing keys: generated, loaded, used to sign and to verify.

Nodes check a repository's index with nothing but `openssl dgst -sha256 -verify PUB.pem
-signature SIG FILE` (CoreOS and Flatcar ship openssl; no gpg), so the formats are openssl's:
a public key is PEM SubjectPublicKeyInfo, a signature is DER (ECDSA's r,s pair, or RSA
PKCS#1 v1.5), the digest SHA-256. `keygen` makes ECDSA P-256 keys: small, and fast to check.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from coreos_gpu.errors import CoreosGpuError, ExitCode

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    fingerprint: str


def _key_error(path: Path, what: str) -> CoreosGpuError:
    return CoreosGpuError(f"{path} is not {what}", code=ExitCode.KEY,
                          hint="make a key pair with `coreos-gpu keygen --output PATH`")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CoreosGpuError(f"cannot read key {path}: {e.strerror or e}",
                             code=ExitCode.KEY) from e


def _check_kind(key: object, path: Path, what: str) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise _key_error(path, f"{what} of a supported kind (an ECDSA key on "
                             f"{key.curve.name}; use P-256 or RSA)")
    elif isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise _key_error(path, f"{what} of a supported kind (RSA with {key.key_size} "
                             f"bits; at least {_MIN_RSA_BITS})")
    else:
        raise _key_error(path, f"{what} of a supported kind (ECDSA P-256 or RSA)")


def load_private_key(path: Path) -> PrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # cryptography's word for "this one needs a passphrase"
        raise _key_error(path, "an unencrypted private key (it has a passphrase)") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        what = "a private key: it is a public key" if b"PUBLIC KEY" in data else "a private key"
        raise _key_error(path, f"{what} (PEM)") from e
    _check_kind(key, path, "a private key")
    assert isinstance(key, PrivateKey)  # _check_kind refused every other kind
    return key


def load_public_key(path: Path) -> PublicKey:
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        what = "a public key: it is a private key" if b"PRIVATE KEY" in data else "a public key"
        raise _key_error(path, f"{what} (PEM SubjectPublicKeyInfo)") from e
    _check_kind(key, path, "a public key")
    assert isinstance(key, PublicKey)
    return key


def public_pem(key: PublicKey) -> bytes:
    """The form `openssl dgst -verify` reads (and `openssl pkey -pubout` writes)."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: PublicKey) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: on a node,
    `openssl pkey -pubin -in PUB.pem -outform DER | sha256sum`."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_of_pem(data: bytes) -> str:
    """The fingerprint of a PEM public key (a bundle's node/repository.pub, for inspect);
    empty when the bytes are no usable public key."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return ""
    return fingerprint(key) if isinstance(key, PublicKey) else ""


def sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))  # DER, as openssl writes it
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # openssl dgst's RSA default


def signature_matches(key: PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):  # ValueError: not even a DER signature
        return False
    return True


def _create(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a key (losing a repository's private key locks out its nodes),
    # and the mode is the file's from its first byte, not chmod-ed after the key is in it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_key_pair(output: Path) -> KeyPair:
    """A new ECDSA P-256 key: the private key at output (0600), the public one at output.pub."""
    public_path = output.with_name(output.name + ".pub")
    for path in (output, public_path):
        if path.exists() or path.is_symlink():
            raise CoreosGpuError(f"{path} exists; keygen never overwrites a key",
                                 hint="choose another --output, or move the old key away",
                                 code=ExitCode.KEY)
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        output.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create(output, private, 0o600)
        try:
            _create(public_path, public_pem(key.public_key()), 0o644)
        except BaseException:
            output.unlink(missing_ok=True)  # no private key without its public half
            raise
    except FileExistsError as e:
        raise CoreosGpuError(f"{e.filename} exists; keygen never overwrites a key",
                             code=ExitCode.KEY) from e
    except OSError as e:
        raise CoreosGpuError(f"cannot write key {e.filename or output}: {e.strerror or e}",
                             code=ExitCode.KEY) from e
    return KeyPair(output, public_path, fingerprint(key.public_key()))
