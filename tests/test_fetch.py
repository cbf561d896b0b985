from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from coreos_gpu.cache import sha256_of
from coreos_gpu.errors import CoreosGpuError, DownloadError, ExitCode
from coreos_gpu.fetch import cached, fetch

from .conftest import Mirror

DATA = bytes(range(256)) * 4096  # 1 MiB


def _serve(mirror: Mirror, name: str, data: bytes = DATA) -> str:
    (mirror.root / name).write_bytes(data)
    return f"{mirror.url}/{name}"


def _entries(cache: Path) -> list[str]:
    downloads = cache / "downloads"
    return sorted(str(p.relative_to(downloads)) for p in downloads.rglob("*")
                  if p.is_file() and "locks" not in p.parts) if downloads.exists() else []


def test_download_lands_content_addressed(http_dir: Mirror, tmp_path: Path) -> None:
    url = _serve(http_dir, "a.bin")
    path = fetch(url, tmp_path)
    assert path.read_bytes() == DATA
    assert path.name == sha256_of(path) and path.parent.name == "sha256"
    assert fetch(url, tmp_path) == path  # the second time from the cache


def test_resumes_a_cut_download(http_dir: Mirror, tmp_path: Path) -> None:
    url = _serve(http_dir, "big.bin")
    # The server cuts the first response; the retry asks for the rest with a Range request.
    http_dir.cut_once["/big.bin"] = 300_000
    path = fetch(url, tmp_path)
    assert path.read_bytes() == DATA
    assert http_dir.ranges_seen == ["bytes=300000-"]


def test_truncated_download_fails_after_retries(http_dir: Mirror, tmp_path: Path) -> None:
    url = _serve(http_dir, "big.bin")
    http_dir.cut_after["/big.bin"] = 1000  # every response, ranged or not, is cut short
    with pytest.raises(CoreosGpuError) as info:
        fetch(url, tmp_path)
    assert info.value.code is ExitCode.INCOMPLETE
    assert "stopped at" in info.value.message and f"of {len(DATA)} bytes" in info.value.message
    assert http_dir.ranges_seen, "the retries must resume, not start over"
    assert cached(url, tmp_path) is None
    assert not [e for e in _entries(tmp_path) if e.startswith(("sha256", "urls"))]


def test_404_and_offline(http_dir: Mirror, tmp_path: Path) -> None:
    with pytest.raises(CoreosGpuError) as info:
        fetch(f"{http_dir.url}/missing.bin", tmp_path)
    assert info.value.code is ExitCode.DOWNLOAD
    assert isinstance(info.value, DownloadError) and info.value.status == 404
    assert info.value.not_found
    assert info.value.message.endswith("HTTP 404 File not found")
    url = _serve(http_dir, "a.bin")
    with pytest.raises(CoreosGpuError) as info:
        fetch(url, tmp_path, offline=True)
    assert info.value.code is ExitCode.DOWNLOAD
    assert _entries(tmp_path) == []


def test_fresh_downloads_again_but_offline_uses_the_cache(http_dir: Mirror,
                                                          tmp_path: Path) -> None:
    url = _serve(http_dir, "feed.json", b'{"a": 1}')
    assert fetch(url, tmp_path, fresh=True).read_bytes() == b'{"a": 1}'
    _serve(http_dir, "feed.json", b'{"a": 2}')
    assert fetch(url, tmp_path).read_bytes() == b'{"a": 1}'
    assert fetch(url, tmp_path, fresh=True).read_bytes() == b'{"a": 2}'
    (http_dir.root / "feed.json").unlink()
    assert fetch(url, tmp_path, fresh=True, offline=True).read_bytes() == b'{"a": 2}'


def test_paths_and_file_urls_are_used_in_place(tmp_path: Path) -> None:
    local = tmp_path / "x.run"
    local.write_bytes(b"x")
    assert fetch(str(local), tmp_path / "cache") == local
    assert fetch(local.as_uri(), tmp_path / "cache") == local
    with pytest.raises(CoreosGpuError) as info:
        fetch("ftp://example.invalid/x", tmp_path)
    assert info.value.code is ExitCode.CONFIG


