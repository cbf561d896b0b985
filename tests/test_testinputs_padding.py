"""The real-size dev container's padding: the shape it claims, on a tiny scale (no image built)."""

from __future__ import annotations

import bz2
import os
from pathlib import Path

import pytest

from testinputs.padding import (
    ELF_SEEDS,
    SHAPE,
    Bulk,
    Kind,
    render_name,
    render_path,
    write_padding,
)

GIB = 1 << 30
# What a module build reads: padding there would change what the benchmarks build with.
BUILD_INPUTS = ("usr/lib/modules/", "usr/src/linux", "usr/lib/gcc/", "usr/libexec/gcc/",
                "usr/include/", "usr/lib/x86_64-linux-gnu/")


def test_shape_is_flatcars_size_in_about_1e5_files() -> None:
    assert 90_000 <= sum(bulk.count for bulk in SHAPE) <= 130_000
    assert 4.7 * GIB <= sum(bulk.count * bulk.size for bulk in SHAPE) <= 5.4 * GIB


def test_shape_names_each_file_once_and_none_a_module_build_reads() -> None:
    paths = [render_path(bulk, i) for bulk in SHAPE for i in range(bulk.count)]
    assert len(set(paths)) == len(paths)
    assert not [p for p in paths if p.startswith(BUILD_INPUTS)]


@pytest.mark.parametrize(("number", "name"), [(0, "baba"), (1, "koba"), (17, "koko"),
                                              (255, "haha"), (256, "babako")])
def test_names_are_base_16_syllables_least_significant_first(number: int, name: str) -> None:
    assert render_name(number) == name


def test_padding_is_the_shape_in_content_bzip2_packs_about_13_to_1(tmp_path: Path) -> None:
    for kind, path in ELF_SEEDS.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"\x7fELF" + kind.value.encode() * 100)
    shape = (Bulk("var/db/repos/gentoo/dev-{a}/{b}/{b}-1.{n}.ebuild", 300, 3000, Kind.TEXT, 3, 10),
             Bulk("usr/lib/debug/lib{b}.debug", 10, 60_000, Kind.DATA, 1, 10),
             Bulk("usr/bin/rustc", 1, 150_000, Kind.EXECUTABLE),
             Bulk("usr/lib64/lib{b}.so.{n}", 4, 40_000, Kind.SHARED_OBJECT, 2, 2))
    files, size = write_padding(tmp_path, shape, pool_bytes=1 << 20)

    written = [p for p in tmp_path.rglob("*") if p.is_file() and "x86_64" not in str(p)
               and p.name != "true"]
    assert files == len(written) == 315
    assert size == sum(p.stat().st_size for p in written)
    assert (tmp_path / "usr/bin/rustc").stat().st_size == 150_000
    assert os.access(tmp_path / "usr/bin/rustc", os.X_OK)
    assert (tmp_path / "usr/bin/rustc").read_bytes().startswith(b"\x7fELFexecutable")
    assert all(p.read_bytes().startswith(b"\x7fELFshared-object")
               for p in (tmp_path / "usr/lib64").iterdir())
    content = b"".join(p.read_bytes() for p in sorted(written))
    assert b"\0" * 512 not in content  # no zero runs, which the extraction stores as holes
    assert 11 <= len(content) / len(bz2.compress(content, 9)) <= 16
