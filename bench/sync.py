"""`coreos-gpu sync` against plain builds, on the test server's three releases.

Targets (DESIGN.md): a sync of K releases with k distinct kernels ≈ k builds (≤ 1.1 x); an
unchanged sync ≤ 5 s. The test server has K = 3 releases on two channels and k = 2 kernel
trees (beta 4081.1.0 and stable 4081.2.0 share one). Measured in one run, each from an empty
cache, so all see the same machine:
  1. one cold `coreos-gpu build` of each distinct kernel's release (3975.2.2, 4081.2.0),
  2. a cold `coreos-gpu sync` of all three into an empty repository,
  3. the same sync again, three times (nothing to do: the feeds and the index are read).
Run from the repository root, as root: .venv/bin/python -m bench.sync  (about 15 minutes)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.driver_inspect import timed
from testinputs.flatcar import BETA, FIRST, UPDATE, build_flatcar_release
from testinputs.nvidia_run import VERSION, build_nvidia_run
from testinputs.serve import serve_folder

JOBS = os.cpu_count() or 1


def main() -> None:
    release, run_file = build_flatcar_release(), build_nvidia_run()
    with serve_folder(release.server_root) as mirror, \
            tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        common = ["--mirror", mirror, "--signing-key-fingerprint", release.key_fingerprint,
                  "--driver-url", str(run_file), "--driver-version", VERSION,
                  "--runtime", "bwrap", "--jobs", str(JOBS)]
        builds = {}
        for spec in (FIRST, UPDATE):  # one release of each distinct kernel tree
            env = {**os.environ, "XDG_CACHE_HOME": str(scratch / f"cache-{spec.version}")}
            builds[spec.version] = timed(
                [sys.executable, "-m", "coreos_gpu", "build", *common, "--channel",
                 spec.channel, "--release", spec.version, "--output",
                 str(scratch / f"{spec.version}.tar.gz")], env)
        key = scratch / "repo.key"
        subprocess.run([sys.executable, "-m", "coreos_gpu", "keygen", "--output", str(key)],
                       check=True, stdout=subprocess.DEVNULL)
        sync = [sys.executable, "-m", "coreos_gpu", "sync", *common,
                "--repository", f"file://{scratch / 'repo'}", "--repository-key", f"{key}.pub",
                "--publish-key", str(key), "--sync-channel", "beta", "--sync-channel", "stable"]
        env = {**os.environ, "XDG_CACHE_HOME": str(scratch / "cache-sync")}
        cold = timed(sync, env)
        unchanged = [timed(sync, env) for _ in range(3)]
    k_builds = sum(builds.values())
    for version, seconds in builds.items():
        print(f"coreos-gpu build {version}, cold:        {seconds:6.1f} s")
    print(f"sync of 3 releases ({BETA.version} beta + {UPDATE.version}, {FIRST.version} "
          f"stable), 2 kernels, cold: {cold:6.1f} s = {cold / k_builds:.2f} x the 2 builds "
          "(target <= 1.1)")
    print(f"sync, unchanged (median of 3):      {statistics.median(unchanged):6.1f} s "
          "(target <= 5 s)")


if __name__ == "__main__":
    main()
