"""Developer container stage: a verified `.bin.bz2` image → `DevRoot`, a root folder holding
the release's prepared kernel build tree. Nothing is mounted and no container engine is needed:

    .bin.bz2 → (streamed) raw GPT disk → partition 9 "ROOT" → ext4 → debugfs → folder

Only partition 9 is written to disk, sparsely (its zero runs as holes), never the whole raw
image, and deleted once read: on 2 cores this costs about what `lbzip2 -dc` into a file
costs (bench/devcontainer_prepare.py). Of a Flatcar ROOT only what a module build reads is
copied (buildroot.py: a few hundred MB of a ~6 GB image); CoreOS's is copied whole, since its
tree is prepared in it by emerge. The result is cached by the image's sha256.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import json
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from coreos_gpu import ui
from coreos_gpu.buildroot import MODULE_DIRS, copy_build_root, image_error
from coreos_gpu.cache import content_digest, locked, write_atomically
from coreos_gpu.config import BuildConfig, OsName, Runtime
from coreos_gpu.errors import KernelTreeNotPrepared
from coreos_gpu.release import SCHEMES, OsRelease, mirrored, resolve_release
from coreos_gpu.run import check_tools, run, run_reading
from coreos_gpu.sandbox import Bind, EngineOptions, SandboxSpec, run_in_sandbox
from coreos_gpu.verify import Published, fetch_verified

SECTOR = 512
ROOT_PARTITION = 9  # Flatcar's and CoreOS's disk layout: partition 9 is ROOT
CHUNK = 1 << 20  # also the pipe's size (Linux lets anyone have 1 MiB)
_ZEROS = bytes(CHUNK)
_EXT4_MAGIC_AT = 1024 + 0x38
PREPARED_FILES = (".config", "Module.symvers", "include/generated/utsrelease.h")


@dataclass(frozen=True)
class DevRoot:
    root: Path  # the extracted root file system
    kernel_release: str  # from the tree's utsrelease.h: what `uname -r` says on the node
    build_dir: str  # the kernel build tree, as a path inside root
    image_sha256: str
    release: OsRelease


@contextmanager
def _decompressed(image: Path) -> Iterator[IO[bytes]]:
    """The image's raw bytes as a stream; lbzip2 decompresses on every core where present."""
    tool = next((t for t in ("lbzip2", "bzip2") if shutil.which(t)), "")
    if not tool:
        with bz2.open(image, "rb") as stream:
            yield stream
        return
    with run_reading([tool, "-dc", image]) as stream:
        with contextlib.suppress(OSError):  # a bigger pipe: fewer wake-ups for 6 GB
            fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
        yield stream


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    """n bytes, fewer only at the end of the stream. A pipe's read(n) mostly gives all n at
    once: no copy then (6 GB pass through here for a real image)."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    while n > (have := sum(map(len, parts))) and (more := stream.read(n - have)):
        parts.append(more)
    return b"".join(parts)


def find_partition(head: bytes, number: int) -> tuple[int, int, str]:
    """(first byte, size in bytes, name) of a GPT partition, from the disk's first sectors."""
    header = head[SECTOR:2 * SECTOR]
    if header[:8] != b"EFI PART":
        raise image_error("the developer container is not a GPT disk image")
    size = struct.unpack_from("<I", header, 12)[0]
    stored_crc = struct.unpack_from("<I", header, 16)[0]
    checked = header[:16] + b"\0\0\0\0" + header[20:size]
    if zlib.crc32(checked) != stored_crc:
        raise image_error("the developer container's GPT header fails its CRC32 check")
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    table = head[entries_lba * SECTOR:entries_lba * SECTOR + count * entry_size]
    if len(table) < count * entry_size or zlib.crc32(table) != entries_crc:
        raise image_error("the developer container's GPT partition table fails its CRC32 "
                           "check")
    if number > count:
        raise image_error(f"the developer container's GPT has no partition {number}")
    entry = table[(number - 1) * entry_size:number * entry_size]
    first, last = struct.unpack_from("<QQ", entry, 32)
    name = entry[56:128].decode("utf-16-le", errors="replace").rstrip("\0")
    if entry[:16] == b"\0" * 16 or last < first:
        raise image_error(f"the developer container's GPT partition {number} is empty")
    return first * SECTOR, (last - first + 1) * SECTOR, name


