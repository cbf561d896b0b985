"""The `coreos-gpu` command as a user runs it: into a pipe that closes early, and the exit codes
of missing and failing downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coreos_gpu.errors import ExitCode

from .conftest import CliResult
from .test_fetch import Statuses, handler_with, served

FEED_PATH = "www.flatcar.org/releases-json/releases-stable.json"


def _command() -> list[str]:
    """The installed console script, as a user runs it (`python -m` where there is none)."""
    script = Path(sys.executable).with_name("coreos-gpu")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "coreos_gpu"]


def _feed(count: int) -> bytes:
    return json.dumps({f"{3000 + i}.0.0": {"channel": "stable", "release_date": "2024-10-23",
                                           "major_software": {"kernel": ["6.6.56"]}}
                       for i in range(count)}).encode()


def _mirror(tmp_path: Path, count: int) -> str:
    feed = tmp_path / "mirror" / FEED_PATH
    feed.parent.mkdir(parents=True)
    feed.write_bytes(_feed(count))
    return (tmp_path / "mirror").as_uri()


def _start(tmp_path: Path, *argv: str, stdout: int,
           unbuffered: bool = False) -> subprocess.Popen[bytes]:
    # Python buffers stdout into a pipe unless PYTHONUNBUFFERED is set (as CI sometimes does);
    # a closed pipe then shows at a later write or only at exit: both must be quiet.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([*_command(), *argv], cwd=tmp_path, env=env, stdout=stdout,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_pipe_closed_after_one_line(tmp_path: Path, json_flag: list[str],
                                      unbuffered: bool) -> None:
    # `coreos-gpu releases | head -1`: far more output than a pipe holds, so coreos-gpu is
    # still writing when the reader leaves.
    mirror = _mirror(tmp_path, 30_000)
    proc = _start(tmp_path, "releases", "--mirror", mirror, *json_flag, stdout=subprocess.PIPE,
                  unbuffered=unbuffered)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == ExitCode.BROKEN_PIPE == 141
    assert first == (b"[\n" if json_flag else b"flatcar stable releases:\n")
    assert stderr == ""  # no traceback, no "Exception ignored", no error line


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_pipe_closed_before_the_first_write(tmp_path: Path, unbuffered: bool) -> None:
    # `coreos-gpu releases | true`: small output, which buffered stdout writes only at the end.
    mirror = _mirror(tmp_path, 3)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = _start(tmp_path, "releases", "--mirror", mirror, stdout=write_end,
                      unbuffered=unbuffered)
    finally:
        os.close(write_end)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.BROKEN_PIPE
    assert stderr.decode() == ""


def test_output_into_a_pipe_read_to_the_end(tmp_path: Path) -> None:
    mirror = _mirror(tmp_path, 30_000)
    proc = _start(tmp_path, "releases", "--mirror", mirror, stdout=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and stderr == b""
    assert stdout.count(b"\n") == 30_000 + 2  # the title, the header, a line per release
    assert stdout.endswith(b"3000.0.0   6.6.56  2024-10-23\n")


RELEASE = "stable.release.flatcar-linux.net/amd64-usr/3975.2.2"
IMAGE = f"{RELEASE}/flatcar_developer_container.bin.bz2"


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        (f"{RELEASE}/version.txt", 404, ExitCode.DOWNLOAD,
         "flatcar stable has no release 3975.2.2: "),
        (f"{RELEASE}/version.txt", 500, ExitCode.DOWNLOAD, "failed: HTTP 500"),
        (f"{IMAGE}.DIGESTS", 404, ExitCode.UNVERIFIABLE, ".DIGESTS does not exist (HTTP 404)"),
        (f"{IMAGE}.DIGESTS", 410, ExitCode.UNVERIFIABLE, ".DIGESTS does not exist (HTTP 410)"),
        (f"{IMAGE}.DIGESTS", 502, ExitCode.DOWNLOAD, ".DIGESTS failed: HTTP 502"),
        (f"{IMAGE}.sig", 404, ExitCode.UNVERIFIABLE, ".sig does not exist (HTTP 404)"),
        (FEED_PATH, 404, ExitCode.DOWNLOAD, "failed: HTTP 404"),  # `releases` needs the feed
        (FEED_PATH, 0, ExitCode.DOWNLOAD, "does not exist or is not a file"),  # file:// mirror
    ],
)
def test_missing_and_failing_downloads_exit_codes(cli, tmp_path: Path, path: str,  # type: ignore[no-untyped-def]
                                                  status: int, code: ExitCode,
                                                  message: str) -> None:
    files = {f"/{RELEASE}/version.txt": b"FLATCAR_VERSION=3975.2.2\n",
             f"/{FEED_PATH}": _feed(3), f"/{IMAGE}.DIGESTS": b"# SHA512 HASH\n"}
    handler = handler_with(Statuses, requests=[], files=files, statuses={f"/{path}": status})
    with served(handler) as base:
        argv = ["devcontainer", "prepare", "--release", "3975.2.2"]
        if path == FEED_PATH:
            argv = ["releases"]
        mirror = base if status else (tmp_path / "empty mirror").as_uri()
        result: CliResult = cli(*argv, "--mirror", mirror)
    assert result.code == code, result.stderr
    assert "Traceback" not in result.stderr
    [error, *_] = result.error_lines
    assert error.startswith("coreos-gpu: error: ") and message in error, error
