"""Fetch stage: a URL or path → a local file, downloads kept in a content-addressed cache."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from coreos_gpu import ui
from coreos_gpu.errors import CoreosGpuError, ExitCode

CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(30.0, read=120.0)


def _download_dirs(cache_dir: Path) -> tuple[Path, Path]:
    return cache_dir / "downloads" / "sha256", cache_dir / "downloads" / "urls"


def _index_path(urls: Path, url: str) -> Path:
    return urls / (hashlib.sha256(url.encode()).hexdigest() + ".json")


def _cached(cache_dir: Path, url: str) -> Path | None:
    blobs, urls = _download_dirs(cache_dir)
    try:
        entry = json.loads(_index_path(urls, url).read_text())
    except (OSError, ValueError):
        return None
    blob = blobs / str(entry.get("sha256", ""))
    return blob if blob.is_file() else None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _download(url: str, cache_dir: Path) -> Path:
    blobs, urls = _download_dirs(cache_dir)
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=blobs)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, httpx.stream(
                "GET", url, follow_redirects=True, timeout=TIMEOUT) as response:
            if response.status_code != 200:
                raise CoreosGpuError(
                    f"download of {url} failed: HTTP {response.status_code} "
                    f"{response.reason_phrase}", code=ExitCode.DOWNLOAD)
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            name = Path(urlsplit(url).path).name or url
            with ui.ByteProgress(f"downloading {name}", total) as progress:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(len(chunk))
            if total is not None and out.tell() != total:
                raise CoreosGpuError(
                    f"download of {url} was cut short: {out.tell()} of {total} bytes",
                    code=ExitCode.DOWNLOAD)
        blob = blobs / digest.hexdigest()
        os.replace(tmp, blob)
    except httpx.HTTPError as e:
        raise CoreosGpuError(f"download of {url} failed: {e}", code=ExitCode.DOWNLOAD) from e
    finally:
        tmp.unlink(missing_ok=True)
    record = {"url": url, "sha256": blob.name, "size": blob.stat().st_size}
    _write_atomically(_index_path(urls, url), json.dumps(record).encode())
    return blob


def fetch(source: str, cache_dir: Path, *, offline: bool = False) -> Path:
    """Return a local file for a path, a file:// URL, or an http(s) URL (downloaded once)."""
    parts = urlsplit(source)
    if parts.scheme in ("", "file"):
        return Path(unquote(parts.path) if parts.scheme else source).expanduser()
    if parts.scheme not in ("http", "https"):
        raise CoreosGpuError(f"cannot fetch {source}: unsupported URL scheme {parts.scheme!r}",
                             hint="use http://, https://, file:// or a path",
                             code=ExitCode.CONFIG)
    cached = _cached(cache_dir, source)
    if cached is not None:
        return cached
    if offline:
        raise CoreosGpuError(f"{source} is not in the cache and --offline forbids downloading",
                             hint="run once without --offline, or copy the file and pass its "
                             "path", code=ExitCode.DOWNLOAD)
    return _download(source, cache_dir)
