"""`coreos-gpu publish` to folders and to S3 (moto's server on 127.0.0.1): the layout it
writes, publishing again, two publishers at once, and every bad destination and input."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.keys import PrivateKey, fingerprint, load_private_key, sign, write_key_pair
from coreos_gpu.publish import now_utc
from coreos_gpu.publish import publish as publish_archives
from coreos_gpu.repository import Index, json_path, parse_text, render_text
from coreos_gpu.stores import Conflict, FolderStore, S3Store

from .bundletools import CLOUD, KERNEL, VERSION
from .conftest import CliResult, run_cli
from .repotools import (
    Bundles,
    aws_env,
    current_text,
    node_check,
    s3_client,
    start_racer,
)
from .test_repository import error, pub

Cli = Callable[..., CliResult]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- folders -------------------------------------------------------------------------------

def test_publish_to_a_folder_writes_the_layout(cli: Cli, tmp_path: Path, key: Path,
                                               bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    result = cli("publish", bundles.amd64, bundles.both, "--to", repo, "--key", key, "--json")
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["changed"] and shown["generation"] == 1
    assert [b["added"] for b in shown["bundles"]] == [True, True]
    pointer = (repo / "index.current").read_text()
    magic, version, sha = pointer.split()
    assert (magic, version, pointer.endswith("\n")) == ("coreos-gpu-repository", "1", True)
    files = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
    text = parse_text(current_text(repo).read_bytes(), str(repo))
    json_name = json_path(text.json_sha256)
    paths = {b["path"] for b in shown["bundles"]}
    assert files == {"index.current", ".lock", f"index/{sha}.txt", f"index/{sha}.txt.sig",
                     json_name, *paths}
    for path in files - {".lock"}:
        assert stat.S_IMODE((repo / path).stat().st_mode) == 0o644, path
    for bundle in shown["bundles"]:
        assert bundle["path"] == f"bundles/{bundle['sha256']}/nvidia.tar.gz"
        assert (repo / bundle["path"]).read_bytes() == Path(bundle["archive"]).read_bytes()
    lines = text.bundles
    # one line per (bundle, kernel): amd64 has one kernel, both has two
    assert sorted(line.kernel_release for line in lines) == sorted([KERNEL, KERNEL, CLOUD])
    assert {(line.driver_version, line.flavour, line.profile, line.os, line.releases)
            for line in lines if line.kernel_release == CLOUD} == {
        (VERSION, "proprietary", "compute", "flatcar", ("4081.2.0",))}
    assert (("3975.2.2", "3975.2.3") in {line.releases for line in lines})
    assert cli("repository", "verify", repo, "--key", pub(key)).code == 0


def test_publishing_again_changes_nothing(cli: Cli, tmp_path: Path, key: Path,
                                         bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    cli("publish", bundles.amd64, "--to", repo, "--key", key)
    before = snapshot(repo)
    again = cli("publish", bundles.amd64, bundles.amd64, "--to", repo, "--key", key, "--json")
    assert again.code == 0, again.stderr
    assert not json.loads(again.stdout)["changed"]
    assert json.loads(again.stdout)["bundles"] == [
        {**json.loads(again.stdout)["bundles"][0], "added": False}]
    assert snapshot(repo) == before


def test_publishing_more_keeps_what_is_there(cli: Cli, tmp_path: Path, key: Path,
                                            bundles: Bundles) -> None:
    repo = f"file://{tmp_path / 'repo'}"
    cli("publish", bundles.amd64, "--to", repo, "--key", key)
    first = json.loads(cli("repository", "list", repo, "--json").stdout)
    time.sleep(1.1)  # published times have whole seconds
    result = cli("publish", bundles.cloud, bundles.amd64, "--to", repo, "--key", key)
    assert result.code == 0 and "already there" in result.stdout and "added" in result.stdout
    second = json.loads(cli("repository", "list", repo, "--json").stdout)
    assert second["generation"] == 2
    assert len(second["bundles"]) == 2
    assert first["bundles"][0] in second["bundles"]  # its time unchanged
    check = node_check(tmp_path / "repo", pub(key), CLOUD)
    assert check.returncode == 0 and check.stdout.split()[3] == CLOUD, check
    text = parse_text(current_text(tmp_path / "repo").read_bytes(), "repo")
    assert [line.kernel_release for line in text.bundles].count(CLOUD) == 1


def test_an_archive_that_fails_inspect_stops_before_anything_is_written(
        cli: Cli, tmp_path: Path, key: Path, bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    line = error(cli("publish", bundles.amd64, bundles.broken, "--to", repo, "--key", key),
                 ExitCode.BUNDLE)
    assert str(bundles.broken) in line and "fails inspect" in line
    assert not repo.exists()
    (tmp_path / "notes.txt").write_text("not an archive")
    error(cli("publish", tmp_path / "notes.txt", "--to", repo, "--key", key), ExitCode.BUNDLE)
    error(cli("publish", tmp_path / "absent.tar.gz", "--to", repo, "--key", key),
          ExitCode.BUNDLE)
    assert not repo.exists()


@pytest.mark.parametrize("dest", ["a-file/repo", "/sys/coreos-gpu-test-repo"])
def test_a_destination_that_cannot_be_written(cli: Cli, tmp_path: Path, key: Path,
                                              bundles: Bundles, dest: str) -> None:
    (tmp_path / "a-file").write_text("")  # nothing goes beneath a file; /sys: not even root
    line = error(cli("publish", bundles.amd64, "--to", dest, "--key", key),
                 ExitCode.REPOSITORY)
    assert "cannot write" in line


def test_a_destination_that_is_no_folder_store(cli: Cli, key: Path, bundles: Bundles) -> None:
    assert "publish writes to a folder" in error(
        cli("publish", bundles.amd64, "--to", "https://example.invalid/repo", "--key", key),
        ExitCode.CONFIG)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder(cli: Cli, tmp_path: Path, key: Path, bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    cli("publish", bundles.amd64, "--to", repo, "--key", key)
    for path in [repo, *repo.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        error(cli("publish", bundles.cloud, "--to", repo, "--key", key), ExitCode.REPOSITORY)
    finally:
        for path in [repo, *repo.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


def test_a_publisher_with_another_key_cannot_extend_a_repository(
        cli: Cli, tmp_path: Path, key: Path, bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    cli("publish", bundles.amd64, "--to", repo, "--key", key)
    before = snapshot(repo)
    other = write_key_pair(tmp_path / "other.key").private
    line = error(cli("publish", bundles.cloud, "--to", repo, "--key", other),
                 ExitCode.SIGNATURE)
    assert "signed by another key" in line
    assert snapshot(repo) == before


def test_a_key_that_is_not_a_key_stops_before_anything_is_written(
        cli: Cli, tmp_path: Path, key: Path, bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    for bad in (pub(key), tmp_path / "absent.key"):
        error(cli("publish", bundles.amd64, "--to", repo, "--key", bad), ExitCode.KEY)
    assert not repo.exists()


def test_a_folder_publish_waits_for_the_lock(tmp_path: Path, key: Path,
                                             bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    with (repo / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-m", "coreos_gpu", "publish", str(bundles.amd64), "--to",
             str(repo), "--key", str(key)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2)
        assert proc.poll() is None and not (repo / "index.current").exists()
    assert proc.wait(timeout=60) == 0
    assert (repo / "index.current").exists()


def _race(tmp_path: Path, dest: str, key: Path, archives: list[Path], env: dict[str, str],
          *extra: str, wait: float) -> Path:
    race = tmp_path / "race"
    race.mkdir()
    procs = [start_racer(race, f"p{i}", len(archives), wait, "publish", archive, "--to", dest,
                         "--key", key, *extra, env=env, cwd=tmp_path)
             for i, archive in enumerate(archives)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert len(list(race.glob("*.ready"))) == len(archives)  # every one reached the swap
    return race


def test_two_publishers_to_one_folder_keep_both_entries(tmp_path: Path, key: Path,
                                                        bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    env = aws_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    start = time.monotonic()
    race = _race(tmp_path, str(repo), key, [bundles.amd64, bundles.cloud], env, wait=3)
    # The second waited for the lock, so the first waited out RACE_WAIT for it at the swap,
    # and never did a swap fail.
    assert time.monotonic() - start >= 3
    assert not list(race.glob("*.conflict"))
    listed = json.loads(run_cli("repository", "verify", repo, "--key", pub(key), "--json",
                                cwd=tmp_path, env=env).stdout)
    assert len(listed["bundles"]) == 2 and listed["generation"] == 2


# --- S3 ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def moto() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, a random port; its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in aws_env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return s3_client(moto)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"repo-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def s3_cli(tmp_path: Path, moto: str, *argv: str | Path) -> CliResult:
    return run_cli(*argv, "--s3-endpoint-url", moto, cwd=tmp_path, cache=tmp_path / "cache",
                   env=aws_env())


def test_publish_to_s3_and_verify(tmp_path: Path, moto: str, s3: Any, bucket: str,
                                  key: Path, bundles: Bundles) -> None:
    dest = f"s3://{bucket}/gpu/repo"
    result = s3_cli(tmp_path, moto, "publish", bundles.amd64, bundles.cloud, "--to", dest,
                    "--key", key, "--json")
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    sha = s3.get_object(Bucket=bucket, Key="gpu/repo/index.current")["Body"].read().split()[2]
    assert {f"gpu/repo/index/{sha.decode()}.txt", f"gpu/repo/index/{sha.decode()}.txt.sig",
            "gpu/repo/index.current",
            *(f"gpu/repo/{b['path']}" for b in shown["bundles"])} < keys
    head = s3.head_object(Bucket=bucket, Key=f"gpu/repo/{shown['bundles'][0]['path']}")
    assert head["CacheControl"].endswith("immutable")
    assert s3.head_object(Bucket=bucket, Key="gpu/repo/index.current")["CacheControl"] == \
        "no-cache"
    # a copy of the prefix is a folder repository a node checks with openssl
    copy = tmp_path / "copy"
    for name in keys:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(s3.get_object(Bucket=bucket, Key=name)["Body"].read())
    assert node_check(copy / "gpu/repo", pub(key)).returncode == 0
    verified = s3_cli(tmp_path, moto, "repository", "verify", dest, "--key", pub(key))
    assert verified.code == 0, verified.stderr
    etag = s3.head_object(Bucket=bucket, Key="gpu/repo/index.current")["ETag"]
    again = s3_cli(tmp_path, moto, "publish", bundles.amd64, "--to", dest, "--key", key)
    assert again.code == 0 and "already there" in again.stdout
    assert s3.head_object(Bucket=bucket, Key="gpu/repo/index.current")["ETag"] == etag
    # tampering with a bundle in the bucket
    victim = f"gpu/repo/{shown['bundles'][1]['path']}"
    s3.put_object(Bucket=bucket, Key=victim, Body=b"something else")
    line = error(s3_cli(tmp_path, moto, "repository", "verify", dest, "--key", pub(key)),
                 ExitCode.DIGEST)
    assert shown["bundles"][1]["path"] in line


def test_the_pointer_swap_is_conditional(moto: str, s3: Any, bucket: str, key: Path,
                                         bundles: Bundles) -> None:
    store = S3Store(bucket, "", endpoint_url=moto)
    publish_archives([bundles.amd64], store, load_private_key(key))
    pointer, etag = store.read_pointer()
    assert pointer is not None
    publish_archives([bundles.cloud], store, load_private_key(key))
    with pytest.raises(Conflict):
        store.swap_pointer(pointer, etag)  # a publisher that read before the second one
    with pytest.raises(Conflict):
        store.swap_pointer(pointer, "")  # one that saw no repository at all


def test_two_publishers_to_one_s3_prefix_keep_both_entries(
        tmp_path: Path, moto: str, bucket: str, key: Path, bundles: Bundles) -> None:
    dest = f"s3://{bucket}/repo"
    env = aws_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    archives = [bundles.amd64, bundles.cloud, bundles.other_tool]
    # A long wait: the racers return from it as soon as all are there, and a loaded machine
    # may start them seconds apart.
    race = _race(tmp_path, dest, key, archives, env, "--s3-endpoint-url", moto, wait=30)
    # No lock: they all met at the swap with the same index read, so all but one had their
    # swap refused (412 on If-Match), read again and retried.
    assert len(list(race.glob("*.conflict"))) == len(archives) - 1
    listed = json.loads(s3_cli(tmp_path, moto, "repository", "verify", dest, "--key",
                               pub(key), "--json").stdout)
    assert len(listed["bundles"]) == 3 and listed["generation"] == 3


def test_an_s3_bucket_that_does_not_exist(tmp_path: Path, moto: str, s3: Any, key: Path,
                                          bundles: Bundles) -> None:
    for argv in (["publish", bundles.amd64, "--to", "s3://no-such-bucket/x", "--key", key],
                 ["repository", "list", "s3://no-such-bucket/x"]):
        assert "bucket does not exist" in error(s3_cli(tmp_path, moto, *argv),
                                                ExitCode.REPOSITORY)


def test_an_s3_prefix_without_a_repository(tmp_path: Path, moto: str, bucket: str,
                                           key: Path) -> None:
    assert "no index.current" in error(
        s3_cli(tmp_path, moto, "repository", "verify", f"s3://{bucket}/x", "--key", pub(key)),
        ExitCode.REPOSITORY)


def test_s3_access_denied(tmp_path: Path, moto: str, s3: Any, bucket: str, key: Path,
                          bundles: Bundles) -> None:
    import boto3

    iam = boto3.client("iam", endpoint_url=moto, region_name="us-east-1")
    iam.create_user(UserName="nobody")
    access = iam.create_access_key(UserName="nobody")["AccessKey"]
    httpx.post(f"{moto}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:  # from now on moto checks every request against IAM: nobody may do nothing
        result = run_cli("publish", bundles.amd64, "--to", f"s3://{bucket}/repo", "--key", key,
                         "--s3-endpoint-url", moto, cwd=tmp_path, cache=tmp_path / "cache",
                         env=aws_env(AWS_ACCESS_KEY_ID=access["AccessKeyId"],
                                     AWS_SECRET_ACCESS_KEY=access["SecretAccessKey"]))
    finally:
        httpx.post(f"{moto}/moto-api/reset-auth", content=b"inf").raise_for_status()
    assert "access denied" in error(result, ExitCode.REPOSITORY)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def test_an_s3_endpoint_that_does_not_answer(tmp_path: Path, key: Path,
                                             bundles: Bundles) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    line = error(run_cli("publish", bundles.amd64, "--to", "s3://bucket/repo", "--key", key,
                         "--s3-endpoint-url", closed, cwd=tmp_path, env=aws_env()),
                 ExitCode.REPOSITORY)
    assert "cannot reach s3://bucket/repo" in line


def test_s3_without_credentials(tmp_path: Path, key: Path, bundles: Bundles,
                                moto: str) -> None:
    env = {k: v for k, v in aws_env().items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    # run_cli adds its own environment: empty values hide any credentials it has
    env |= {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    line = error(run_cli("publish", bundles.amd64, "--to", "s3://bucket/repo", "--key", key,
                         "--s3-endpoint-url", moto, cwd=tmp_path, env=env),
                 ExitCode.REPOSITORY)
    assert "no AWS credentials" in line


# --- write order ---------------------------------------------------------------------------

class RecordingStore(FolderStore):
    """A folder store that logs every write, and can fail one, as a full disk or a dropped
    connection would."""

    def __init__(self, root: Path, fail: str = "") -> None:
        super().__init__(root)
        self.writes: list[str] = []
        self.fail = fail

    def _log(self, name: str) -> None:
        if self.fail and name.endswith(self.fail):
            raise CoreosGpuError(f"cannot write {name}", code=ExitCode.REPOSITORY)
        self.writes.append(name)

    def put_file(self, name: str, source: Path, sha256: str) -> None:
        self._log(name)
        super().put_file(name, source, sha256)

    def put_bytes(self, name: str, data: bytes) -> None:
        self._log(name)
        super().put_bytes(name, data)

    def swap_pointer(self, data: bytes, version: str) -> None:
        self._log("index.current")
        super().swap_pointer(data, version)


def test_the_pointer_is_written_last(tmp_path: Path, key: Path, bundles: Bundles) -> None:
    store = RecordingStore(tmp_path / "repo")
    publish_archives([bundles.amd64, bundles.cloud], store, load_private_key(key))
    kinds = [("bundle" if name.startswith("bundles/") else name.rsplit(".", 1)[-1])
             for name in store.writes]
    assert kinds == ["bundle", "bundle", "json", "sig", "txt", "current"]


@pytest.mark.parametrize("fail", [".json", ".sig", ".txt", "index.current"])
def test_a_publish_that_fails_midway_leaves_the_old_index(
        cli: Cli, tmp_path: Path, key: Path, bundles: Bundles, fail: str) -> None:
    repo = tmp_path / "repo"
    publish_archives([bundles.amd64], FolderStore(repo), load_private_key(key))
    pointer = (repo / "index.current").read_bytes()
    with pytest.raises(CoreosGpuError):
        publish_archives([bundles.cloud], RecordingStore(repo, fail), load_private_key(key))
    assert (repo / "index.current").read_bytes() == pointer
    verified = cli("repository", "verify", repo, "--key", pub(key), "--json")
    assert verified.code == 0 and json.loads(verified.stdout)["generation"] == 1
    assert node_check(repo, pub(key)).returncode == 0


# --- an index.current set back -------------------------------------------------------------

def _hinted_pointer(hint: str) -> str:
    return hint.split("write the line '", 1)[1].split("'", 1)[0]


def test_an_index_current_set_back_is_refused_until_repaired(
        cli: Cli, tmp_path: Path, key: Path, bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish_archives([bundles.amd64], FolderStore(repo), load_private_key(key))
    first = (repo / "index.current").read_bytes()
    publish_archives([bundles.cloud], FolderStore(repo), load_private_key(key))
    second = (repo / "index.current").read_bytes()
    # A restore from backup: the pointer, and (copied again) the text index it names, which
    # so looks newer than generation 2's.
    (repo / "index.current").write_bytes(first)
    later = time.time() + 3 * 3600
    os.utime(current_text(repo), (later, later))
    before = snapshot(repo)
    result = cli("publish", bundles.other_tool, "--to", repo, "--key", key)
    line = error(result, ExitCode.REPOSITORY)
    sha = second.split()[2].decode()
    assert f"index.current names generation 1, but index/{sha}.txt (signed by this key) is " \
           "generation 2" in line
    assert snapshot(repo) == before  # not even the bundle
    pointer = _hinted_pointer(result.error_lines[-1])
    assert pointer == second.decode().strip()
    (repo / "index.current").write_text(pointer + "\n")
    again = cli("publish", bundles.other_tool, "--to", repo, "--key", key, "--json")
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["generation"] == 3
    listed = json.loads(cli("repository", "verify", repo, "--key", pub(key), "--json").stdout)
    assert len(listed["bundles"]) == 3


def _index_text(generation: int, key: PrivateKey) -> bytes:
    return render_text(Index(generation, now_utc(), fingerprint(key.public_key()), ()),
                       "0" * 64)


def _plant(repo: Path, text: bytes, signature: bytes | None, name: str = "") -> None:
    """A text index in repo/index/, under its sha256 (or name), with that signature."""
    path = repo / "index" / (name or f"{hashlib.sha256(text).hexdigest()}.txt")
    path.write_bytes(text)
    if signature is not None:
        path.with_name(f"{path.name}.sig").write_bytes(signature)


def test_only_an_index_this_key_signed_can_stop_a_publish(tmp_path: Path, key: Path,
                                                          bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    own = load_private_key(key)
    publish_archives([bundles.amd64], FolderStore(repo), own)
    other = load_private_key(write_key_pair(tmp_path / "other.key").private)
    _plant(repo, text := _index_text(9, other), sign(other, text))
    _plant(repo, _index_text(8, own), None)
    _plant(repo, _index_text(7, own), b"not a signature")
    # signed, but the pointer cannot name it: not the bytes its name says
    _plant(repo, text := _index_text(6, own), sign(own, text), name=f"{'a' * 64}.txt")
    (repo / "index" / "notes.txt").write_text("generation 99\n")
    result = publish_archives([bundles.cloud], FolderStore(repo), own)
    assert result.changed and result.generation == 2


def test_a_missing_index_current_is_refused_too(tmp_path: Path, key: Path,
                                                bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish_archives([bundles.amd64], FolderStore(repo), load_private_key(key))
    (repo / "index.current").unlink()  # a new generation 1 would be refused by the nodes
    with pytest.raises(CoreosGpuError, match=r"index\.current is missing, but .* is generation 1"):
        publish_archives([bundles.cloud], FolderStore(repo), load_private_key(key))
    assert not (repo / "index.current").exists()


class CountingStore(FolderStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read(self, name: str) -> bytes:
        self.reads.append(name)
        return super().read(name)


def test_only_indexes_written_since_the_current_one_are_read(tmp_path: Path, key: Path,
                                                             bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    for archive in (bundles.amd64, bundles.cloud, bundles.other_tool):
        publish_archives([archive], FolderStore(repo), load_private_key(key))
    current = current_text(repo)
    old = [f"index/{p.name}" for p in (repo / "index").glob("*.txt") if p != current]
    day_ago = time.time() - 86400
    for name in old:
        os.utime(repo / name, (day_ago, day_ago))
    listed = FolderStore(repo).list_indexes()
    assert {f.name for f in listed} == {*old, f"index/{current.name}"}
    assert {f.modified for f in listed if f.name in old} == {day_ago}
    store = CountingStore(repo)
    assert publish_archives([bundles.both], store, load_private_key(key)).generation == 4
    assert not set(old) & set(store.reads)


def test_an_s3_index_current_set_back_is_refused_until_repaired(
        moto: str, s3: Any, bucket: str, key: Path, bundles: Bundles) -> None:
    store = S3Store(bucket, "gpu/repo", endpoint_url=moto)
    own = load_private_key(key)
    publish_archives([bundles.amd64], store, own)
    first = s3.get_object(Bucket=bucket, Key="gpu/repo/index.current")["Body"].read()
    publish_archives([bundles.cloud], store, own)
    listed = store.list_indexes()
    assert len(listed) == 2 and all(f.name.startswith("index/") and f.name.endswith(".txt")
                                    and abs(f.modified - time.time()) < 600 for f in listed)
    unsigned = _index_text(9, own)  # counts for nothing
    s3.put_object(Bucket=bucket, Body=unsigned,
                  Key=f"gpu/repo/index/{hashlib.sha256(unsigned).hexdigest()}.txt")
    time.sleep(1.1)  # S3 times have whole seconds: an index of index.current's may be in flight
    s3.put_object(Bucket=bucket, Key="gpu/repo/index.current", Body=first)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    with pytest.raises(CoreosGpuError) as refused:
        publish_archives([bundles.other_tool], store, own)
    assert refused.value.code == ExitCode.REPOSITORY
    assert "names generation 1" in str(refused.value)
    assert "is generation 2" in str(refused.value)
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == keys
    assert s3.get_object(Bucket=bucket, Key="gpu/repo/index.current")["Body"].read() == first
    s3.put_object(Bucket=bucket, Key="gpu/repo/index.current",
                  Body=_hinted_pointer(refused.value.hint).encode() + b"\n")
    assert publish_archives([bundles.other_tool], store, own).generation == 3
    # A publish that stops before its swap leaves a newer index, as one about to swap does:
    # on S3, with no lock, neither blocks the next publish.
    with pytest.raises(CoreosGpuError, match="dropped"):
        publish_archives([bundles.both], StoppingS3Store(bucket, "gpu/repo", endpoint_url=moto),
                         own)
    assert publish_archives([bundles.both], store, own).generation == 4


class StoppingS3Store(S3Store):
    def swap_pointer(self, data: bytes, version: str) -> None:
        raise CoreosGpuError("the connection dropped", code=ExitCode.REPOSITORY)
