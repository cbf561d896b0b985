"""Time `coreos-gpu driver inspect` on the 535 test .run: cold (empty cache) and warm.

Target (issue 2): the warm run prints its table in under 10 s.
Run from the repository root: .venv/bin/python -m bench.driver_inspect
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from testinputs.nvidia_run import build_nvidia_run


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    run_file = build_nvidia_run()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        argv = [sys.executable, "-m", "coreos_gpu", "driver", "inspect", str(run_file)]
        cold = timed(argv, env)
        warm = [timed(argv, env) for _ in range(3)]
    print(f"driver inspect {run_file.name} ({run_file.stat().st_size / 2**20:.0f} MiB)")
    print(f"  cold (extract + parse): {cold:.2f} s")
    print(f"  warm (cached), best of 3: {min(warm):.2f} s  (target < 10 s)")


if __name__ == "__main__":
    main()