def test_two_processes_fetching_one_url(http_dir: Mirror, tmp_path: Path) -> None:
    url = _serve(http_dir, "shared.bin", DATA * 8)
    code = ("import sys; from pathlib import Path; from coreos_gpu.fetch import fetch; "
            "print(fetch(sys.argv[1], Path(sys.argv[2])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == DATA * 8
    index = list((tmp_path / "downloads" / "urls").glob("*.json"))
    assert len(index) == 1 and json.loads(index[0].read_text())["url"] == url
    assert list((tmp_path / "downloads" / "partial").iterdir()) == []


# --- servers that misbehave in ways real ones do -------------------------------------------


@contextmanager
def served(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering with handler, in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def handler_with(base: type[BaseHTTPRequestHandler], **attrs: Any) -> type[Any]:
    """A subclass of base with its own state (each test gets fresh lists)."""
    return type(base.__name__, (base,), attrs)


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked transfers and keep-alive, like real servers
    requests: ClassVar[list[dict[str, str]]]  # the headers of each request, in order

    def log_message(self, format: str, *args: object) -> None:
        pass

    def start(self) -> int:
        """Record the request; return the offset a Range header asks for (0 without one)."""
        self.requests.append(dict(self.headers.items()))
        header = self.headers.get("Range", "")
        return int(header[6:].split("-")[0]) if header.startswith("bytes=") else 0


def _gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


class GzipAnyway(_Quiet):
    """Compresses every response (Content-Encoding: gzip) whatever the client asked for, and
    serves ranges of the compressed bytes; can cut its first response short."""

    body: ClassVar[bytes]
    cut_first: ClassVar[list[int]]  # bytes to send of the next response, then hang up

    def do_GET(self) -> None:
        start = self.start()
        self.send_response(206 if start else 200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(self.body) - start))
        if start:
            self.send_header("Content-Range",
                             f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        self.end_headers()
        end = self.cut_first.pop() if self.cut_first else len(self.body)
        self.wfile.write(self.body[start:end])
        self.close_connection = end < len(self.body)


@pytest.mark.parametrize("cut", [None, 300_000])
def test_a_server_that_compresses_anyway(tmp_path: Path, cut: int | None) -> None:
    data = random.Random(16).randbytes(1 << 20)  # gzip cannot shrink it: sizes stay close
    handler = handler_with(GzipAnyway, requests=[], body=_gzipped(data),
                           cut_first=[cut] if cut else [])
    with served(handler) as base:
        path = fetch(f"{base}/image.bin.bz2", tmp_path)
    # The cache holds exactly what was served: the size check and the resume count those.
    assert path.read_bytes() == handler.body
    assert [r.get("Accept-Encoding") for r in handler.requests] == ["identity"] * (
        2 if cut else 1)
    assert [r.get("Range") for r in handler.requests][1:] == ([f"bytes={cut}-"] if cut else [])


class BadRanges(_Quiet):
    """Serves `body`; answers a Range request with `on_range`: 416, or a 206 for other bytes."""

    body: ClassVar[bytes]
    on_range: ClassVar[str]

    def do_GET(self) -> None:
        start = self.start()
        if start and self.on_range == "416":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(self.body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        # A 206 whose Content-Range starts at 0, not where the client asked.
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.body)))
        if start:
            self.send_header("Content-Range", f"bytes 0-{len(self.body) - 1}/{len(self.body)}")
        self.end_headers()
        self.wfile.write(self.body)


def _stale_partial(cache: Path, url: str, data: bytes) -> None:
    """What an interrupted download of an older version of url left behind."""
    partial = cache / "downloads" / "partial"
    partial.mkdir(parents=True)
    (partial / hashlib.sha256(url.encode()).hexdigest()).write_bytes(data)


@pytest.mark.parametrize(("on_range", "stale"),
                         [("416", DATA + b"older, longer"), ("wrong range", DATA[:1000])])
