"""Fetch stage: a URL or path → a local file, downloads kept in a content-addressed cache.

Layout under <cache>/downloads: `sha256/<hex>` holds each downloaded file once, `urls/` maps
a URL to its blob, `partial/` keeps unfinished downloads so the next run resumes them (each
beside a `.validator` file naming the version its bytes are of), and `locks/` serialises two
processes fetching the same URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import httpx

from coreos_gpu import ui
from coreos_gpu.cache import locked, sha256_of, write_atomically
from coreos_gpu.errors import CoreosGpuError, DownloadError, ExitCode

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


def _fail_status(url: str, response: httpx.Response) -> DownloadError:
    return DownloadError(
        f"download of {url} failed: HTTP {response.status_code} {response.reason_phrase}",
        status=response.status_code)


class _Outcome(NamedTuple):
    held: int  # bytes the partial file holds
    total: int | None  # the whole file's size, where the server said it
    whole: bool  # the body arrived to its end: all of Content-Length, or a clean last chunk


class _Validator(NamedTuple):
    """The version of the file a partial download holds bytes of: a response header's value."""

    header: str  # "etag" or "last-modified"
    value: str


def _validator_of(response: httpx.Response) -> _Validator | None:
    """What If-Range may carry to resume this response's body (RFC 9110 §13.1.5), or None."""
    etag = response.headers.get("etag")
    if etag is not None:
        # A weak tag promises equivalent content, not equal bytes, so it cannot guard a byte
        # range; and where the server gave a tag, If-Range must not carry a date instead. So
        # none: the download is not resumed (a restart costs time; a spliced file is wrong).
        return None if etag.startswith("W/") else _Validator("etag", etag)
    modified, date = response.headers.get("last-modified"), response.headers.get("date")
    try:
        # A date is strong only where the response came a second or more after it: a file
        # written twice within that second has two versions with one Last-Modified.
        if modified and date and (parsedate_to_datetime(date) - parsedate_to_datetime(modified)
                                  >= timedelta(seconds=1)):
            return _Validator("last-modified", modified)
    except (TypeError, ValueError):  # unparseable, or one date without a time zone
        pass
    return None


