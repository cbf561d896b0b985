"""Node-side speed: install_nvidia.sh against a plain copy of the payload plus its checksum,
startup.sh, and the boots that follow an OS update.

Targets (DESIGN.md, raised in 2026-12): node install ≤ 1.2 x a plain copy of the payload plus
its checksum, with a cold page cache and with a warm one; startup.sh, excluding the kernel's
own module init, ≤ 0.5 s; a boot-time fetch ≤ the download + 1 s; a boot that switches to a
staged folder ≤ a plain startup.sh + 0.05 s. Measured in one run on one disk:
  1. the baseline: `cp -a payload/<driver>/. DEST`, then every copied file hashed with the
     tool the install uses (`openssl dgst -sha256 -r`, the SHA instructions; 8 files a call,
     one call per core at a time, as `xargs -P` deals them) and the sums compared with the
     bundle's SHA256SUMS entries for the payload, then `sync -f DEST` (the install syncs too,
     so a power cut cannot leave a renamed but empty driver); also the copy + sync alone,
  2. install: `install_nvidia.sh --root R --no-enable` from the extracted archive (checks the
     bundle's shape, copies it into a staging folder, checks the shape there, sets owner and
     modes, checks every file against SHA256SUMS there, ldconfig -n, syncs, renames; then
     the journal, the unit, drop-ins and links, real `ldconfig -r`),
  both cold (before each run `sync` and `echo 3 > /proc/sys/vm/drop_caches`: the payload,
  and the tools, are read from the disk; checked once with fincore and a timed read, and
  where the drop is refused, the payload's own pages are evicted instead with
  posix_fadvise(DONTNEED), which the output then says) and warm (the payload read once
  before each run),
  3. startup: `startup.sh --root R` on a fake 8-GPU node whose insmod, modprobe,
     nvidia-smi and uname are stand-ins (tests/nodetree.py): modules, device nodes, firmware,
  4. the download alone: fetch.sh's own `timeout … curl … -o FILE` of the bundle from a
     repository made by coreos-gpu's publish and served over HTTP on 127.0.0.1,
  5. boot-time fetch: `startup.sh --root R` on that node (bundle A installed, with the
     repository's key) booted into another kernel: fetch.sh reads and checks the signed
     index, downloads bundle B, checks its sha256, extracts it into its work folder,
     install_nvidia.sh --stage (which moves the extracted files into its staging folder
     rather than copying them), then the switch and B's startup.sh; its overhead is this
     minus the download (4).
     Its split by phase comes from five more runs of the same boot under `perf record` of
     the kernel's sched_process_exec and sched_process_exit tracepoints (when each of the
     node's own commands starts and ends; nothing stops the processes; the phases' sum is
     shown, to set beside the untraced boots): index = fetch.sh's start to the bundle's curl (the
     last before tar: its lock, the index download and signature check, the pick, the space
     check); download = that curl;
     sha256 = its end to tar (size and sha256 against the signed index); extract = tar
     (and zstd) to install_nvidia.sh; install --stage = install_nvidia.sh; tidy = its end to
     fetch.sh's (the work folder removed); switch + startup.sh = the rest of the boot
     (startup.sh before fetch.sh, the switch, B's startup.sh),
  6. staged boot: the same node with B staged already (install_nvidia.sh --stage), booted
     into B's kernel (the switch, then B's startup.sh), against a plain startup.sh of the
     same tree on A's kernel.
B is the archive relabelled for another kernel of the same length (6.1.0-50-amd64 becomes
6.1.0-51-amd64: the modules' folder, their vermagic, bundle.env, module-deps, MANIFEST.json,
node/contents and SHA256SUMS), so publish's inspect passes it, as a build for that kernel.
Every figure: the median of five runs and their spread (min-max), and, where it helps to read
a figure taken on a busy machine, the median CPU time (user + system) its processes used; the
load average is printed before and after. Run from the repository root, as root (two to three
minutes for a compute bundle):
  .venv/bin/python -m testinputs.offline_build --runtime bwrap --output /var/tmp/nvidia.tar.gz
  .venv/bin/python -m bench.node /var/tmp/nvidia.tar.gz     (or any `coreos-gpu build` archive;
                                         B keeps its compression: build with --compression zstd
                                         to see the fetch with zstd)
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu.cache import sha256_of
from coreos_gpu.keys import load_private_key, write_key_pair
from coreos_gpu.publish import publish
from coreos_gpu.stores import FolderStore
from testinputs.serve import serve_folder
from tests.nodetree import EIGHT_GPUS, Node, reseal

RUNS = 5
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass(frozen=True)
class Times:
    runs: tuple[float, ...]
    cpu: tuple[float, ...] = ()  # user + system seconds of each run's processes

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def show(self, digits: int = 2) -> str:
        cpu = f"; cpu {statistics.median(self.cpu):.{digits}f} s" if self.cpu else ""
        return (f"{self.median:.{digits}f} s ({min(self.runs):.{digits}f}-"
                f"{max(self.runs):.{digits}f}{cpu})")


class PageCache:
    """Makes the next run read its input from the disk: drop_caches where the kernel lets
    us, else the input's own pages evicted (posix_fadvise DONTNEED, after a sync)."""

    def __init__(self, files: Path) -> None:
        self.files = files
        self.how = "echo 3 > /proc/sys/vm/drop_caches"
        try:
            self.drop()
        except OSError as error:
            self.how = (f"posix_fadvise(DONTNEED) of the payload's files (drop_caches refused: "
                        f"{error.strerror})")

    def drop(self) -> None:
        subprocess.run(["sync"], check=True)
        if self.how.startswith("echo"):
            DROP_CACHES.write_text("3\n")
            return
        for path in self.files.rglob("*"):
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def warm(self) -> None:
        subprocess.run(["sh", "-c", f'find "{self.files}" -type f -exec cat {{}} + >/dev/null'],
                       check=True)

    def resident(self) -> int:
        """Bytes of the payload in the page cache (fincore)."""
        files = [str(p) for p in self.files.rglob("*") if p.is_file() and not p.is_symlink()]
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             check=True, capture_output=True, text=True).stdout
        return sum(int(n) for n in out.split())

    def check(self) -> str:
        """One line: that a drop empties the cache of the payload, by fincore and by time."""
        def read() -> float:
            start = time.perf_counter()
            self.warm()
            return time.perf_counter() - start
        self.warm()
        warm, warm_bytes = read(), self.resident()
        self.drop()
        cold_bytes = self.resident()
        cold = read()
        return (f"page cache: {self.how}; the payload resident {warm_bytes / 2**20:.0f} MiB "
                f"warm, {cold_bytes / 2**20:.1f} MiB after a drop; reading it {warm:.2f} s "
                f"warm, {cold:.2f} s cold")


