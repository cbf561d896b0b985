from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coreos_gpu.cache import sha256_of
from coreos_gpu.errors import CoreosGpuError, ExitCode
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
