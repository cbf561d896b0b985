from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """The error and hint lines, without the step log lines before them."""
        return [line for line in self.stderr.splitlines() if line.startswith("coreos-gpu: ")]


def run_cli(*argv: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None,
            cache: Path | None = None) -> CliResult:
    """Run the real `coreos-gpu` command (as `python -m coreos_gpu`) in cwd."""
    full_env = {**os.environ, **(env or {})}
    if cache is not None:
        full_env["XDG_CACHE_HOME"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "coreos_gpu", *map(str, argv)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600, check=False)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path: Path):  # type: ignore[no-untyped-def]
    """run_cli in a fresh folder with a fresh cache."""
    cache = tmp_path / "cache"

    def invoke(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> CliResult:
        return run_cli(*argv, cwd=tmp_path, env=env, cache=cache)

    return invoke


@pytest.fixture(scope="session")
def nvidia_run() -> Path:
    """The real-format NVIDIA-Linux-x86_64-535.261.03.run built from Debian's packages."""
    from testinputs.nvidia_run import build_nvidia_run

    return build_nvidia_run()


@pytest.fixture
def http_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An HTTP server on 127.0.0.1 serving a fresh folder; yields (folder, base URL)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
