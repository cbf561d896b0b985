"""The repository verbs of the `coreos-gpu` command: keygen, publish, repository
list/verify/refresh.

cli.py declares their arguments and the settings each takes, and runs them; like the other
verbs, each calls the stages (keys, publish, repository, stores) and returns a Result that
cli.py prints.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from coreos_gpu import ui
from coreos_gpu.config import BuildConfig, config_of
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.keys import (
    KeyPair,
    fingerprint,
    load_private_key,
    load_public_key,
    write_key_pair,
)
from coreos_gpu.publish import PublishResult, now_utc, publish, refresh
from coreos_gpu.repository import (
    BundleCheck,
    LoadedIndex,
    check_bundles,
    expiry_problem,
    render_json,
    require_index,
    text_path,
)
from coreos_gpu.results import Block, Error, Fields, Log, Result, Table
from coreos_gpu.stores import open_reader, open_store


def _reader(args: argparse.Namespace) -> Any:
    config = config_of(args)
    return open_reader(args.url, cache_dir=config.cache_dir,
                       s3_endpoint_url=config.s3_endpoint_url)


def publish_target(config: BuildConfig, to: str, key: str) -> tuple[str, Path]:
    """Where to publish and with which key: the flags, else the publish_to and publish_key
    settings."""
    to, key = to or config.publish_to, key or config.publish_key
    if not to or not key:
        missing = " and ".join(name for name, value in (("--to", to), ("--key", key))
                               if not value)
        raise CoreosGpuError(f"publish needs {missing}: where the repository is and the key "
                             "that signs its index", hint="pass them, or set publish_to and "
                             "publish_key in the config file", code=ExitCode.CONFIG)
    return to, Path(key).expanduser()


def cmd_keygen(args: argparse.Namespace) -> KeygenResult:
    return KeygenResult(write_key_pair(args.output))


@dataclass(frozen=True)
class KeygenResult(Result):
    pair: KeyPair

    def to_json(self) -> Any:
        pair = self.pair
        return {"private_key": str(pair.private), "public_key": str(pair.public),
                "fingerprint": pair.fingerprint}

    def to_text(self) -> Iterable[Block]:
        pair = self.pair
        yield Fields([("private key", f"{pair.private} (keep it secret: it signs the "
                                         "index)"),
                         ("public key", f"{pair.public} (nodes and `repository verify` "
                                        "check with it)"),
                         ("fingerprint", pair.fingerprint)])


def cmd_publish(args: argparse.Namespace) -> PublishResultView:
    config = config_of(args)
    to, key_path = publish_target(config, args.to, args.key)
    key = load_private_key(key_path)  # a bad key fails before anything is read or written
    store = open_store(to, s3_endpoint_url=config.s3_endpoint_url)
    with ui.step(f"publishing {len(args.archives)} archive(s) to {store.location}"):
        return PublishResultView(publish(args.archives, store, key, lifetime=lifetime(config)))


def lifetime(config: BuildConfig) -> timedelta:
    return timedelta(days=config.index_lifetime)


def cmd_repository_refresh(args: argparse.Namespace) -> RefreshResult:
    config = config_of(args)
    to, key_path = publish_target(config, args.to, args.key)
    key = load_private_key(key_path)
    store = open_store(to, s3_endpoint_url=config.s3_endpoint_url)
    with ui.step(f"refreshing {store.location}"):
        return RefreshResult(refresh(store, key, lifetime=lifetime(config)),
                             config.index_lifetime)


@dataclass(frozen=True)
class PublishResultView(Result):
    """What publish did (publish.PublishResult), as the verb shows it."""

    result: PublishResult

    def to_json(self) -> Any:
        result = self.result
        return {"repository": result.location, "generation": result.generation,
                "index": text_path(result.index_sha256), "changed": result.changed,
                "bundles": [{"archive": str(p.archive), "path": p.entry.path,
                             "sha256": p.entry.sha256, "added": p.added}
                            for p in result.bundles]}

    def to_text(self) -> Iterable[Block]:
        result = self.result
        yield Fields([("repository", result.location),
                         ("index", f"{text_path(result.index_sha256)} (generation "
                                   f"{result.generation}"
                                   f"{'' if result.changed else ', unchanged'})")])
        yield Table("bundles", ("archive", "path", "driver", "kernels", "state"),
                       [(p.archive, p.entry.path, p.entry.driver_version,
                         ", ".join(p.entry.kernel_releases),
                         "added" if p.added else "already there") for p in result.bundles])


@dataclass(frozen=True)
class RefreshResult(PublishResultView):
    """repository refresh: its JSON is publish's, its text the new index and its lifetime."""

    days: int  # index_lifetime

    def to_text(self) -> Iterable[Block]:
        result = self.result
        yield Fields([("repository", result.location),
                         ("index", f"{text_path(result.index_sha256)} (generation "
                                   f"{result.generation}, valid {self.days} days)")])


