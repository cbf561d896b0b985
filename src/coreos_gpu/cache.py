"""Small helpers every cache user shares: locks, hashes, atomic writes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Serialise work on one cache entry between processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def hash_inputs(inputs: object) -> str:
    """A cache key: the sha256 of JSON-able inputs, independent of dict order."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def copy_atomically(source: Path, dest: Path) -> None:
    """Copy source to dest (mode 0644) through a temp file beside dest: never half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def content_digest(path: Path) -> str:
    """The sha256 of a file; free for downloads, whose cache names them by it."""
    if len(path.name) == 64 and path.parent.name == "sha256" and all(
            c in "0123456789abcdef" for c in path.name):
        return path.name
    return sha256_of(path)


def link_tree(source: Path, dest: Path) -> None:
    """Copy a tree as hard links (a real copy across file systems): cheap, for trees whose
    files are only ever added to or replaced, never written in place."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, symlinks=True, copy_function=link, dirs_exist_ok=True)


def lock_of(entry: Path) -> Path:
    """The lock of a cache entry `<folder>/<name>`: `<folder>/<name>.lock`, beside it."""
    return entry.with_name(f"{entry.name}.lock")


@contextmanager
def held(entry: Path) -> Iterator[None]:
    """Use a cache entry (a developer container, a driver, a module set) while the block runs.
    Any number of users share the hold, its writer and `cache prune` need the lock alone, so
    nothing held is removed. Taking it marks the entry used now, which prune's age and size
    rules go by (atime is no help: most hosts mount with relatime or noatime)."""
    lock_path = lock_of(entry)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        os.utime(lock_path)
        yield
