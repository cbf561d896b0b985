"""`python -m testinputs.offline_build [COREOS-GPU BUILD FLAGS]`: the main job, offline.

Runs the real `coreos-gpu build` pipeline against the test inputs instead of Flatcar's and
NVIDIA's servers: the Flatcar test release is served on 127.0.0.1 as the mirror, and the
535.261.03 test .run is the driver. Extra arguments go to `coreos-gpu build` (for example
`--runtime bwrap --output /tmp/nvidia.tar.gz --kernel-module-type open`).
"""

from __future__ import annotations

import subprocess
import sys

from testinputs.flatcar import build_flatcar_release
from testinputs.nvidia_run import VERSION, build_nvidia_run
from testinputs.serve import serve_folder


def main(argv: list[str]) -> int:
    release = build_flatcar_release()
    run_file = build_nvidia_run()
    with serve_folder(release.server_root) as mirror:
        command = [sys.executable, "-m", "coreos_gpu", "build", "--mirror", mirror,
                   "--release", release.version,
                   "--signing-key-fingerprint", release.key_fingerprint,
                   "--driver-url", str(run_file), "--driver-version", VERSION, *argv]
        print("+ " + " ".join(command[2:]), file=sys.stderr, flush=True)
        return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
