"""Time `coreos-gpu devcontainer prepare` of the Flatcar test release over HTTP on 127.0.0.1
against DESIGN.md's targets: cold prepare (download, verify, unpack) ≤ 1.3 times decompressing the
image alone (timed on the same machine right before: `lbzip2 -dc` into a file beside the
cache, as decompressing an image means; into /dev/null too, for the CPU-bound part alone),
peak extra disk during it ≤ the ROOT partition + 1 GiB, the cache ≤ 1 GiB per release; then
the warm (cached) run, and where the cold run's time goes.

Run from the repository root, as root:

    .venv/bin/python -m bench.devcontainer_prepare              # the toy image (~70 MB)
    .venv/bin/python -m bench.devcontainer_prepare --real-size  # Flatcar's size (~480 MB)

--real-size builds its release on first use (~7 min on 2 cores, ~13 GB of free disk; cached
in the test-input cache) and its cold run needs ~13 GB free where the temporary cache lives
($TMPDIR). Figures are of one run: a busy machine (see the load average) skews wall times
(CPU times less), and peak disk is the file system's free space, so other writers count too.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testinputs.flatcar import FlatcarRelease, build_flatcar_release
from testinputs.serve import serve_folder

GIB = 1 << 30
MIB = 1 << 20
RATIO_TARGET = 1.3  # cold prepare / decompressing alone
DISK_MARGIN = GIB  # peak extra disk: at most the ROOT partition plus this
CACHE_TARGET = GIB  # per release
ROOT_PARTITION = 9
SECTOR = 512


def decompressor() -> list[str]:
    """lbzip2 where present (what prepare uses), else bzip2."""
    return ["lbzip2" if shutil.which("lbzip2") else "bzip2", "-dc"]


def run_timed(argv: list[str], **options: Any) -> tuple[str, float, float]:
    """Run argv; → (its stderr, wall seconds, CPU seconds of it and its children). CPU time is
    what the figures rest on when other work shares the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, check=True, stderr=subprocess.PIPE, text=True, **options)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done.stderr, wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def read_root_partition_size(image: Path) -> int:
    """Partition 9's size in bytes, from the GPT at the head of the decompressed image."""
    proc = subprocess.Popen([*decompressor(), str(image)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    head = proc.stdout.read(34 * SECTOR)  # protective MBR, GPT header, 128 entries
    proc.kill()
    proc.wait()
    entries_lba, _, entry_size = struct.unpack_from("<QII", head, SECTOR + 72)
    entry = entries_lba * SECTOR + (ROOT_PARTITION - 1) * entry_size
    first, last = struct.unpack_from("<QQ", head, entry + 32)
    return int(last - first + 1) * SECTOR


class PeakDiskUse:
    """While open, poll the free space of the file system holding path every 0.1 s; peak is
    the most it fell below its free space at the start."""

    def __init__(self, path: Path) -> None:
        self.path, self.peak = path, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.baseline - self._free())

    def __enter__(self) -> PeakDiskUse:
        self.baseline = self._free()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.baseline - self._free())


