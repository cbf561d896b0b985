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


def test_a_cut_download_without_validator_starts_over(http_dir: Mirror, tmp_path: Path) -> None:
    # The test mirror sends neither ETag nor Last-Modified: nothing tells the retry that the
    # file is still the one whose first bytes it holds, so it takes the file whole again.
    url = _serve(http_dir, "big.bin")
    http_dir.cut_once["/big.bin"] = 300_000
    path = fetch(url, tmp_path)
    assert path.read_bytes() == DATA
    assert http_dir.ranges_seen == []


def test_truncated_download_fails_after_retries(http_dir: Mirror, tmp_path: Path) -> None:
    url = _serve(http_dir, "big.bin")
    http_dir.cut_after["/big.bin"] = 1000  # every response, ranged or not, is cut short
    with pytest.raises(CoreosGpuError) as info:
        fetch(url, tmp_path)
    assert info.value.code is ExitCode.INCOMPLETE
    assert "stopped at" in info.value.message and f"of {len(DATA)} bytes" in info.value.message
    assert "starts over" in info.value.hint
    assert http_dir.ranges_seen == []
    assert cached(url, tmp_path) is None
    assert _entries(tmp_path) == []  # bytes no later run can resume are not kept


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


class Encoded(_Quiet):
    """Sends `body` with Content-Encoding: `encoding`, whatever the client asked for (as
    servers that compress anyway do, and S3 objects with that metadata)."""

    body: ClassVar[bytes]
    encoding: ClassVar[str]

    def do_GET(self) -> None:
        self.start()
        self.send_response(200)
        self.send_header("Content-Encoding", self.encoding)
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_a_server_that_compresses_anyway_is_refused(tmp_path: Path) -> None:
    handler = handler_with(Encoded, requests=[], body=_gzipped(DATA), encoding="gzip")
    with served(handler) as base:
        url = f"{base}/image.bin.bz2"
        with pytest.raises(DownloadError) as info:
            fetch(url, tmp_path)
    # Stored, the gzip bytes would pass for the file; decoded, Content-Length and a resume's
    # Range would count bytes of the other stream. So neither: one line, and not retried.
    assert info.value.code is ExitCode.DOWNLOAD and not info.value.not_found
    assert info.value.message == (f"download of {url} failed: the server sent it with "
                                  "Content-Encoding: gzip although asked for none "
                                  "(Accept-Encoding: identity)")
    assert "without Content-Encoding" in info.value.hint
    assert [r.get("Accept-Encoding") for r in handler.requests] == ["identity"]
    assert cached(url, tmp_path) is None
    assert _entries(tmp_path) == []


def test_content_encoding_identity_is_the_file(tmp_path: Path) -> None:
    handler = handler_with(Encoded, requests=[], body=DATA, encoding="Identity")
    with served(handler) as base:
        assert fetch(f"{base}/a.bin", tmp_path).read_bytes() == DATA


OLD_DATE = "Tue, 01 Oct 2024 10:00:00 GMT"