def extract_partition(image: Path, number: int, dest: Path) -> str:
    """Stream the image, writing only partition `number` to dest (sparse). Return its name."""
    with _decompressed(image) as stream:
        head = _read_exactly(stream, 34 * SECTOR)  # protective MBR, GPT header, 128 entries
        start, size, name = find_partition(head, number)
        if start < len(head):
            raise image_error(f"partition {number} overlaps the GPT")
        position = len(head)
        while position < start:  # skip the partitions before it without storing them
            skipped = len(_read_exactly(stream, min(CHUNK, start - position)))
            if not skipped:
                raise image_error(f"the image ends before partition {number}")
            position += skipped
        with dest.open("wb") as out:
            left = size
            while left:
                chunk = _read_exactly(stream, min(CHUNK, left))
                if not chunk:
                    raise image_error(f"the image ends inside partition {number}")
                if chunk == (_ZEROS if len(chunk) == CHUNK else bytes(len(chunk))):
                    out.seek(len(chunk), 1)  # a hole costs no disk space (memcmp: cheap)
                else:
                    out.write(chunk)
                left -= len(chunk)
            out.truncate()
    with dest.open("rb") as f:
        f.seek(_EXT4_MAGIC_AT)
        if f.read(2) != b"\x53\xef":
            raise image_error(f"partition {number} does not hold an ext2/3/4 file system")
    return name


def dump_ext4(filesystem: Path, dest: Path) -> None:
    """Copy the whole file system out (CoreOS: emerge prepares its tree in the root)."""
    dest.mkdir()
    done = run(["debugfs", "-R", f"rdump / {dest}", filesystem],
               what="copying the ROOT file system out of the image")
    # debugfs exits 0 even when a request fails; anything but its banner is an error.
    problems = [line for line in done.stdout.splitlines()
                if line.strip() and not line.startswith("debugfs ")]
    if problems:
        raise image_error(f"debugfs could not copy the ROOT file system: {problems[0]}")


def resolve_in_root(root: Path, path: str) -> Path:
    """Resolve path as the dev container would see it: absolute symlinks point into root."""
    parts = [p for p in path.split("/") if p]
    current = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise image_error(f"too many symlinks resolving {path} in the image")
            target = str(candidate.readlink())
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p] + parts
            continue
        current = candidate
    return current


def find_kernel_tree(root: Path) -> tuple[str, Path]:
    """(build dir as a path inside root, its real location) of the image's one kernel."""
    # On merged-/usr roots /lib links to usr/lib: count each real folder once.
    folders = {resolve_in_root(root, d): d for d in reversed(MODULE_DIRS)}
    # Not glob(): it skips `build` links whose absolute target exists only inside the root.
    trees = sorted(f"/{d}/{kernel.name}/build" for real, d in folders.items()
                   if real.is_dir() for kernel in real.iterdir()
                   if (kernel / "build").is_symlink() or (kernel / "build").is_dir())
    if not trees:
        raise image_error("the image holds no kernel build tree (looked for "
                           + ", ".join(f"/{d}/*/build" for d in MODULE_DIRS) + ")")
    if len(trees) > 1:
        raise image_error(f"the image holds several kernel build trees: {', '.join(trees)}")
    return trees[0], resolve_in_root(root, trees[0])


def read_kernel_release(tree: Path, build_dir: str, modules_of: str) -> str:
    """The prepared tree's UTS_RELEASE, which must be the modules folder it belongs to."""
    missing = [f for f in PREPARED_FILES if not (tree / f).is_file()]
    if missing:
        raise KernelTreeNotPrepared(
            f"the kernel build tree {build_dir} is not prepared: it lacks {', '.join(missing)}",
            hint="a module build needs .config, Module.symvers and the generated headers "
            "(make modules_prepare)")
    text = (tree / "include/generated/utsrelease.h").read_text(errors="replace")
    found = re.search(r'#define\s+UTS_RELEASE\s+"([^"]+)"', text)
    if not found:
        raise image_error(f"{build_dir}/include/generated/utsrelease.h names no release")
    release = found.group(1)
    if modules_of != release:
        raise image_error(f"the kernel tree for modules/{modules_of} was built as {release}")
    return release


# CoreOS's developer containers ship a tree that cannot build modules; CoreOS documented
# preparing one from the coreos-sources package instead (it downloads, so it needs network).
COREOS_TREE = "/usr/src/linux"
COREOS_PREPARE = (
    "emerge-gitclone",
    "emerge -gKv coreos-sources",
    f"cp /usr/lib64/modules/*/build/.config {COREOS_TREE}/",
    f"make -C {COREOS_TREE} modules_prepare",
)


