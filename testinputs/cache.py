"""A content-keyed cache of built test inputs, safe when several pytest processes build at once."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from coreos_gpu.cache import locked

MARKER = ".complete"


def cache_root() -> Path:
    env = os.environ.get("COREOS_GPU_TESTINPUTS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "coreos-gpu-testinputs"


def build_cached(name: str, recipe: bytes, build: Callable[[Path], None]) -> Path:
    """Return cache_root()/name-<key>/, running build(dir) first unless a complete one exists.

    The key is the sha256 of recipe. build() fills an empty temporary folder that is renamed
    into place only once it is complete, so the final path never holds a half-built result.
    """
    root = cache_root()
    final = root / f"{name}-{hashlib.sha256(recipe).hexdigest()[:16]}"
    if (final / MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f"{name}.lock"):
        # Another process may have finished the same build while we waited for the lock.
        if (final / MARKER).exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the final folder
        try:
            build(tmp)
            (tmp / MARKER).touch()
            if final.exists():  # only if someone removed its marker by hand
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        remove_stale(root, name, keep=final)
    return final


def remove_stale(root: Path, name: str, *, keep: Path) -> None:
    """Remove other results of name (older recipes) and temp folders of killed builds.

    Called with name's lock held, so no build of name is running.
    """
    pattern = re.compile(rf"\.?{re.escape(name)}-[0-9a-f]{{16}}(\..+)?")
    for entry in root.iterdir():
        if entry != keep and entry.is_dir() and pattern.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
