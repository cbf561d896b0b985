"""Build overhead and unchanged-rebuild time of `coreos-gpu build`, on the test inputs.

Targets (DESIGN.md): a cold build ≤ 1.15 x a raw `make modules` of the same sources on the
same tree; an unchanged rebuild ≤ 3 s. Measured in one run, so both see the same machine:
  1. raw: `make -C kernel SYSSRC SYSOUT -jN modules` in the developer container (bwrap),
  2. cold: `coreos-gpu build` with an empty cache (download, verify, unpack, compile, strip,
     check, archive),
  3. warm: the same build again.
Run from the repository root, as root: .venv/bin/python -m bench.build  (about 10 minutes)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.driver_inspect import timed
from coreos_gpu.cache import link_tree
from coreos_gpu.config import Runtime
from coreos_gpu.devcontainer import DevRoot
from coreos_gpu.driver import load_driver
from coreos_gpu.modules import SOURCES_IN_SANDBOX, _kernel_source
from coreos_gpu.sandbox import Bind, SandboxSpec, run_in_sandbox
from testinputs.flatcar import build_flatcar_release
from testinputs.nvidia_run import VERSION, build_nvidia_run
from testinputs.serve import serve_folder

JOBS = os.cpu_count() or 1


def main() -> None:
    release, run_file = build_flatcar_release(), build_nvidia_run()
    with serve_folder(release.server_root) as mirror, \
            tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        env = {**os.environ, "XDG_CACHE_HOME": str(scratch / "cache")}
        build = [sys.executable, "-m", "coreos_gpu", "build", "--mirror", mirror,
                 "--release", release.version,
                 "--signing-key-fingerprint", release.key_fingerprint, "--driver-url",
                 str(run_file), "--driver-version", VERSION, "--runtime", "bwrap",
                 "--jobs", str(JOBS), "--output", str(scratch / "nvidia.tar.gz")]
        cold = timed(build, env)
        warm = timed(build, env)
        # The raw compile, on the developer container root the build just unpacked.
        [entry] = (scratch / "cache/coreos-gpu/devcontainers").glob("[0-9a-f]*[0-9a-f]")
        root = entry / "root"
        build_dir = next(root.glob("usr/lib/modules/*/build"))
        devroot = DevRoot(root=root, kernel_release=build_dir.parent.name,
                          build_dir="/" + str(build_dir.relative_to(root)),
                          image_sha256=entry.name, release=None)  # type: ignore[arg-type]
        package = load_driver(run_file, scratch / "cache/coreos-gpu")
        sources = scratch / "raw"
        link_tree(package.kernel_source_dir(package.flavours[0]), sources)
        start = time.perf_counter()
        run_in_sandbox(
            SandboxSpec(root=root, mounts=(Bind(sources, SOURCES_IN_SANDBOX),)),
            ["make", "-C", SOURCES_IN_SANDBOX, f"SYSSRC={_kernel_source(devroot)}",
             f"SYSOUT={devroot.build_dir}", f"-j{JOBS}", "modules"],
            runtime=Runtime.BWRAP, log_file=scratch / "raw.log", what="raw make")
        raw = time.perf_counter() - start
        shutil.rmtree(sources)
    print(f"raw make modules (-j{JOBS}):         {raw:6.1f} s")
    print(f"coreos-gpu build, cold cache:     {cold:6.1f} s  = {cold / raw:.2f} x raw "
          "(target <= 1.15)")
    print(f"coreos-gpu build, unchanged:      {warm:6.1f} s  (target <= 3 s)")


if __name__ == "__main__":
    main()