def test_an_unusable_partial_restarts_the_download(tmp_path: Path, on_range: str,
                                                   stale: bytes) -> None:
    handler = handler_with(BadRanges, requests=[], body=DATA, on_range=on_range)
    with served(handler) as base:
        url = f"{base}/a.bin"
        _stale_partial(tmp_path, url, stale)
        path = fetch(url, tmp_path)
    assert path.read_bytes() == DATA
    assert [r.get("Range") for r in handler.requests] == [f"bytes={len(stale)}-", None]
    assert list((tmp_path / "downloads" / "partial").iterdir()) == []


def test_a_stale_partial_on_the_plain_mirror(http_dir: Mirror, tmp_path: Path) -> None:
    # The test mirror answers 416 to a range past the end, as SimpleHTTPRequestHandler would.
    url = _serve(http_dir, "a.bin")
    _stale_partial(tmp_path, url, DATA + b"x")
    assert fetch(url, tmp_path).read_bytes() == DATA
    assert http_dir.ranges_seen == [f"bytes={len(DATA) + 1}-"]


class CutChunked(_Quiet):
    """Sends `body` chunked (no Content-Length), hanging up mid-chunk on the first `cuts`
    responses, before the last chunk; serves ranges (206, chunked) for the resume."""

    body: ClassVar[bytes]
    cuts: ClassVar[list[int]]  # one entry per response still to cut

    def do_GET(self) -> None:
        start = self.start()
        self.send_response(206 if start else 200)
        self.send_header("Transfer-Encoding", "chunked")
        if start:
            self.send_header("Content-Range",
                             f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        self.end_headers()
        cut = bool(self.cuts and self.cuts.pop())
        rest = self.body[start:]
        for at in range(0, len(rest), 1 << 16):
            chunk = rest[at:at + (1 << 16)]
            if cut and at >= len(rest) // 2:
                self.wfile.write(b"%x\r\n" % len(chunk) + chunk[:100])  # and hang up
                self.close_connection = True
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")


def test_a_cut_chunked_response_is_resumed(tmp_path: Path) -> None:
    handler = handler_with(CutChunked, requests=[], body=DATA, cuts=[1])
    with served(handler) as base:
        path = fetch(f"{base}/a.bin", tmp_path)
    assert path.read_bytes() == DATA
    assert len(handler.requests) == 2 and handler.requests[1]["Range"].startswith("bytes=")


def test_a_chunked_response_cut_every_time_is_not_complete(tmp_path: Path) -> None:
    handler = handler_with(CutChunked, requests=[], body=DATA, cuts=[1, 1, 1])
    with served(handler) as base:
        url = f"{base}/a.bin"
        with pytest.raises(CoreosGpuError) as info:
            fetch(url, tmp_path)
    assert info.value.code is ExitCode.INCOMPLETE
    assert "before the end of the transfer" in info.value.message
    assert len(handler.requests) == 3
    assert cached(url, tmp_path) is None
    assert not [e for e in _entries(tmp_path) if e.startswith(("sha256", "urls"))]


class Statuses(_Quiet):
    """Serves `files` by path, answers `statuses` (path → HTTP status) with that status."""

    files: ClassVar[dict[str, bytes]]
    statuses: ClassVar[dict[str, int]]

    def do_GET(self) -> None:
        self.start()
        status = self.statuses.get(self.path, 200 if self.path in self.files else 404)
        body = self.files.get(self.path, b"") if status == 200 else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize(("status", "not_found"), [(404, True), (410, True), (500, False),
                                                   (403, False)])
def test_download_errors_carry_the_status(tmp_path: Path, status: int, not_found: bool) -> None:
    handler = handler_with(Statuses, requests=[], files={}, statuses={"/x": status})
    with served(handler) as base, pytest.raises(DownloadError) as info:
        fetch(f"{base}/x", tmp_path)
    assert (info.value.status, info.value.not_found) == (status, not_found)
    assert info.value.code is ExitCode.DOWNLOAD


def test_a_network_failure_has_no_status(tmp_path: Path) -> None:
    with served(_Quiet) as base:
        pass  # the port is closed again: nothing listens there now
    with pytest.raises(DownloadError) as info:
        fetch(f"{base}/x", tmp_path)
    assert info.value.status is None and not info.value.not_found
