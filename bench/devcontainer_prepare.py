"""Time `coreos-gpu devcontainer prepare` of the Flatcar test release over HTTP on 127.0.0.1:
cold (download, verify, unpack) and warm (cached), and show where the time goes.

Run from the repository root, as root: .venv/bin/python -m bench.devcontainer_prepare
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from testinputs.flatcar import build_flatcar_release
from testinputs.serve import serve_folder


def main() -> None:
    release = build_flatcar_release()
    with serve_folder(release.server_root) as mirror, \
            tempfile.TemporaryDirectory() as cache:
        argv = [sys.executable, "-m", "coreos_gpu", "devcontainer", "prepare", "--mirror",
                mirror, "--release", release.version,
                "--signing-key-fingerprint", release.key_fingerprint]
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        start = time.perf_counter()
        cold = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        warm_s = time.perf_counter() - start
    print(f"devcontainer prepare {release.version} ({release.image.stat().st_size >> 20} MiB "
          f".bin.bz2)")
    print(f"  cold: {cold_s:.1f} s   warm: {warm_s:.2f} s")
    print("  steps (cold):")
    for line in cold.stderr.splitlines():
        if ": done in" in line:
            print("   " + line.strip())


if __name__ == "__main__":
    main()
