"""`python -m testinputs.offline_build [COREOS-GPU BUILD FLAGS]`: the main job, offline.

Runs the real `coreos-gpu build` pipeline against the test inputs instead of Flatcar's and
NVIDIA's servers: the Flatcar test release is served on 127.0.0.1 as the mirror, and the
535.261.03 test .run is the driver. Extra arguments go to `coreos-gpu build` (for example
`--runtime bwrap --output /tmp/nvidia.tar.gz --kernel-module-type open`).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from testinputs.flatcar import build_flatcar_release
from testinputs.nvidia_run import VERSION, build_nvidia_run


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    release = build_flatcar_release()
    run_file = build_nvidia_run()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_Quiet, directory=str(release.server_root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    command = [sys.executable, "-m", "coreos_gpu", "build",
               "--mirror", f"http://127.0.0.1:{server.server_address[1]}",
               "--release", release.version,
               "--signing-key-fingerprint", release.key_fingerprint,
               "--driver-url", str(run_file), "--driver-version", VERSION, *argv]
    print("+ " + " ".join(command[2:]), file=sys.stderr, flush=True)
    try:
        return subprocess.run(command, check=False).returncode
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
