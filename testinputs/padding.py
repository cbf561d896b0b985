"""Bulk that gives a test developer container Flatcar's real size and shape, for benchmarks.

Flatcar's `flatcar_developer_container.bin.bz2` is ~480 MB compressed and ~6 GB unpacked
(Flatcar's devguide, kernel-modules.md; DESIGN.md "Build input alternative"), and its ROOT
partition is 6 GiB (flatcar/scripts build_library/disk_layout.json, the "container" layout:
12582912 sectors). It is a Gentoo system: libdir /usr/lib64, LLVM under /usr/lib/llvm/<ver>,
the Portage tree under /var/db/repos/gentoo, debug files under /usr/lib/debug, sources under
/usr/src/debug. SHAPE puts ~5 GiB in ~115k files there; how it splits between the areas is
an estimate in proportion to a Gentoo system with LLVM, Rust, Go and debug files, not counted
from a Flatcar image. A module build reads none of it; a tool that copies more than the kernel
build tree and the toolchain pays for it.

Content comes from two pre-generated pools, sliced at random offsets (fast: no per-byte
Python): text drawn from a small vocabulary and "binary" data drawn from a small set of 8-byte
tokens, both tuned so that bzip2 -9 packs them ~13:1, which with the toy root brings the whole
image to Flatcar's ~480 MB. Not zeros: the dev container stage stores zero runs as holes, and
bzip2 packs them to nothing, so zeros would understate both disk and decompression time.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Kind(StrEnum):
    TEXT = "text"  # ebuilds, docs, headers, sources
    DATA = "data"  # .a, .rlib, .debug, .mo: binary, but no ELF header needed
    # Real ELF files: a small ELF binary of the root (ELF_SEEDS) with pool data appended after
    # its last section, so `file` and ELF readers see an executable or shared object.
    EXECUTABLE = "executable"
    SHARED_OBJECT = "shared-object"


# The root's own small ELF files the ELF kinds start with (Debian's paths: the root is Debian's).
ELF_SEEDS = {Kind.EXECUTABLE: "usr/bin/true",
             Kind.SHARED_OBJECT: "usr/lib/x86_64-linux-gnu/libattr.so.1"}
POOL_BYTES = 16 << 20
# Tuned with bzip2 -9 on the pools as written (see tests/test_testinputs_padding.py).
TEXT_WORDS = ("unsigned", "static", "return", "struct", "inherit", "DEPEND=", "#include",
              "src_compile()", "local", "const", "EAPI=8", "KEYWORDS=", "then")
DATA_TOKENS = 24  # distinct 8-byte tokens
SYLLABLES = ("ba", "ko", "ri", "tu", "mel", "san", "dor", "vex", "li", "qua", "ne", "po",
             "zor", "fi", "gu", "ha")


@dataclass(frozen=True)
class Bulk:
    """count files of about size bytes each (0.2 to 1.8 times size; size itself if count is 1).

    pattern names file i inside the root: {n} = i % per_folder, {b} = the name of folder
    number (i // per_folder) % folders, {a} = the name of number i // (per_folder * folders).
    """

    pattern: str
    count: int
    size: int
    kind: Kind
    per_folder: int = 1
    folders: int = 1


K, M = 1000, 1000_000
SHAPE = (
    # The Portage tree: many small files (ebuilds and their md5-cache entries, ~170 categories).
    Bulk("var/db/repos/gentoo/dev-{a}/{b}/{b}-1.{n}.ebuild", 30_000, 2_500, Kind.TEXT, 3, 60),
    Bulk("var/db/repos/gentoo/metadata/md5-cache/dev-{a}/{b}-1.{n}", 25_000, 1_200, Kind.TEXT,
         3, 50),
    Bulk("usr/share/doc/{a}-{b}/README.{n}", 6_000, 6 * K, Kind.TEXT, 4, 25),
    Bulk("usr/share/gtk-doc/html/{a}/{b}-{n}.html", 5_000, 8 * K, Kind.TEXT, 10, 50),
    Bulk("usr/share/locale/{a}/LC_MESSAGES/{b}.mo", 6_000, 25 * K, Kind.DATA, 1, 60),
    Bulk("usr/lib/debug/usr/lib64/lib{a}{b}.so.{n}.debug", 2_500, 550 * K, Kind.DATA, 2, 50),
    Bulk("usr/src/debug/dev-{a}/{b}-1.0/{n}.c", 12_000, 14 * K, Kind.TEXT, 40, 30),
    Bulk("usr/lib/python3.11/{a}/{b}{n}.py", 8_000, 9 * K, Kind.TEXT, 20, 20),
    # /usr/lib64: a few huge shared objects, many medium ones, static archives.
    Bulk("usr/lib64/libLLVM-17.so", 1, 130 * M, Kind.SHARED_OBJECT),
    Bulk("usr/lib64/librustc_driver-5e3f8a7c9d21b04e.so", 1, 150 * M, Kind.SHARED_OBJECT),
    Bulk("usr/lib64/libclang-cpp.so.17", 1, 70 * M, Kind.SHARED_OBJECT),
    Bulk("usr/lib64/libgo.so.22.0.0", 1, 50 * M, Kind.SHARED_OBJECT),
    Bulk("usr/lib64/libstd-8d5a1e0b1c9f7a42.so", 1, 14 * M, Kind.SHARED_OBJECT),
    Bulk("usr/lib64/lib{a}{b}.so.{n}", 1_500, 260 * K, Kind.SHARED_OBJECT, 2, 30),
    Bulk("usr/lib64/lib{a}{b}.a", 400, 700 * K, Kind.DATA, 1, 40),
    Bulk("usr/lib/llvm/17/lib/libLLVM{a}{b}.a", 200, 6 * M, Kind.DATA, 1, 20),
    Bulk("usr/lib/llvm/17/include/llvm/{a}/{b}{n}.h", 3_500, 12 * K, Kind.TEXT, 10, 35),
    Bulk("usr/lib/llvm/17/bin/llvm-{b}{n}", 40, 4 * M, Kind.EXECUTABLE, 2, 20),
    Bulk("usr/lib/rustlib/x86_64-unknown-linux-gnu/lib/lib{b}-{a}.rlib", 60, 8 * M, Kind.DATA,
         1, 60),
    Bulk("usr/lib/go/src/{a}/{b}/{n}.go", 9_000, 11 * K, Kind.TEXT, 20, 30),
    Bulk("usr/lib/go/pkg/tool/linux_amd64/{b}", 20, 8 * M, Kind.EXECUTABLE, 1, 20),
    # Big executables in /usr/bin beside the toolchain's, none of which a module build runs.
    Bulk("usr/bin/clang-17", 1, 90 * M, Kind.EXECUTABLE),
    Bulk("usr/bin/rustc", 1, 40 * M, Kind.EXECUTABLE),
    Bulk("usr/bin/cargo", 1, 30 * M, Kind.EXECUTABLE),
    Bulk("usr/bin/go", 1, 16 * M, Kind.EXECUTABLE),
    Bulk("usr/bin/gdb", 1, 12 * M, Kind.EXECUTABLE),
    Bulk("usr/bin/gofmt", 1, 3_500 * K, Kind.EXECUTABLE),
    Bulk("usr/bin/{b}-{n}", 300, 200 * K, Kind.EXECUTABLE, 3, 100),
)


def render_name(number: int) -> str:
    """A made-up name for a number: its base-16 digits as syllables, at least two."""
    syllables = []
    while True:
        number, digit = divmod(number, len(SYLLABLES))
        syllables.append(SYLLABLES[digit])
        if not number and len(syllables) >= 2:
            return "".join(syllables)


def render_path(bulk: Bulk, i: int) -> str:
    n = i % bulk.per_folder
    folder = i // bulk.per_folder
    return bulk.pattern.format(n=n, b=render_name(folder % bulk.folders),
                               a=render_name(folder // bulk.folders))


def build_text_pool(size: int, *, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        lines.append(" ".join(rng.choices(TEXT_WORDS, k=rng.randint(3, 12))) + "\n")
        total += len(lines[-1])
    return "".join(lines).encode()[:size]


def build_data_pool(size: int, *, seed: int = 2) -> bytes:
    rng = random.Random(seed)
    tokens = [rng.randbytes(8) for _ in range(DATA_TOKENS)]
    return b"".join(rng.choices(tokens, k=size // 8 + 1))[:size]


def write_from_pool(path: Path, size: int, pool: memoryview, rng: random.Random,
                    head: bytes = b"") -> None:
    """size bytes: head, then the pool from a random offset on (wrapping round)."""
    offset = rng.randrange(len(pool))
    with path.open("xb") as f:  # x: never overwrite a file of the root
        f.write(head)
        left = size - len(head)
        while left > 0:
            chunk = pool[offset:offset + left]
            f.write(chunk)
            left -= len(chunk)
            offset = 0


def write_padding(root: Path, shape: tuple[Bulk, ...] = SHAPE, *,
                  pool_bytes: int = POOL_BYTES) -> tuple[int, int]:
    """Write shape's files into root; → (files, bytes) written."""
    text, data = (memoryview(build_text_pool(pool_bytes)),
                  memoryview(build_data_pool(pool_bytes)))
    seeds = {kind: (root / path).resolve().read_bytes() for kind, path in ELF_SEEDS.items()
             if any(bulk.kind is kind for bulk in shape)}
    files = total = 0
    for index, bulk in enumerate(shape):
        rng = random.Random(index)
        pool = text if bulk.kind is Kind.TEXT else data
        for i in range(bulk.count):
            path = root / render_path(bulk, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            size = bulk.size if bulk.count == 1 else int(bulk.size * rng.uniform(0.2, 1.8))
            write_from_pool(path, size, pool, rng, head=seeds.get(bulk.kind, b""))
            if bulk.kind is Kind.EXECUTABLE:
                os.chmod(path, 0o755)
            files, total = files + 1, total + max(size, len(seeds.get(bulk.kind, b"")))
    return files, total
