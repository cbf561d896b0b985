"""Fetch stage: a URL or path → a local file, downloads kept in a content-addressed cache.

Layout under <cache>/downloads: `sha256/<hex>` holds each downloaded file once, `urls/` maps
a URL to its blob, `partial/` keeps unfinished downloads so the next run resumes them, and
`locks/` serialises two processes fetching the same URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from coreos_gpu import ui
from coreos_gpu.cache import locked, sha256_of, write_atomically
from coreos_gpu.errors import CoreosGpuError, ExitCode

ATTEMPTS = 3
TIMEOUT = httpx.Timeout(30.0, read=120.0)


def _dirs(cache_dir: Path) -> tuple[Path, Path, Path, Path]:
    base = cache_dir / "downloads"
    return base / "sha256", base / "urls", base / "partial", base / "locks"


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def cached(url: str, cache_dir: Path) -> Path | None:
    blobs, urls, _, _ = _dirs(cache_dir)
    try:
        entry = json.loads((urls / f"{_url_key(url)}.json").read_text())
    except (OSError, ValueError):
        return None
    blob = blobs / str(entry.get("sha256", ""))
    return blob if blob.is_file() else None


def forget(url: str, cache_dir: Path) -> None:
    """Drop a URL and its file from the cache (a download that failed verification)."""
    blob = cached(url, cache_dir)
    _, urls, _, _ = _dirs(cache_dir)
    (urls / f"{_url_key(url)}.json").unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


def _fail_status(url: str, response: httpx.Response) -> CoreosGpuError:
    return CoreosGpuError(
        f"download of {url} failed: HTTP {response.status_code} {response.reason_phrase}",
        code=ExitCode.DOWNLOAD)


def _attempt(url: str, partial: Path) -> tuple[int, int | None]:
    """One GET, resuming after what partial holds; return (bytes held, total size if known)."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with httpx.stream("GET", url, headers=headers, follow_redirects=True,
                      timeout=TIMEOUT) as response:
        if response.status_code == 416:  # what we hold is stale or already whole: start over
            partial.unlink()
            return 0, None
        if response.status_code == 206:
            content_range = response.headers.get("content-range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                partial.unlink()
                return 0, None
        elif response.status_code == 200:
            offset = 0  # the server ignored the range: take the whole file again
        else:
            raise _fail_status(url, response)
        length = response.headers.get("content-length")
        total = (offset + int(length)) if length and length.isdigit() else None
        name = Path(urlsplit(url).path).name or url
        with partial.open("r+b" if offset else "wb") as out, \
                ui.ByteProgress(f"downloading {name}", total) as progress:
            out.seek(offset)
            out.truncate()
            progress.advance(offset)
            try:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    progress.advance(len(chunk))
            except httpx.TransportError:
                pass  # the connection broke: keep what arrived, the caller resumes
            return out.tell(), total


def _download(url: str, cache_dir: Path) -> Path:
    blobs, urls, partials, _ = _dirs(cache_dir)
    for folder in (blobs, urls, partials):
        folder.mkdir(parents=True, exist_ok=True)
    partial = partials / _url_key(url)
    held, total = 0, None
    for _ in range(ATTEMPTS):
        try:
            held, total = _attempt(url, partial)
        except httpx.TransportError as e:
            if not partial.exists():
                raise CoreosGpuError(f"download of {url} failed: {e}",
                                     code=ExitCode.DOWNLOAD) from e
            continue
        if total is None or held == total:
            break
    else:
        raise CoreosGpuError(
            f"download of {url} stopped at {held} of {total} bytes after {ATTEMPTS} attempts",
            hint="run the command again to resume it", code=ExitCode.INCOMPLETE)
    blob = blobs / sha256_of(partial)
    os.replace(partial, blob)
    record = {"url": url, "sha256": blob.name, "size": blob.stat().st_size}
    write_atomically(urls / f"{_url_key(url)}.json", json.dumps(record).encode())
    return blob


def fetch(source: str, cache_dir: Path, *, offline: bool = False, fresh: bool = False) -> Path:
    """Return a local file for a path, a file:// URL, or an http(s) URL.

    A URL is downloaded once and then served from the cache, except with fresh=True (for
    files that change in place, like release feeds): then it is downloaded again unless
    offline, where the cached copy is used.
    """
    parts = urlsplit(source)
    if parts.scheme in ("", "file"):
        return Path(unquote(parts.path) if parts.scheme else source).expanduser()
    if parts.scheme not in ("http", "https"):
        raise CoreosGpuError(f"cannot fetch {source}: unsupported URL scheme {parts.scheme!r}",
                             hint="use http://, https://, file:// or a path",
                             code=ExitCode.CONFIG)
    _, _, _, locks = _dirs(cache_dir)
    with locked(locks / f"{_url_key(source)}.lock"):
        hit = cached(source, cache_dir)
        if hit is not None and (offline or not fresh):
            return hit
        if offline:
            raise CoreosGpuError(
                f"{source} is not in the cache and --offline forbids downloading",
                hint="run once without --offline, or copy the file and pass its path",
                code=ExitCode.DOWNLOAD)
        return _download(source, cache_dir)
