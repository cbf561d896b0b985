"""Where a repository lives: a folder (or file:// URL), an S3 prefix, or any HTTP(S) server.

Readers (repository.Reader) serve `repository list/verify`; stores, which also write, serve
`publish`. A store offers what publishing safely needs: content-addressed files written once
(a second write of the same name is a no-op: same name, same bytes), and a conditional swap
of the one mutable file, index.current, that fails when another publisher swapped it since
it was read. A folder gets that from a flock held for the whole publish; S3 from conditional
PUTs (If-None-Match: * for new objects, If-Match on the ETag read for the pointer).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from coreos_gpu.cache import sha256_of
from coreos_gpu.errors import CoreosGpuError, DownloadError, ExitCode
from coreos_gpu.fetch import fetch, forget
from coreos_gpu.repository import POINTER, MissingFile, Reader

LOCK_NAME = ".lock"
INDEX_FOLDER = "index"  # where repository.text_path puts the indexes
_CHUNK = 1 << 20
# Content-addressed files never change, so caches (CloudFront, proxies) may keep them;
# the pointer must be asked for every time.
_IMMUTABLE = "public, max-age=31536000, immutable"
_MUTABLE = "no-cache"


class Conflict(Exception):
    """Another publisher swapped index.current since it was read: read again and retry."""


@dataclass(frozen=True)
class Listed:
    """A file a store holds, as its listing shows it."""

    name: str  # relative to the repository: index/<sha256>.txt
    modified: float  # POSIX seconds, by the store's clock (a folder's mtime, S3's LastModified)


class Store(Reader, Protocol):
    def locked(self) -> AbstractContextManager[None]: ...

    def list_indexes(self) -> list[Listed]: ...  # every index/*.txt, in no order

    # Index files modified at or after this time may be a publish's still at work, or one
    # that stopped before swapping index.current (version: as read_pointer gave it).
    def in_flight_after(self, version: str) -> float: ...

    def read_pointer(self) -> tuple[bytes | None, str]: ...  # data (None: absent), version

    def put_file(self, name: str, source: Path, sha256: str) -> None: ...

    def put_bytes(self, name: str, data: bytes) -> None: ...

    def swap_pointer(self, data: bytes, version: str) -> None: ...  # Conflict


def _repository_error(message: str, hint: str = "") -> CoreosGpuError:
    return CoreosGpuError(message, hint=hint, code=ExitCode.REPOSITORY)


# --- a folder --------------------------------------------------------------------------------


class FolderStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise MissingFile(f"{self.root / name} does not exist") from e
        except OSError as e:
            raise _repository_error(f"cannot read {self.root / name}: {e.strerror or e}") from e

    def digest(self, name: str) -> tuple[str, int]:
        path = self.root / name
        try:
            return sha256_of(path), path.stat().st_size
        except (FileNotFoundError, NotADirectoryError) as e:
            raise MissingFile(f"{path} does not exist") from e
        except OSError as e:
            raise _repository_error(f"cannot read {path}: {e.strerror or e}") from e

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise _repository_error(f"cannot write {e.filename or path}: {e.strerror or e}",
                                    hint="publish needs write access to the repository "
                                    "folder") from e

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The whole publish holds this: two publishers to one folder take turns, so the
        second reads the index the first wrote. (flock: local file systems; over NFS it
        needs a server with lock support.)"""
        with self._writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            lock = (self.root / LOCK_NAME).open("a")
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read_pointer(self) -> tuple[bytes | None, str]:
        try:
            return self.read(POINTER), ""
        except MissingFile:
            return None, ""

    def list_indexes(self) -> list[Listed]:
        folder = self.root / INDEX_FOLDER
        try:
            with os.scandir(folder) as entries:
                # is_file: not a dangling link; a leading dot: _write's temporary files
                return [Listed(f"{INDEX_FOLDER}/{e.name}", e.stat().st_mtime) for e in entries
                        if e.name.endswith(".txt") and not e.name.startswith(".")
                        and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise _repository_error(f"cannot list {folder}: {e.strerror or e}") from e

    def in_flight_after(self, version: str) -> float:
        # None is: publishers hold the lock for the whole publish. (index.current's mtime
        # could not tell one anyway: a copy restored with rsync -a or cp -p keeps its old one.)
        return math.inf

    def _write(self, dest: Path, write: Any) -> None:
        """Through a temporary file beside dest, renamed over it: never half a file. The data
        is on disk before the rename, so a crash cannot leave a name for missing bytes."""
        with self._writing(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    write(out)
                    out.flush()
                    os.fchmod(out.fileno(), 0o644)  # served by a web server's user
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def put_file(self, name: str, source: Path, sha256: str) -> None:
        dest = self.root / name
        if dest.is_file() and sha256_of(dest) == sha256:
            return  # already there; a damaged copy is replaced

        def copy(out: Any) -> None:
            with source.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)

        self._write(dest, copy)

    def put_bytes(self, name: str, data: bytes) -> None:
        dest = self.root / name
        if dest.is_file() and dest.read_bytes() == data:
            return
        self._write(dest, lambda out: out.write(data))

    def swap_pointer(self, data: bytes, version: str) -> None:
        self._write(self.root / POINTER, lambda out: out.write(data))  # under locked()


# --- S3 --------------------------------------------------------------------------------------


def _s3_error(location: str, error: Exception) -> CoreosGpuError:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return _repository_error(f"no AWS credentials to reach {location}",
                                 hint="set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return _repository_error(f"{location}: the bucket does not exist",
                                     hint="create it, or check the bucket name and region")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch"):
            return _repository_error(f"{location}: access denied ({code or status})",
                                     hint="check the AWS credentials and the bucket's policy")
        return _repository_error(f"{location}: S3 answered {code or status}: {error}")
    return _repository_error(f"cannot reach {location}: {error}",
                             hint="check --s3-endpoint-url, the region and the network")


def _client_code(error: Exception) -> tuple[str, int | None]:
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return "", None
    return (str(error.response.get("Error", {}).get("Code", "")),
            error.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


class S3Store:
    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str = "") -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(
            retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10,
            # S3-compatible servers (MinIO, Ceph, moto) want path-style requests and may
            # not know the CRC checksums recent botocore adds to every upload.
            s3={"addressing_style": "path"} if endpoint_url else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required")
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextmanager
    def _calling(self, name: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            code, status = _client_code(e)
            if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                raise MissingFile(f"{self.location}/{name} does not exist") from e
            raise _s3_error(self.location, e) from e
        except BotoCoreError as e:
            raise _s3_error(self.location, e) from e

    def read(self, name: str) -> bytes:
        with self._calling(name):
            body: bytes = self.client.get_object(Bucket=self.bucket,
                                                 Key=self._key(name))["Body"].read()
            return body

    def digest(self, name: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        with self._calling(name):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def locked(self) -> AbstractContextManager[None]:
        return nullcontext()  # conditional writes instead: two CI jobs share no lock

    def read_pointer(self) -> tuple[bytes | None, str]:
        try:
            with self._calling(POINTER):
                answer = self.client.get_object(Bucket=self.bucket, Key=self._key(POINTER))
                return answer["Body"].read(), str(answer["ETag"])
        except MissingFile:
            return None, ""

    def list_indexes(self) -> list[Listed]:
        prefix = self._key(f"{INDEX_FOLDER}/")
        found = []
        with self._calling(prefix):
            # 1000 keys a page; the delimiter keeps to index/ itself, as a folder's listing
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                found += [Listed(f"{INDEX_FOLDER}/{item['Key'].removeprefix(prefix)}",
                                 item["LastModified"].timestamp())
                          for item in page.get("Contents", []) if item["Key"].endswith(".txt")]
        return found

    def in_flight_after(self, version: str) -> float:
        """When index.current was written: S3 publishers share no lock, so an index written
        since may be another's, about to be swapped in, or one whose publish stopped. S3
        stamps every write (a restore's too), so an index written before was there when
        index.current was written. When it is absent, or changed since it was read (the
        caller's swap will fail), every index may be in flight."""
        from botocore.exceptions import ClientError

        if not version:
            return -math.inf
        try:
            with self._calling(POINTER):
                try:
                    head = self.client.head_object(Bucket=self.bucket, Key=self._key(POINTER),
                                                   IfMatch=version)
                except ClientError as e:
                    if _client_code(e)[1] == 412:
                        return -math.inf
                    raise
        except MissingFile:
            return -math.inf
        return float(head["LastModified"].timestamp())

    def _exists(self, name: str, sha256: str) -> bool:
        try:
            with self._calling(name):
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except MissingFile:
            return False
        return bool(head.get("Metadata", {}).get("sha256") == sha256)

    def put_file(self, name: str, source: Path, sha256: str) -> None:
        if self._exists(name, sha256):
            return
        # Multipart for large bundles. Two publishers of one bundle write the same bytes to
        # the same key, so no condition is needed here.
        with self._calling(name):
            self.client.upload_file(str(source), self.bucket, self._key(name), ExtraArgs={
                "Metadata": {"sha256": sha256}, "CacheControl": _IMMUTABLE,
                "ContentType": "application/octet-stream"})

    def _put(self, name: str, data: bytes, **options: str) -> int | None:
        """One PUT; the status of a failed condition (412, or 409 when another conditional
        write of the key was in flight), None when written."""
        from botocore.exceptions import ClientError

        with self._calling(name):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                       **options)
            except ClientError as e:
                status = _client_code(e)[1]
                if status in (409, 412):
                    return int(status)
                raise
        return None

    def put_bytes(self, name: str, data: bytes) -> None:
        # A failed If-None-Match means the name is there, and so are these bytes: the name
        # is their sha256.
        self._put(name, data, IfNoneMatch="*", CacheControl=_IMMUTABLE)

    def swap_pointer(self, data: bytes, version: str) -> None:
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        if self._put(POINTER, data, CacheControl=_MUTABLE, ContentType="text/plain",
                     **condition) is not None:
            raise Conflict()


# --- HTTP(S), read-only ----------------------------------------------------------------------


class HttpReader:
    def __init__(self, base_url: str, cache_dir: Path) -> None:
        self.location = base_url.rstrip("/")
        self.cache_dir = cache_dir

    def _fetch(self, name: str) -> Path:
        url = f"{self.location}/{name}"
        try:
            # fresh: what the repository holds now, not what an earlier run cached
            return fetch(url, self.cache_dir, fresh=True)
        except DownloadError as e:
            if e.not_found:
                raise MissingFile(f"{url} does not exist (HTTP {e.status})") from e
            raise _repository_error(f"cannot read the repository at {self.location}: "
                                    f"{e.message}") from e

    def read(self, name: str) -> bytes:
        return self._fetch(name).read_bytes()

    def digest(self, name: str) -> tuple[str, int]:
        path = self._fetch(name)
        try:
            return sha256_of(path), path.stat().st_size
        finally:
            forget(f"{self.location}/{name}", self.cache_dir)  # checked, not kept


# --- by URL ----------------------------------------------------------------------------------


def _s3_parts(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if not parts.netloc:
        raise CoreosGpuError(f"{url}: an S3 URL is s3://BUCKET[/PREFIX]", code=ExitCode.CONFIG)
    return parts.netloc, parts.path


def _folder(url: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    return Path(url).expanduser() if parts.scheme == "" else None


def open_reader(url: str, *, cache_dir: Path, s3_endpoint_url: str = "") -> Reader:
    """A folder, file://, http(s):// or s3:// URL's repository, for reading."""
    folder = _folder(url)
    if folder is not None:
        return FolderStore(folder)
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return HttpReader(url, cache_dir)
    if scheme == "s3":
        return S3Store(*_s3_parts(url), endpoint_url=s3_endpoint_url)
    raise CoreosGpuError(f"{url}: unsupported repository URL scheme {scheme!r}",
                         hint="use a folder, file://, http://, https:// or s3://",
                         code=ExitCode.CONFIG)


def open_store(dest: str, *, s3_endpoint_url: str = "") -> Store:
    """A folder, file:// or s3:// destination, for publishing."""
    folder = _folder(dest)
    if folder is not None:
        return FolderStore(folder)
    scheme = urlsplit(dest).scheme
    if scheme == "s3":
        return S3Store(*_s3_parts(dest), endpoint_url=s3_endpoint_url)
    raise CoreosGpuError(
        f"cannot publish to {dest}: publish writes to a folder, file:// or s3://",
        hint="publish to the folder or bucket that the HTTP server serves",
        code=ExitCode.CONFIG)
