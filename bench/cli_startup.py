"""Start-up time of the `coreos-gpu` command: `coreos-gpu --help` and `coreos-gpu build --help`,
each a fresh process of the venv's console script (what a user's shell and completion run).

Target (issue 27): ≤ 0.15 s. Both print the parser's help and exit, so the figure is
Python's own start, the imports `coreos_gpu.cli` needs to build its parser, and the parser:
a verb's heavy modules (rich, httpx, cryptography, elftools, ...) are not in it.
Every figure: the median of RUNS runs and their spread (min-max), after one warm-up run (the
page cache and .pyc files), and the median CPU time (user + system) of the process, which a
busy machine skews less than wall time; the load average is printed beside them.
Run from the repository root: .venv/bin/python -m bench.cli_startup
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 21
TARGET = 0.15  # seconds


def console_script() -> str:
    """The venv's `coreos-gpu`, beside the Python that runs this bench."""
    beside = Path(sys.executable).parent / "coreos-gpu"
    found = str(beside) if beside.is_file() else shutil.which("coreos-gpu")
    if not found:
        sys.exit("no coreos-gpu console script: install the project (pip install -e .)")
    return found


def timed(argv: list[str]) -> tuple[float, float]:
    """Run argv; → (wall seconds, CPU seconds of it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def show(argv: list[str]) -> str:
    timed(argv)  # warm-up: .pyc files written, the interpreter and modules in the page cache
    runs = [timed(argv) for _ in range(RUNS)]
    wall = [w for w, _ in runs]
    median = statistics.median(wall)
    verdict = "ok" if median <= TARGET else "over"
    return (f"{median:.3f} s ({min(wall):.3f}-{max(wall):.3f}; cpu "
            f"{statistics.median(c for _, c in runs):.3f} s)  target <= {TARGET} s: {verdict}")


def main() -> None:
    script = console_script()
    print(f"{script}; median (min-max) of {RUNS} runs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for args in (["--help"], ["build", "--help"]):
        print(f"coreos-gpu {' '.join(args):<14} {show([script, *args])}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
