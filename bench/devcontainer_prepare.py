"""Time `coreos-gpu devcontainer prepare` of the Flatcar test release over HTTP on 127.0.0.1:
cold (download, verify, unpack) and warm (cached), and show where the time goes.

Run from the repository root, as root: .venv/bin/python -m bench.devcontainer_prepare
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from testinputs.flatcar import build_flatcar_release


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    release = build_flatcar_release()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Quiet, directory=str(release.server_root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    argv = [sys.executable, "-m", "coreos_gpu", "devcontainer", "prepare", "--mirror",
            f"http://127.0.0.1:{server.server_address[1]}", "--release", release.version,
            "--signing-key-fingerprint", release.key_fingerprint]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        start = time.perf_counter()
        cold = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        warm_s = time.perf_counter() - start
    server.shutdown()
    print(f"devcontainer prepare {release.version} ({release.image.stat().st_size >> 20} MiB "
          f".bin.bz2)")
    print(f"  cold: {cold_s:.1f} s   warm: {warm_s:.2f} s")
    print("  steps (cold):")
    for line in cold.stderr.splitlines():
        if ": done in" in line:
            print("   " + line.strip())


if __name__ == "__main__":
    main()