class Versioned(_Quiet):
    """Serves `body` as nginx does a static file: with the `validators` headers (ETag,
    Last-Modified), a Range honoured where If-Range names a current validator (or is absent),
    else the whole file (200); `ignores_if_range` honours every Range. Cuts the next
    responses after `cuts` bytes each; `date` replaces the Date header;
    `encoding_on_range` is a Content-Encoding for the 206 responses."""

    body: ClassVar[bytes]
    validators: ClassVar[dict[str, str]]
    cuts: ClassVar[list[int]]
    ignores_if_range: ClassVar[bool] = False
    date: ClassVar[str] = ""
    encoding_on_range: ClassVar[str] = ""

    def date_time_string(self, timestamp: float | None = None) -> str:
        return self.date or super().date_time_string(timestamp)

    def do_GET(self) -> None:
        start = self.start()
        if_range = self.headers.get("If-Range")
        if (if_range is not None and not self.ignores_if_range
                and if_range not in self.validators.values()):
            start = 0
        self.send_response(206 if start else 200)
        for name, value in self.validators.items():
            self.send_header(name, value)
        if start and self.encoding_on_range:
            self.send_header("Content-Encoding", self.encoding_on_range)
        self.send_header("Content-Length", str(len(self.body) - start))
        if start:
            self.send_header("Content-Range",
                             f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        self.end_headers()
        cut = self.cuts.pop(0) if self.cuts else None
        self.wfile.write(self.body[start:][:cut])
        self.close_connection = cut is not None


@pytest.mark.parametrize(("validators", "date", "if_range"), [
    ({"ETag": '"v1"', "Last-Modified": OLD_DATE}, "", '"v1"'),
    ({"Last-Modified": OLD_DATE}, "", OLD_DATE),
    # A weak tag: neither it nor (RFC 9110 §13.1.5) the date may guard a range.
    ({"ETag": 'W/"v1"', "Last-Modified": OLD_DATE}, "", None),
    # Modified in the second the response was sent: a second version could share the date.
    ({"Last-Modified": OLD_DATE}, OLD_DATE, None),
    ({"Last-Modified": "not a date"}, "", None),
])
def test_a_retry_resumes_only_against_a_strong_validator(
        tmp_path: Path, validators: dict[str, str], date: str, if_range: str | None) -> None:
    handler = handler_with(Versioned, requests=[], body=DATA, validators=validators,
                           cuts=[300_000], date=date)
    with served(handler) as base:
        path = fetch(f"{base}/a.bin", tmp_path)
    assert path.read_bytes() == DATA
    assert len(handler.requests) == 2
    assert handler.requests[1].get("If-Range") == if_range
    assert handler.requests[1].get("Range") == ("bytes=300000-" if if_range else None)
    assert list((tmp_path / "downloads" / "partial").iterdir()) == []


@pytest.mark.parametrize("ignores_if_range", [False, True])
def test_a_file_changed_between_runs_comes_whole(tmp_path: Path, ignores_if_range: bool) -> None:
    handler = handler_with(Versioned, requests=[], body=DATA, validators={"ETag": '"v1"'},
                           cuts=[300_000] * 3, ignores_if_range=ignores_if_range)
    with served(handler) as base:
        url = f"{base}/a.bin"
        with pytest.raises(CoreosGpuError) as info:
            fetch(url, tmp_path)
        assert info.value.code is ExitCode.INCOMPLETE
        assert info.value.hint == "run the command again to resume it"
        key = hashlib.sha256(url.encode()).hexdigest()
        assert _entries(tmp_path) == [f"partial/{key}", f"partial/{key}.validator"]
        # A mirror updates the file before the next run.
        new = random.Random(22).randbytes(len(DATA))
        handler.body, handler.validators = new, {"ETag": '"v2"'}
        path = fetch(url, tmp_path)
    assert path.read_bytes() == new  # not the old 900000 bytes and the new file's tail
    resume = handler.requests[3]
    assert (resume["Range"], resume["If-Range"]) == ("bytes=900000-", '"v1"')
    # A server that ignores If-Range sends the new tail (206, ETag "v2"): dropped, then whole.
    assert len(handler.requests) == (5 if ignores_if_range else 4)
    assert _entries(tmp_path) == sorted([f"sha256/{path.name}", f"urls/{key}.json"])


def test_a_resume_the_server_compresses_is_refused(tmp_path: Path) -> None:
    # The first attempt gets plain bytes and is cut; the mirror then compresses the rest.
    handler = handler_with(Versioned, requests=[], body=DATA, validators={"ETag": '"v1"'},
                           cuts=[300_000], encoding_on_range="gzip")
    with served(handler) as base:
        url = f"{base}/a.bin"
        with pytest.raises(DownloadError, match="Content-Encoding: gzip"):
            fetch(url, tmp_path)
    assert handler.requests[1]["Range"] == "bytes=300000-"
    assert cached(url, tmp_path) is None
    assert not [e for e in _entries(tmp_path) if e.startswith(("sha256", "urls"))]


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


def _stale_partial(cache: Path, url: str, data: bytes, *, etag: str | None = '"v1"') -> None:
    """What an interrupted download of an older version of url left behind: its bytes, and
    the ETag they were served with (none: a crash, or coreos-gpu before validators)."""
    partial = cache / "downloads" / "partial"
    partial.mkdir(parents=True)
    key = hashlib.sha256(url.encode()).hexdigest()
    (partial / key).write_bytes(data)
    if etag is not None:
        (partial / f"{key}.validator").write_text(json.dumps({"header": "etag", "value": etag}))


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
    assert [r.get("If-Range") for r in handler.requests] == ['"v1"', None]
    assert list((tmp_path / "downloads" / "partial").iterdir()) == []


@pytest.mark.parametrize("etag", ['"v1"', None])
def test_a_stale_partial_on_the_plain_mirror(http_dir: Mirror, tmp_path: Path,
                                             etag: str | None) -> None:
    # The test mirror answers 416 to a range past the end, as SimpleHTTPRequestHandler would.
    # A partial without its validator is not resumed at all: nothing asks for its range.
    url = _serve(http_dir, "a.bin")
    _stale_partial(tmp_path, url, DATA + b"x", etag=etag)
    assert fetch(url, tmp_path).read_bytes() == DATA
    assert http_dir.ranges_seen == ([f"bytes={len(DATA) + 1}-"] if etag else [])
    assert list((tmp_path / "downloads" / "partial").iterdir()) == []


class CutChunked(_Quiet):
    """Sends `body` chunked (no Content-Length), hanging up mid-chunk on the first `cuts`
    responses, before the last chunk; serves ranges (206, chunked) for the resume."""

    body: ClassVar[bytes]
    cuts: ClassVar[list[int]]  # one entry per response still to cut

    def do_GET(self) -> None:
        start = self.start()
        self.send_response(206 if start else 200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("ETag", '"chunked"')
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
    assert handler.requests[1]["If-Range"] == '"chunked"'


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