def _summary(loaded: LoadedIndex, location: str, signature: str) -> list[tuple[str, Any]]:
    index = loaded.index
    return [("repository", location), ("index", text_path(loaded.text_sha256)),
            ("generation", index.generation), ("created", index.created),
            ("expires", index.expires or "never (nodes refuse it: run repository refresh)"),
            ("signed by", index.key), ("signature", signature)]


def cmd_repository_list(args: argparse.Namespace) -> RepositoryListResult:
    key = load_public_key(args.key) if args.key else None
    reader = _reader(args)
    loaded = require_index(reader, key)
    signature = f"OK ({fingerprint(key)})" if key else "not checked (no --key)"
    return RepositoryListResult(loaded, reader.location, signature)


@dataclass(frozen=True)
class RepositoryListResult(Result):
    loaded: LoadedIndex
    location: str
    signature: str  # whether and with which key it was checked

    def summary(self) -> list[tuple[str, Any]]:
        return _summary(self.loaded, self.location, self.signature)

    def summary_json(self) -> dict[str, Any]:
        return {k.replace(" ", "_"): v for k, v in self.summary()}

    def to_json(self) -> Any:
        return self.summary_json() | {
            "bundles": json.loads(render_json(self.loaded.index))["bundles"]}

    def to_text(self) -> Iterable[Block]:
        yield Fields(self.summary())
        yield Table("bundles", ("driver", "flavour", "profile", "os", "releases", "kernel",
                                   "size", "published", "path"),
                       [(e.driver_version, e.flavour, e.profile, e.os,
                         ",".join(e.releases_of(k)) or "-", k, e.size, e.published, e.path)
                        for e in self.loaded.index.entries for k in e.kernel_releases])


def cmd_repository_verify(args: argparse.Namespace) -> RepositoryVerifyResult:
    key = load_public_key(args.key)
    reader = _reader(args)
    with ui.step(f"verifying {reader.location}"):
        loaded = require_index(reader, key)
        checks = check_bundles(reader, loaded.index)
    bad = [c for c in checks if c.problem]
    if bad:
        failure = (f"{len(bad)} of {len(checks)} bundles fail: {bad[0].problem}", bad[0].code)
    elif problem := expiry_problem(loaded.index, now_utc()):
        failure = (f"{reader.location}: {problem}", ExitCode.REPOSITORY)
    else:
        failure = ("", ExitCode.OK)
    return RepositoryVerifyResult(loaded, reader.location, f"OK ({fingerprint(key)})", checks,
                                  *failure)


@dataclass(frozen=True)
class RepositoryVerifyResult(RepositoryListResult):
    """The checks, shown in full; then, as an error, the first that failed (or the index's
    expiry), whose code is the verb's."""

    checks: Sequence[BundleCheck]
    failure: str  # "": none
    failure_code: ExitCode

    def to_json(self) -> Any:
        return self.summary_json() | {
            "bundles": [{"path": c.entry.path, "sha256": c.entry.sha256, "ok": not c.problem,
                         "problem": c.problem} for c in self.checks]}

    def to_text(self) -> Iterable[Block]:
        yield Fields(self.summary())
        yield Table("bundles", ("path", "size", "state"),
                       [(c.entry.path, c.entry.size, c.problem or "OK") for c in self.checks])

    def messages(self) -> Iterable[Log | Error]:
        if self.failure:
            yield Error(self.failure)

    @property
    def code(self) -> int:
        return int(self.failure_code)
