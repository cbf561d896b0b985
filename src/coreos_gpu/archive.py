"""Reproducible tar archives: the bundle's writer and its reader.

Same members in, same bytes out: members go in the caller's order with one fixed mtime,
owner root:root (0:0), PAX format, and compressor settings whose headers hold no time and
no file name. Each regular file is hashed while it is copied in, so every input is read once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

import zstandard

from coreos_gpu.config import Compression
from coreos_gpu.errors import CoreosGpuError, ExitCode

# Measured on the 535 compute payload plus one nvidia.ko (206 MB of tar, 2 cores):
# gzip -1 116 MB 4.5 s, -6 110 MB 8.1 s, -9 110 MB 32 s; zstd -3 105 MB 1.1 s, -10 101 MB
# 3.8 s, -19 98 MB 86 s; xz -6 95 MB 120 s. -9 buys 0.3 % for 4x the time; zstd -10 is the
# knee of its curve; xz is chosen for size, so it keeps its own default preset.
GZIP_LEVEL = 6
ZSTD_LEVEL = 10
XZ_PRESET = 6

COPY_BUFFER = 1 << 20
MAGIC = {
    Compression.GZIP: b"\x1f\x8b",
    Compression.XZ: b"\xfd7zXZ\x00",
    Compression.ZSTD: b"\x28\xb5\x2f\xfd",
}
# What a damaged or truncated compressed tar stream raises while it is read. Not OSError:
# that also comes from the caller's own files, and the message would blame the archive.
READ_ERRORS = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError,
               zstandard.ZstdError)
_Compressed = gzip.GzipFile | lzma.LZMAFile | zstandard.ZstdCompressionWriter
_Decompressed = gzip.GzipFile | lzma.LZMAFile | zstandard.ZstdDecompressionReader


def archive_mtime() -> int:
    """The one mtime of every member: SOURCE_DATE_EPOCH (the reproducible-builds convention)
    where set, else 0. Never the files' own mtimes: those are cache extraction times."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    if value and not value.isdigit():
        # The convention says to fail rather than guess: a guess would go unnoticed.
        raise CoreosGpuError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds",
                             hint="unset it, or set it to a Unix time such as 1700000000",
                             code=ExitCode.CONFIG)
    return int(value or 0)


@dataclass(frozen=True)
class Digest:
    sha256: str
    size: int


class _Hashing:
    """Counts and hashes the bytes that pass through read() or write()."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    @property
    def digest(self) -> Digest:
        return Digest(self._hash.hexdigest(), self.size)


def _compressor(sink: IO[bytes], compression: Compression) -> _Compressed:
    if compression is Compression.GZIP:
        # filename="" and mtime=0: otherwise gzip records the temp file's name and the time.
        return gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=GZIP_LEVEL,
                             mtime=0)
    if compression is Compression.XZ:
        return lzma.LZMAFile(sink, "wb", preset=XZ_PRESET)
    # Single-threaded: zstd's multi-threaded output differs from its single-threaded one.
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(sink, closefd=False)


class ArchiveWriter:
    """Adds members to a compressed tar stream; the caller adds them in a fixed order."""

    def __init__(self, sink: BinaryIO, compression: Compression, *, mtime: int) -> None:
        self._sink = _Hashing(sink)
        # The compressors only write(); _Hashing is file enough for them.
        self._compressed = _compressor(cast(IO[bytes], self._sink), compression)
        self._tar = tarfile.TarFile(fileobj=self._compressed, mode="w",
                                    format=tarfile.PAX_FORMAT, encoding="utf-8",
                                    copybufsize=COPY_BUFFER)
        self._mtime = mtime

    def _info(self, name: str, kind: bytes, mode: int, size: int = 0,
              target: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, target
        info.mtime, info.uid, info.gid, info.uname, info.gname = self._mtime, 0, 0, "root", "root"
        return info

    def add_directory(self, name: str) -> None:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, 0o755))

    def add_symlink(self, name: str, target: str) -> None:
        self._tar.addfile(self._info(name, tarfile.SYMTYPE, 0o777, target=target))

    def add_file(self, name: str, source: Path, *, mode: int) -> Digest:
        with source.open("rb") as f:
            reader = _Hashing(f)
            size = os.fstat(f.fileno()).st_size
            self._tar.addfile(self._info(name, tarfile.REGTYPE, mode, size), reader)
        return reader.digest

    def add_bytes(self, name: str, data: bytes, *, mode: int) -> Digest:
        self._tar.addfile(self._info(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
        return Digest(hashlib.sha256(data).hexdigest(), len(data))

    def close(self) -> Digest:
        """End the tar and compressed streams; the digest of the compressed archive."""
        self._tar.close()
        self._compressed.close()
        return self.digest

    @property
    def digest(self) -> Digest:
        return self._sink.digest

    def discard(self) -> None:
        """Close without a care for the output, which is being thrown away; otherwise the
        compressor's finaliser would write to a closed file and print a warning."""
        for stream in (self._tar, self._compressed):
            with suppress(Exception):
                stream.close()


@contextmanager
def create_archive(output: Path, compression: Compression, *,
                   mtime: int) -> Iterator[ArchiveWriter]:
    """An ArchiveWriter onto a temporary file beside output, closed and renamed to output
    only when the block ends without an exception (Ctrl-C included): output is never
    half-written. The writer's digest is the archive's once the block has ended."""
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = ArchiveWriter(raw, compression, mtime=mtime)
            try:
                yield writer
                writer.close()
            except BaseException:
                writer.discard()
                raise
            raw.flush()
            os.fsync(raw.fileno())  # the rename must not outlive the data in a crash
        temporary.chmod(0o644)  # mkstemp's 0600 would keep the web server from serving it
        temporary.replace(output)
    except BaseException:
        with suppress(OSError):
            temporary.unlink()
        raise


def detect_compression(head: bytes) -> Compression | None:
    return next((c for c, magic in MAGIC.items() if head.startswith(magic)), None)


def _decompressor(raw: IO[bytes], compression: Compression) -> _Decompressed:
    if compression is Compression.GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression is Compression.XZ:
        return lzma.LZMAFile(raw, "rb")
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                      closefd=False)


@dataclass
class OpenArchive:
    compression: Compression
    tar: tarfile.TarFile  # in stream mode: read each member's data before the next member
    _raw: _Hashing

    def finish(self) -> Digest:
        """Read what is left of the file (the tar's padding) and return its digest."""
        while self._raw.read(COPY_BUFFER):
            pass
        return self._raw.digest


@contextmanager
def open_archive(path: Path) -> Iterator[OpenArchive]:
    """Open a bundle of any of the three compressions, recognised by magic bytes, not name."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise CoreosGpuError(f"cannot read {path}: {e.strerror}", code=ExitCode.BUNDLE) from e
    with f:
        compression = detect_compression(f.read(8))
        if compression is None:
            raise CoreosGpuError(f"{path} is not a gzip, xz or zstd compressed archive",
                                 hint="pass the nvidia.tar.gz that `coreos-gpu build` wrote",
                                 code=ExitCode.BUNDLE)
        f.seek(0)
        raw = _Hashing(f)
        try:
            with _decompressor(cast(IO[bytes], raw), compression) as stream, tarfile.open(
                    fileobj=stream, mode="r|", bufsize=COPY_BUFFER) as tar:
                yield OpenArchive(compression, tar, raw)
        except READ_ERRORS as e:
            raise CoreosGpuError(f"{path} is damaged or truncated: {e}",
                                 hint="download it again", code=ExitCode.BUNDLE) from e
