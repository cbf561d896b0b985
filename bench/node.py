"""Node-side speed: install_nvidia.sh against a plain copy of the payload, and startup.sh.

Targets (DESIGN.md): node install ≤ 1.5 x a plain copy of the payload; startup.sh,
excluding the kernel's own module init, ≤ 0.5 s. Measured in one run on one disk:
  1. plain copy: `cp -a payload/<driver>/. DEST` then `sync -f DEST` (the install syncs too,
     so a power cut cannot leave a renamed but empty driver), and without the sync,
  2. install: `install_nvidia.sh --root R --no-enable` (checks the bundle's shape, copies it
     into a staging folder, checks the shape there, sets owner and modes, checks every file
     against SHA256SUMS there, ldconfig -n, syncs, renames, links, real `ldconfig -r`),
  3. startup: `startup.sh --root R` on a fake 8-GPU node whose insmod, modprobe,
     nvidia-smi and uname are stand-ins (tests/nodetree.py): modules, device nodes, firmware.
The median of five runs each. Run from the repository root, as root:
  .venv/bin/python -m bench.node ARCHIVE     (an archive from `coreos-gpu build`)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.nodetree import EIGHT_GPUS, Node

RUNS = 5


def median_time(prepare: Callable[[int], list[str]], env: dict[str, str] | None = None) -> float:
    times = []
    for i in range(RUNS):
        argv = prepare(i)
        subprocess.run(["sync"], check=True)  # no run pays for an earlier one's writes
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(archive: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch_dir:
        scratch = Path(scratch_dir)
        bundle = scratch / "bundle"
        bundle.mkdir()
        subprocess.run(["tar", "xf", archive, "-C", bundle], check=True)
        [payload] = (bundle / "payload").iterdir()
        size = sum(p.stat().st_size for p in payload.rglob("*")
                   if p.is_file() and not p.is_symlink())

        def copy_to(i: int, *, sync: bool) -> list[str]:
            dest = scratch / f"copy-{sync}-{i}"
            dest.mkdir()
            script = f'cp -a "{payload}/." "{dest}/"' + (f' && sync -f "{dest}"' if sync else "")
            return ["sh", "-c", script]

        def install_into(i: int) -> list[str]:
            root = scratch / f"root-{i}"
            (root / "etc").mkdir(parents=True)
            (root / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
            return ["sh", str(bundle / "install_nvidia.sh"), "--root", str(root), "--no-enable"]

        copy = median_time(lambda i: copy_to(i, sync=True))
        copy_nosync = median_time(lambda i: copy_to(i, sync=False))
        install = median_time(install_into)

        node = Node(scratch / "node")
        for bus, minor in EIGHT_GPUS.items():
            node.add_gpu(bus, minor)
        (node.bin / "ldconfig").unlink()  # nothing to fake: the real one runs, as on a node
        assert node.install(bundle).code == 0

        def fresh_node(i: int) -> list[str]:
            (node.root / "proc/modules").write_text("drm 1 0 - Live 0x0\n")
            shutil.rmtree(node.root / "sys/module/nvidia", ignore_errors=True)
            for dev in (node.root / "dev").glob("nvidia*"):
                dev.unlink()
            return ["sh", str(node.root / "opt/nvidia/startup.sh"), "--root", str(node.root)]

        startup = median_time(fresh_node, env=node.env)

    print(f"payload: {size / 2**20:.1f} MiB in {payload.name}/ (median of {RUNS} runs each)")
    print(f"plain copy + sync: {copy:.2f} s   (without sync: {copy_nosync:.2f} s)")
    print(f"install_nvidia.sh: {install:.2f} s = {install / copy:.2f} x the plain copy + sync "
          f"(target <= 1.5), {install / copy_nosync:.2f} x the copy without sync")
    print(f"startup.sh, 8 GPUs, stand-in insmod: {startup:.3f} s (target <= 0.5)")


if __name__ == "__main__":
    if len(sys.argv) != 2 or os.geteuid() != 0:
        sys.exit("usage (as root): python -m bench.node ARCHIVE")
    main(Path(sys.argv[1]))
