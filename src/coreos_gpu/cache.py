"""Small helpers every cache user shares: locks, hashes, atomic writes."""

from __future__ import annotations

import fcntl
import hashlib
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
