"""Node-side speed: install_nvidia.sh against a plain copy of the payload, startup.sh, and the
boots that follow an OS update.

Targets (DESIGN.md): node install ≤ 1.5 x a plain copy of the payload; startup.sh,
excluding the kernel's own module init, ≤ 0.5 s; a boot-time fetch ≤ 2 s beyond the download
itself; a boot that switches to a staged folder ≤ 0.2 s beyond a plain startup.sh. Measured
in one run on one disk:
  1. plain copy: `cp -a payload/<driver>/. DEST` then `sync -f DEST` (the install syncs too,
     so a power cut cannot leave a renamed but empty driver), and without the sync,
  2. install: `install_nvidia.sh --root R --no-enable` (checks the bundle's shape, copies it
     into a staging folder, checks the shape there, sets owner and modes, checks every file
     against SHA256SUMS there, ldconfig -n, syncs, renames, links, real `ldconfig -r`),
  3. startup: `startup.sh --root R` on a fake 8-GPU node whose insmod, modprobe,
     nvidia-smi and uname are stand-ins (tests/nodetree.py): modules, device nodes, firmware.
  4. the download alone: fetch.sh's own `timeout … curl … -o FILE` of the bundle from a
     repository made by coreos-gpu's publish and served over HTTP on 127.0.0.1,
  5. boot-time fetch: `startup.sh --root R` on that node (bundle A installed, with the
     repository's key) booted into another kernel: fetch.sh reads and checks the signed
     index, downloads bundle B, checks its sha256, extracts it, install_nvidia.sh --stage,
     then the switch and B's startup.sh; its overhead is this minus the download (4),
  6. staged boot: the same node with B staged already (install_nvidia.sh --stage), booted
     into B's kernel (the switch, then B's startup.sh), against a plain startup.sh of the
     same tree on A's kernel.
B is the archive relabelled for another kernel of the same length (6.1.0-50-amd64 becomes
6.1.0-51-amd64: the modules' folder, their vermagic, bundle.env, module-deps, MANIFEST.json,
node/contents and SHA256SUMS), so publish's inspect passes it, as a build for that kernel.
The median of five runs each; the load average is printed before and after. Run from the
repository root, as root (about two minutes for a compute bundle):
  .venv/bin/python -m testinputs.offline_build --runtime bwrap --output /var/tmp/nvidia.tar.gz
  .venv/bin/python -m bench.node /var/tmp/nvidia.tar.gz     (or any `coreos-gpu build` archive;
                                         B keeps its compression: build with --compression zstd
                                         to see the fetch with zstd)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from coreos_gpu.cache import sha256_of
from coreos_gpu.keys import load_private_key, write_key_pair
from coreos_gpu.publish import publish
from coreos_gpu.stores import FolderStore
from testinputs.serve import serve_folder
from tests.nodetree import EIGHT_GPUS, Node, reseal

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


def fetch_boots(archive: Path, scratch: Path) -> dict[str, float]:
    """4-6 of the docstring: the download alone, the boot that fetches, the staged boot and
    a plain startup.sh of the same tree."""
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

    def boot_of(template: Path) -> Callable[[int], list[str]]:
        def prepare(_: int) -> list[str]:
            shutil.rmtree(node.root)
            shutil.copytree(template, node.root, symlinks=True)
            (node.root / "proc/modules").write_text("drm 1 0 - Live 0x0\n")
            return ["sh", str(node.root / "opt/nvidia/startup.sh"), "--root", str(node.root)]
        return prepare

    with serve_folder(repository) as url:
        target = node.root / "opt/nvidia/download"
        curl = ["timeout", "180", "curl", "-fsS", "--proto", "=http,https", "--connect-timeout",
                "10", "--retry", "2", "--retry-delay", "1", "--retry-connrefused", "-o",
                str(target), f"{url}/{served.relative_to(repository)}"]

        def download(_: int) -> list[str]:
            target.unlink(missing_ok=True)
            return curl

        figures = {"download": median_time(download)}
        target.unlink()
        fetch_env = {**node.env, "FAKE_KERNEL": other, "NVIDIA_REPOSITORY_URL": url}
        figures["fetch"] = median_time(boot_of(installed), env=fetch_env)
        assert os.readlink(node.root / "opt/nvidia/current") != os.readlink(
            installed / "opt/nvidia/current"), "the boot did not switch"
    # No repository from here on: the staged boot must need no network.
    offline = {**node.env, "NVIDIA_REPOSITORY_URL": "http://127.0.0.1:9"}
    figures["staged"] = median_time(boot_of(with_staged), env={**offline, "FAKE_KERNEL": other})
    assert os.readlink(node.root / "opt/nvidia/current") != os.readlink(
        installed / "opt/nvidia/current"), "the staged boot did not switch"
    figures["plain"] = median_time(boot_of(with_staged), env={**offline, "FAKE_KERNEL": kernel})
    figures["size"] = served.stat().st_size
    return figures


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
        load_before = os.getloadavg()
        boots = fetch_boots(archive, scratch)
        load_after = os.getloadavg()

    print(f"payload: {size / 2**20:.1f} MiB in {payload.name}/ (median of {RUNS} runs each)")
    print(f"plain copy + sync: {copy:.2f} s   (without sync: {copy_nosync:.2f} s)")
    print(f"install_nvidia.sh: {install:.2f} s = {install / copy:.2f} x the plain copy + sync "
          f"(target <= 1.5), {install / copy_nosync:.2f} x the copy without sync")
    print(f"startup.sh, 8 GPUs, stand-in insmod: {startup:.3f} s (target <= 0.5)")
    fetch, download = boots["fetch"], boots["download"]
    print(f"download alone (curl, 127.0.0.1): {download:.2f} s for {boots['size'] / 2**20:.1f} MiB "
          f"({archive.suffix.lstrip('.')})")
    print(f"boot-time fetch (startup.sh: index, download, sha256, extract, install --stage, "
          f"switch, startup): {fetch:.2f} s = the download + {fetch - download:.2f} s "
          f"(target <= 2), of which a plain startup.sh is {boots['plain']:.3f} s")
    print(f"staged boot: {boots['staged']:.3f} s against a plain startup.sh's "
          f"{boots['plain']:.3f} s: {boots['staged'] - boots['plain']:+.3f} s (target <= 0.2)")
    print("load average (1, 5, 15 min) before the boots: {:.2f} {:.2f} {:.2f}, after: "
          "{:.2f} {:.2f} {:.2f}".format(*load_before, *load_after))


if __name__ == "__main__":
    if len(sys.argv) != 2 or os.geteuid() != 0:
        sys.exit("usage (as root): python -m bench.node ARCHIVE")
    main(Path(sys.argv[1]))