def _read_validator(sidecar: Path) -> _Validator | None:
    try:
        entry = json.loads(sidecar.read_text())
        validator = _Validator(entry["header"], entry["value"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return validator if validator.header in ("etag", "last-modified") and isinstance(
        validator.value, str) else None


def _discard(partial: Path, sidecar: Path) -> None:
    partial.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)


def _resume_offset(url: str, response: httpx.Response, offset: int,
                   validator: _Validator | None) -> int | None:
    """Where the response's body goes in the file, or None when what we hold is unusable."""
    if response.status_code == 416:  # what we hold is stale (the file shrank) or whole
        return None
    if response.status_code == 206:
        content_range = response.headers.get("content-range", "")
        if not content_range.startswith(f"bytes {offset}-"):
            return None
        # A server that honours Range but ignores If-Range sends a changed file's tail.
        if validator and response.headers.get(validator.header, validator.value) != validator.value:
            return None
        return offset
    if response.status_code == 200:
        return 0  # the server ignored the range, or the file changed: take it whole again
    raise _fail_status(url, response)


def _check_encoding(url: str, response: httpx.Response) -> None:
    """Refuse a body the server encoded although asked for identity: stored, its bytes are
    not the file; decoded, Content-Length and Range would count other bytes than we hold."""
    header = response.headers.get("content-encoding", "")
    encodings = [e.strip().lower() for e in header.split(",") if e.strip()]
    if any(e != "identity" for e in encodings):
        raise DownloadError(
            f"download of {url} failed: the server sent it with Content-Encoding: {header} "
            "although asked for none (Accept-Encoding: identity)",
            status=response.status_code,
            hint="make the server send the file as stored, without Content-Encoding (turn its "
                 "compression off for this file, or drop that metadata from the object)")


def _attempt(url: str, partial: Path, sidecar: Path) -> _Outcome:
    """One GET, resuming after what partial holds where the server still has that version."""
    validator = _read_validator(sidecar)
    offset = partial.stat().st_size if partial.exists() else 0
    # Content-Length and Range count the bytes as sent; httpx would decode a compressed body
    # and break both. So ask for none, and store only a body sent as is.
    headers = {"Accept-Encoding": "identity"}
    if offset and validator is None:
        _discard(partial, sidecar)  # nothing tells whether the server still has these bytes
        offset = 0
    elif offset and validator is not None:
        # If-Range: the rest where the file is unchanged, else all of it (200), never a mix.
        headers |= {"Range": f"bytes={offset}-", "If-Range": validator.value}
    with httpx.stream("GET", url, headers=headers, follow_redirects=True,
                      timeout=TIMEOUT) as response:
        start = _resume_offset(url, response, offset, validator)
        if start is None:
            _discard(partial, sidecar)  # the next attempt starts from zero
            return _Outcome(0, None, whole=False)
        _check_encoding(url, response)
        if not start:
            # Old bytes and their validator go before the new version's first byte is kept.
            _discard(partial, sidecar)
            if (new := _validator_of(response)) is not None:
                write_atomically(sidecar, json.dumps(new._asdict()).encode())
        length = response.headers.get("content-length")
        total = (start + int(length)) if length and length.isdigit() else None
        name = Path(urlsplit(url).path).name or url
        with partial.open("r+b" if start else "wb") as out, \
                ui.ByteProgress(f"downloading {name}", total) as progress:
            out.seek(start)
            out.truncate()
            progress.advance(start)
            try:
                for chunk in response.iter_raw():
                    out.write(chunk)
                    progress.advance(len(chunk))
            except httpx.TransportError:
                # Keep what arrived for the next attempt to resume. Without a Content-Length
                # (chunked), this is the only sign that the body was cut short.
                return _Outcome(out.tell(), total, whole=False)
            held = out.tell()
    return _Outcome(held, total, whole=total is None or held == total)


def _stopped(url: str, outcome: _Outcome, *, resumable: bool) -> CoreosGpuError:
    size = (f"of {outcome.total} bytes" if outcome.total is not None
            else "bytes, before the end of the transfer")
    return CoreosGpuError(
        f"download of {url} stopped at {outcome.held} {size} after {ATTEMPTS} attempts",
        hint="run the command again to resume it" if resumable else
        "run the command again (the server names no version of the file, so it starts over)",
        code=ExitCode.INCOMPLETE)


def _download(url: str, cache_dir: Path) -> Path:
    blobs, urls, partials, _ = _dirs(cache_dir)
    for folder in (blobs, urls, partials):
        folder.mkdir(parents=True, exist_ok=True)
    partial = partials / _url_key(url)
    sidecar = partials / f"{_url_key(url)}.validator"
    outcome = _Outcome(0, None, whole=False)
    for _ in range(ATTEMPTS):
        try:
            outcome = _attempt(url, partial, sidecar)
        except httpx.TransportError as e:
            if not partial.exists():
                raise DownloadError(f"download of {url} failed: {e}") from e
            continue
        if outcome.whole:
            break
    else:
        if not sidecar.exists():  # no version to resume against: the next run starts over
            _discard(partial, sidecar)
        raise _stopped(url, outcome, resumable=partial.exists())
    blob = blobs / sha256_of(partial)
    os.replace(partial, blob)
    sidecar.unlink(missing_ok=True)
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
            raise DownloadError(
                f"{source} is not in the cache and --offline forbids downloading",
                hint="run once without --offline, or copy the file and pass its path")
        return _download(source, cache_dir)


def fetch_file(source: str, cache_dir: Path, *, offline: bool, fresh: bool = False) -> Path:
    """fetch(), where a path or file:// URL that does not exist is a DownloadError (missing)
    as an HTTP 404 is: a file:// mirror then fails as an http one does."""
    path = fetch(source, cache_dir, offline=offline, fresh=fresh)
    if not path.is_file():
        raise DownloadError(f"{source} does not exist or is not a file", missing=True)
    return path