def prepare_coreos_tree(root: Path, *, runtime: Runtime, engine: EngineOptions,
                        log_file: Path, image_key: str) -> None:
    mounts = (Bind(Path("/etc/resolv.conf"), "/etc/resolv.conf", readonly=True),) if Path(
        "/etc/resolv.conf").is_file() else ()
    with ui.step("preparing the CoreOS kernel tree (emerge coreos-sources, modules_prepare)"):
        run_in_sandbox(SandboxSpec(root=root, mounts=mounts, network=True),
                       ["sh", "-ec", "\n".join(COREOS_PREPARE)], runtime=runtime,
                       log_file=log_file, what="preparing the CoreOS kernel tree",
                       engine_options=engine, image_key=image_key)


def prepare_kernel_tree(root: Path, release: OsRelease, *, runtime: Runtime, engine: EngineOptions,
                 log_file: Path, image_key: str) -> tuple[str, str]:
    """(build dir inside root, kernel release) of a prepared tree, preparing CoreOS's."""
    build_dir, tree = find_kernel_tree(root)
    modules_of = build_dir.rstrip("/").split("/")[-2]
    try:
        return build_dir, read_kernel_release(tree, build_dir, modules_of)
    except KernelTreeNotPrepared:
        if release.os is not OsName.COREOS:
            raise
    prepare_coreos_tree(root, runtime=runtime, engine=engine, log_file=log_file,
                        image_key=image_key)
    tree = resolve_in_root(root, COREOS_TREE)
    return COREOS_TREE, read_kernel_release(tree, COREOS_TREE, modules_of)


def _load(entry: Path, release: OsRelease) -> DevRoot:
    data = json.loads((entry / "devroot.json").read_text())
    return DevRoot(root=entry / "root", kernel_release=data["kernel_release"],
                   build_dir=data["build_dir"], image_sha256=data["image_sha256"],
                   release=release)


def unpack_image(image: Path, release: OsRelease, cache_dir: Path, *, runtime: Runtime,
                 engine: EngineOptions) -> DevRoot:
    """Turn a verified image into a cached DevRoot (once per image sha256)."""
    digest = content_digest(image)
    folder = cache_dir / "devcontainers"
    entry = folder / digest
    if (entry / "devroot.json").is_file():
        return _load(entry, release)
    check_tools("debugfs", why="unpacking the developer container",
                packages={"debugfs": "e2fsprogs"})
    with locked(folder / f"{digest}.lock"):
        if (entry / "devroot.json").is_file():
            return _load(entry, release)
        work = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=folder))
        try:
            filesystem = work / "root.ext4"
            with ui.step(f"extracting partition {ROOT_PARTITION} of {release.image_name}"):
                extract_partition(image, ROOT_PARTITION, filesystem)
            log = folder / f"{digest}.prepare.log"
            if release.os is OsName.COREOS:
                with ui.step("copying its files out"):
                    dump_ext4(filesystem, work / "root")
            else:
                with ui.step("copying out what a module build reads"):
                    copy_build_root(filesystem, work / "root", runtime=runtime, engine=engine,
                                    log_file=log, image_key=f"{digest}-parts")
            filesystem.unlink()
            build_dir, kernel_release = prepare_kernel_tree(
                work / "root", release, runtime=runtime, engine=engine,
                log_file=log, image_key=digest)
            write_atomically(work / "devroot.json", json.dumps({
                "kernel_release": kernel_release, "build_dir": build_dir,
                "image_sha256": digest, "os": release.os.value, "version": release.version,
                "channel": release.channel.value,
                "root": "full" if release.os is OsName.COREOS else "build",
            }, indent=2).encode())
            work.rename(entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _load(entry, release)


def engine_options(config: BuildConfig) -> EngineOptions:
    return EngineOptions(global_args=config.podman_options, run_args=config.podman_run_options)


def prepare_devcontainer(config: BuildConfig, version: str) -> DevRoot:
    """Resolve a release, download and verify its developer container, and unpack it."""
    release = resolve_release(config.os, config.channel, config.board, version,
                              mirror=config.mirror, cache_dir=config.cache_dir,
                              offline=config.offline)
    scheme = SCHEMES[config.os]
    published = Published(
        url=release.image_url, digests_url=release.digests_url, sig_url=release.sig_url,
        key=config.signing_key or mirrored(scheme.signing_key_url, config.mirror),
        fingerprint=config.signing_key_fingerprint or scheme.fingerprint)
    with ui.step(f"fetching {config.os.value} {release.version} developer container"):
        image = fetch_verified(published, config.cache_dir, offline=config.offline)
    devroot = unpack_image(image, release, config.cache_dir, runtime=config.runtime,
                           engine=engine_options(config))
    if release.feed_kernel and not devroot.kernel_release.startswith(release.feed_kernel):
        ui.log(f"    note: the release feed lists kernel {release.feed_kernel}; the image's "
               f"tree is {devroot.kernel_release}, which is what the modules are built for")
    return devroot