def timed(prepare: Callable[[int], list[str]], *, env: dict[str, str] | None = None,
          before: Callable[[], None] | None = None) -> Times:
    """RUNS runs of prepare(i)'s argv; before() (a cache drop or warm-up) right before each."""
    times, cpu = [], []
    for i in range(RUNS):
        argv = prepare(i)
        subprocess.run(["sync"], check=True)  # no run pays for an earlier one's writes
        if before is not None:
            before()
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(now.ru_utime - used.ru_utime + now.ru_stime - used.ru_stime)
    return Times(tuple(times), tuple(cpu))


def other_kernel(kernel: str) -> str:
    """A kernel release of the same length: the last digit before the flavour, bumped
    (6.1.0-50-amd64 -> 6.1.0-51-amd64), so the modules' vermagic can be patched in place."""
    head = re.match(r"[0-9.-]*", kernel)
    digits = [i for i, c in enumerate(kernel[:head.end() if head else 0]) if c.isdigit()]
    i = digits[-1]
    return f"{kernel[:i]}{(int(kernel[i]) + 1) % 10}{kernel[i + 1:]}"


# tar's option for each compression a bundle may have, by the archive's suffix.
TAR_COMPRESSION = {".gz": "--gzip", ".xz": "--xz", ".zst": "--zstd"}