def allocated_bytes(folder: Path) -> int:
    """Disk the folder's files take (st_blocks, so sparse files count what they hold), each
    inode once, a hard-linked one too: a link into another cache is still disk the entry
    keeps in use."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total + os.lstat(folder).st_blocks * 512


def prepare_argv(release: FlatcarRelease, mirror: str) -> list[str]:
    return [sys.executable, "-m", "coreos_gpu", "devcontainer", "prepare", "--mirror", mirror,
            "--release", release.version, "--signing-key-fingerprint", release.key_fingerprint]


def imported_from(env: dict[str, str]) -> str:
    """Which coreos_gpu the prepare runs import (PYTHONPATH may point at another checkout)."""
    return subprocess.run([sys.executable, "-c", "import coreos_gpu; print(coreos_gpu.__file__)"],
                          env=env, check=True, capture_output=True, text=True).stdout.strip()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render_size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


@dataclass(frozen=True)
class Figures:
    module: str  # the coreos_gpu file the prepare runs imported
    load: tuple[float, float, float]  # before the runs
    partition: int  # ROOT's size in bytes
    decompress_s: float  # into a file
    decompress_cpu_s: float
    discard_s: float  # into /dev/null
    cold_s: float
    cold_cpu_s: float
    peak_disk: int  # bytes below the free space before the cold run
    cached: dict[str, int]  # disk per devcontainers/<digest> entry
    cache_total: int  # disk of the whole cache, the downloaded image included
    warm_s: float
    steps: list[str]  # the cold run's "done in" lines


def measure(release: FlatcarRelease, cache: Path) -> Figures:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    module, load = imported_from(env), os.getloadavg()
    partition = read_root_partition_size(release.image)
    _, discard_s, _ = run_timed([*decompressor(), str(release.image)],
                                stdout=subprocess.DEVNULL)
    raw = cache / "image.raw"
    with raw.open("wb") as out:
        _, decompress_s, decompress_cpu_s = run_timed([*decompressor(), str(release.image)],
                                                      stdout=out)
    raw.unlink()
    with serve_folder(release.server_root) as mirror:
        argv = prepare_argv(release, mirror)
        with PeakDiskUse(cache) as disk:
            cold_log, cold_s, cold_cpu_s = run_timed(argv, env=env, stdout=subprocess.PIPE)
        entries = cache / "coreos-gpu/devcontainers"
        cached = {entry.name: allocated_bytes(entry) for entry in entries.iterdir()
                  if entry.is_dir() and not entry.name.startswith(".")}
        cache_total = allocated_bytes(cache)
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        warm_s = time.perf_counter() - start
    return Figures(module=module, load=load, partition=partition, decompress_s=decompress_s,
                   decompress_cpu_s=decompress_cpu_s, discard_s=discard_s, cold_s=cold_s,
                   cold_cpu_s=cold_cpu_s,
                   peak_disk=disk.peak, cached=cached, cache_total=cache_total, warm_s=warm_s,
                   steps=[line.strip() for line in cold_log.splitlines() if ": done in" in line])


def render_row(label: str, value: str, target: str, *, ok: bool) -> str:
    return f"  {label:<17}{value:<40}target {target:<28}{verdict(ok)}"


def render(release: FlatcarRelease, f: Figures, *, real_size: bool) -> str:
    ratio = f.cold_s / f.decompress_s
    disk_target = f.partition + DISK_MARGIN
    lines = [
        f"devcontainer prepare {release.version}, {'real size' if real_size else 'toy'}: "
        f"{render_size(release.image.stat().st_size)} .bin.bz2, ROOT partition "
        f"{render_size(f.partition)}",
        f"  coreos_gpu: {f.module}",
        f"  load average before: {' '.join(f'{x:.2f}' for x in f.load)}",
        f"  decompress alone ({' '.join(decompressor())} > file): {f.decompress_s:.1f} s "
        f"(> /dev/null: {f.discard_s:.1f} s)",
        render_row("cold prepare:", f"{f.cold_s:.1f} s = {ratio:.2f}x decompress",
                   f"<= {RATIO_TARGET:.2f}x", ok=ratio <= RATIO_TARGET),
        f"                   = {f.cold_s / f.discard_s:.2f}x decompressing into /dev/null",
        f"  CPU time:        {f.cold_cpu_s:.1f} s = {f.cold_cpu_s / f.decompress_cpu_s:.2f}x "
        f"decompress's {f.decompress_cpu_s:.1f} s (what other work on the machine skews least)",
        render_row("peak extra disk:", render_size(f.peak_disk),
                   f"<= {render_size(disk_target)} (ROOT + 1 GiB)", ok=f.peak_disk <= disk_target),
    ]
    lines += [render_row("cached:", f"{render_size(size)} (devcontainers/{name[:12]}…)",
                         f"<= {render_size(CACHE_TARGET)} per release", ok=size <= CACHE_TARGET)
              for name, size in sorted(f.cached.items())]
    lines += [f"  whole cache after: {render_size(f.cache_total)} (the downloaded image too)",
              f"  warm prepare:    {f.warm_s:.2f} s", "  steps (cold):"]
    lines += [f"    {step}" for step in f.steps]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.devcontainer_prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-size", action="store_true",
                        help="the release padded to Flatcar's size (~480 MB, ~6 GB unpacked)")
    args = parser.parse_args()
    release = build_flatcar_release(real_size=args.real_size)
    with tempfile.TemporaryDirectory(prefix="bench-devcontainer-") as cache:
        figures = measure(release, Path(cache))
    print(render(release, figures, real_size=args.real_size))


if __name__ == "__main__":
    main()