def relabel(archive: Path, tree: Path, output: Path) -> tuple[str, str]:
    """Extract archive into tree and make it the same driver built for another kernel,
    every claim agreeing, as output (compressed as archive); -> (its kernel, the other)."""
    tree.mkdir()
    subprocess.run(["tar", "xf", archive, "-C", tree], check=True)
    manifest = json.loads((tree / "MANIFEST.json").read_text())
    [kernel] = manifest["kernel_releases"]
    other = other_kernel(kernel)
    modules = tree / "payload" / manifest["driver_version"] / "modules"
    (modules / kernel).rename(modules / other)
    for ko in (modules / other).rglob("*.ko"):
        ko.write_bytes(ko.read_bytes().replace(kernel.encode(), other.encode()))
    for name in ("node/bundle.env", "node/module-deps", "MANIFEST.json"):
        path = tree / name
        path.write_text(path.read_text().replace(kernel, other))
    reseal(tree)  # node/contents first: MANIFEST.json lists it
    manifest = json.loads((tree / "MANIFEST.json").read_text())
    for entry in manifest["files"]:
        path = tree / entry["path"]
        if entry.get("type") == "file" and path.name not in ("MANIFEST.json", "SHA256SUMS"):
            entry["sha256"], entry["size"] = sha256_of(path), path.stat().st_size
    (tree / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    reseal(tree)  # SHA256SUMS again, for MANIFEST.json
    subprocess.run(["tar", "-c", TAR_COMPRESSION[archive.suffix], "-f", output, "-C", tree,
                    *sorted(os.listdir(tree))], check=True)
    return kernel, other


# What `perf script` prints of the two tracepoints: "COMM PID [CPU] SECONDS:
# sched:sched_process_exec: filename=PATH pid=N old_pid=N" and "…sched:sched_process_exit:
# comm=COMM pid=N prio=P group_dead=true".
_EVENT = re.compile(r"^\s*\S.*?\s+\d+\s+\[\d+\]\s+([\d.]+):\s+sched:sched_process_(exec|exit): "
                    r"(?:filename=(\S+) )?(?:comm=\S+ )?pid=(\d+)")
PHASES = ("index", "download", "sha256", "extract", "install --stage", "tidy",
          "switch + startup.sh")


def trace_events(trace: Path) -> list[tuple[float, str, str, str]]:
    """(seconds, pid, "exec" or "exit", the program's path) of each exec and each exit a
    process's last thread makes, in order."""
    out = subprocess.run(["perf", "script", "-i", str(trace)], check=True,
                         capture_output=True, text=True).stdout
    events = []
    for line in out.splitlines():
        m = _EVENT.match(line)
        if m is not None and (m.group(2) == "exec" or "group_dead=true" in line):
            events.append((float(m.group(1)), m.group(4), m.group(2), m.group(3) or ""))
    return sorted(events)


def split_phases(trace: Path) -> dict[str, float]:
    """The phases of one traced fetching boot (see the docstring, 5), in seconds."""
    events = trace_events(trace)
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    role: dict[str, str] = {}
    curl = None  # the last curl fetch.sh ran before the extraction: the bundle's
    for at, pid, kind, path in events:
        if kind == "exit":
            if pid in role:
                ended.setdefault(role[pid], at)
            elif pid == curl:
                ended["curl"] = at
            continue
        if path.endswith("/node/fetch.sh") and "fetch" not in started:
            started["fetch"], role[pid] = at, "fetch"
        elif "fetch" in started and "extract" not in started and path.endswith("/curl"):
            curl, started["curl"] = pid, at
            ended.pop("curl", None)
        elif "fetch" in started and path.endswith(("/tar", "/zstd")):
            started.setdefault("extract", at)
        elif path.endswith("/bundle/install_nvidia.sh") and "install" not in started:
            started["install"], role[pid] = at, "install"
    first, last = events[0][0], events[-1][0]
    assert all(n in started for n in ("fetch", "curl", "extract", "install")) and all(
        n in ended for n in ("fetch", "curl", "install")), f"{trace}: {started} {ended}"
    return {
        "index": started["curl"] - started["fetch"],
        "download": ended["curl"] - started["curl"],
        "sha256": started["extract"] - ended["curl"],
        "extract": started["install"] - started["extract"],
        "install --stage": ended["install"] - started["install"],
        "tidy": ended["fetch"] - ended["install"],
        "switch + startup.sh": (started["fetch"] - first) + (last - ended["fetch"]),
    }


@dataclass(frozen=True)
class Boots:
    download: Times
    fetch: Times
    traced: Times
    phases: dict[str, Times]
    staged: Times
    plain: Times
    size: int


def fetch_boots(archive: Path, scratch: Path) -> Boots:
    """4-6 of the docstring: the download alone, the boot that fetches (and its phases), the
    staged boot and a plain startup.sh of the same tree."""
    keys = write_key_pair(scratch / "keys" / "repo.key")
    a = scratch / "a"  # the archive, with the repository's key (node/repository.pub)
    a.mkdir()
    subprocess.run(["tar", "xf", archive, "-C", a], check=True)
    shutil.copyfile(keys.public, a / "node/repository.pub")
    (a / "node/repository.pub").chmod(0o644)
    reseal(a)
    b_archive = scratch / f"b.tar{archive.suffix}"
    kernel, other = relabel(archive, scratch / "b", b_archive)
    repository = scratch / "repository"
    repository.mkdir()
    publish([b_archive], FolderStore(repository), load_private_key(keys.private))
    [served] = repository.glob("bundles/*/nvidia.tar.*")

    node = Node(scratch / "fetch-node")
    for bus, minor in EIGHT_GPUS.items():
        node.add_gpu(bus, minor)
    (node.bin / "ldconfig").unlink()
    assert node.install(a).code == 0
    installed = scratch / "installed"  # A, before any boot: each run starts from a copy
    shutil.copytree(node.root, installed, symlinks=True)
    staged = node.install(scratch / "b", "--stage")
    assert staged.code == 0, staged.stderr
    with_staged = scratch / "staged"
    shutil.copytree(node.root, with_staged, symlinks=True)

    def boot_of(template: Path, trace: Path | None = None) -> Callable[[int], list[str]]:
        def prepare(i: int) -> list[str]:
            shutil.rmtree(node.root)
            shutil.copytree(template, node.root, symlinks=True)
            (node.root / "proc/modules").write_text("drm 1 0 - Live 0x0\n")
            argv = ["sh", str(node.root / "opt/nvidia/startup.sh"), "--root", str(node.root)]
            if trace is None:
                return argv
            return ["perf", "record", "-q", "-o", f"{trace}.{i}", "-e", "sched:sched_process_exec",
                    "-e", "sched:sched_process_exit", "--", *argv]
        return prepare

    def switched() -> bool:
        return os.readlink(node.root / "opt/nvidia/current") != os.readlink(
            installed / "opt/nvidia/current")

    with serve_folder(repository) as url:
        target = node.root / "opt/nvidia/download"
        curl = ["timeout", "180", "curl", "-fsS", "--proto", "=http,https", "--connect-timeout",
                "10", "--retry", "2", "--retry-delay", "1", "--retry-connrefused", "-o",
                str(target), f"{url}/{served.relative_to(repository)}"]

        def download(_: int) -> list[str]:
            target.unlink(missing_ok=True)
            return curl

        download_times = timed(download)
        target.unlink()
        fetch_env = {**node.env, "FAKE_KERNEL": other, "NVIDIA_REPOSITORY_URL": url}
        fetch = timed(boot_of(installed), env=fetch_env)
        assert switched(), "the boot did not switch"
        trace = scratch / "trace"
        timed(boot_of(installed, trace), env=fetch_env)
        assert switched(), "the traced boot did not switch"
    splits = [split_phases(Path(f"{trace}.{i}")) for i in range(RUNS)]
    phases = {name: Times(tuple(s[name] for s in splits)) for name in PHASES}
    # perf's own start and its writing of the trace are in the traced runs' times: the
    # boot itself is its phases' sum.
    traced = Times(tuple(sum(s.values()) for s in splits))
    # No repository from here on: the staged boot must need no network.
    offline = {**node.env, "NVIDIA_REPOSITORY_URL": "http://127.0.0.1:9"}
    staged_boot = timed(boot_of(with_staged), env={**offline, "FAKE_KERNEL": other})
    assert switched(), "the staged boot did not switch"
    plain = timed(boot_of(with_staged), env={**offline, "FAKE_KERNEL": kernel})
    return Boots(download_times, fetch, traced, phases, staged_boot, plain,
                 served.stat().st_size)


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(archive: Path) -> None:
    load_before = load()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch_dir:
        scratch = Path(scratch_dir)
        bundle = scratch / "bundle"
        bundle.mkdir()
        subprocess.run(["tar", "xf", archive, "-C", bundle], check=True)
        [payload] = (bundle / "payload").iterdir()
        size = sum(p.stat().st_size for p in payload.rglob("*")
                   if p.is_file() and not p.is_symlink())
        cache = PageCache(payload)
        cache_line = cache.check()
        # The sums the baseline checks: SHA256SUMS's payload entries, as openssl -r prints
        # them for the copy ("<sum> *<path>"), sorted.
        prefix = f"payload/{payload.name}/"
        expected = scratch / "expected-sums"
        expected.write_text("".join(sorted(
            f"{sum_} *{path[len(prefix):]}\n"
            for sum_, path in (line.split(maxsplit=1) for line in
                               (bundle / "SHA256SUMS").read_text().splitlines())
            if path.startswith(prefix))))
        hash_all = (f'find . -type f -printf "%P\\n" | xargs -d "\\n" -n 8 -P "$(nproc)" '
                    f'openssl dgst -sha256 -r | sort | cmp -s - "{expected}"')

        def copy_to(i: int, *, check: bool) -> list[str]:
            dest = scratch / "copy"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            script = (f'cp -a "{payload}/." "{dest}/" && cd "{dest}" && '
                      + (f"{hash_all} && " if check else "") + "sync -f .")
            return ["sh", "-c", script]

        def install_into(i: int) -> list[str]:
            root = scratch / "root"
            shutil.rmtree(root, ignore_errors=True)
            (root / "etc").mkdir(parents=True)
            (root / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
            return ["sh", str(bundle / "install_nvidia.sh"), "--root", str(root), "--no-enable"]

        figures: dict[str, dict[str, Times]] = {}
        for state, before in (("cold", cache.drop), ("warm", cache.warm)):
            figures[state] = {
                "copy": timed(lambda i: copy_to(i, check=False), before=before),
                "baseline": timed(lambda i: copy_to(i, check=True), before=before),
                "install": timed(install_into, before=before),
            }

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

        startup = timed(fresh_node, env=node.env)
        boots = fetch_boots(archive, scratch)
    load_after = load()

    print(f"payload: {size / 2**20:.1f} MiB in {payload.name}/; median (min-max) of {RUNS} "
          f"runs each; {os.cpu_count()} cores")
    print(cache_line)
    for state, f in figures.items():
        base, install = f["baseline"].median, f["install"].median
        print(f"{state}: copy + checksum + sync {f['baseline'].show()} (copy + sync alone "
              f"{f['copy'].show()}); install_nvidia.sh {f['install'].show()} = "
              f"{install / base:.2f} x the copy + checksum + sync (target <= 1.2)")
    print(f"startup.sh, 8 GPUs, stand-in insmod: {startup.show(3)} (target <= 0.5)")
    download = boots.download.median
    print(f"download alone (curl, 127.0.0.1): {boots.download.show()} for "
          f"{boots.size / 2**20:.1f} MiB ({archive.suffix.lstrip('.')})")
    print(f"boot-time fetch: {boots.fetch.show()} = the download + "
          f"{boots.fetch.median - download:.2f} s (target <= 1)")
    print(f"  by phase (perf record; their sum {boots.traced.show()}): " + ", ".join(
        f"{name} {times.show()}" for name, times in boots.phases.items()))
    print(f"staged boot: {boots.staged.show(3)} against a plain startup.sh's "
          f"{boots.plain.show(3)}: {boots.staged.median - boots.plain.median:+.3f} s "
          f"(target <= 0.05)")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or os.geteuid() != 0:
        sys.exit("usage (as root): python -m bench.node ARCHIVE")
    main(Path(sys.argv[1]))
