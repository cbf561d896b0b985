"""The repository verbs of the `coreos-gpu` command: keygen, publish, repository
list/verify/refresh.

cli.py declares their arguments and the settings each takes, and runs them; like the other
verbs, each calls the stages (keys, publish, repository, stores) and renders through ui.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

from coreos_gpu import ui
from coreos_gpu.config import BuildConfig, config_of
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.keys import fingerprint, load_private_key, load_public_key, write_key_pair
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


def cmd_keygen(args: argparse.Namespace) -> None:
    pair = write_key_pair(args.output)
    if args.json:
        ui.print_json({"private_key": str(pair.private), "public_key": str(pair.public),
                       "fingerprint": pair.fingerprint})
    else:
        ui.print_fields([("private key", f"{pair.private} (keep it secret: it signs the "
                                         "index)"),
                         ("public key", f"{pair.public} (nodes and `repository verify` "
                                        "check with it)"),
                         ("fingerprint", pair.fingerprint)])


def cmd_publish(args: argparse.Namespace) -> None:
    config = config_of(args)
    to, key_path = publish_target(config, args.to, args.key)
    key = load_private_key(key_path)  # a bad key fails before anything is read or written
    store = open_store(to, s3_endpoint_url=config.s3_endpoint_url)
    with ui.step(f"publishing {len(args.archives)} archive(s) to {store.location}"):
        result = publish(args.archives, store, key, lifetime=lifetime(config))
    if args.json:
        ui.print_json(_publish_json(result))
        return
    ui.print_fields([("repository", result.location),
                     ("index", f"{text_path(result.index_sha256)} (generation "
                               f"{result.generation}"
                               f"{'' if result.changed else ', unchanged'})")])
    ui.print_table("bundles", ("archive", "path", "driver", "kernels", "state"),
                   [(p.archive, p.entry.path, p.entry.driver_version,
                     ", ".join(p.entry.kernel_releases),
                     "added" if p.added else "already there") for p in result.bundles])


def lifetime(config: BuildConfig) -> timedelta:
    return timedelta(days=config.index_lifetime)


def cmd_repository_refresh(args: argparse.Namespace) -> None:
    config = config_of(args)
    to, key_path = publish_target(config, args.to, args.key)
    key = load_private_key(key_path)
    store = open_store(to, s3_endpoint_url=config.s3_endpoint_url)
    with ui.step(f"refreshing {store.location}"):
        result = refresh(store, key, lifetime=lifetime(config))
    if args.json:
        ui.print_json(_publish_json(result))
        return
    ui.print_fields([("repository", result.location),
                     ("index", f"{text_path(result.index_sha256)} (generation "
                               f"{result.generation}, valid {config.index_lifetime} days)")])


def _publish_json(result: PublishResult) -> dict[str, Any]:
    return {"repository": result.location, "generation": result.generation,
            "index": text_path(result.index_sha256), "changed": result.changed,
            "bundles": [{"archive": str(p.archive), "path": p.entry.path,
                         "sha256": p.entry.sha256, "added": p.added} for p in result.bundles]}


def _summary(loaded: LoadedIndex, location: str, signature: str) -> list[tuple[str, Any]]:
    index = loaded.index
    return [("repository", location), ("index", text_path(loaded.text_sha256)),
            ("generation", index.generation), ("created", index.created),
            ("expires", index.expires or "never (nodes refuse it: run repository refresh)"),
            ("signed by", index.key), ("signature", signature)]


def cmd_repository_list(args: argparse.Namespace) -> None:
    key = load_public_key(args.key) if args.key else None
    reader = _reader(args)
    loaded = require_index(reader, key)
    signature = f"OK ({fingerprint(key)})" if key else "not checked (no --key)"
    if args.json:
        import json

        ui.print_json({k.replace(" ", "_"): v for k, v in _summary(
            loaded, reader.location, signature)} | {
            "bundles": json.loads(render_json(loaded.index))["bundles"]})
        return
    ui.print_fields(_summary(loaded, reader.location, signature))
    ui.print_table("bundles", ("driver", "flavour", "profile", "os", "releases", "kernel",
                               "size", "published", "path"),
                   [(e.driver_version, e.flavour, e.profile, e.os,
                     ",".join(e.releases_of(k)) or "-", k, e.size, e.published, e.path)
                    for e in loaded.index.entries for k in e.kernel_releases])


def cmd_repository_verify(args: argparse.Namespace) -> int:
    key = load_public_key(args.key)
    reader = _reader(args)
    with ui.step(f"verifying {reader.location}"):
        loaded = require_index(reader, key)
        checks = check_bundles(reader, loaded.index)
    signature = f"OK ({fingerprint(key)})"
    if args.json:
        ui.print_json({k.replace(" ", "_"): v for k, v in _summary(
            loaded, reader.location, signature)} | {
            "bundles": [{"path": c.entry.path, "sha256": c.entry.sha256, "ok": not c.problem,
                         "problem": c.problem} for c in checks]})
    else:
        ui.print_fields(_summary(loaded, reader.location, signature))
        ui.print_table("bundles", ("path", "size", "state"),
                       [(c.entry.path, c.entry.size, c.problem or "OK") for c in checks])
    _raise_first(checks)
    if problem := expiry_problem(loaded.index, now_utc()):
        raise CoreosGpuError(f"{reader.location}: {problem}", code=ExitCode.REPOSITORY)
    return int(ExitCode.OK)


def _raise_first(checks: tuple[BundleCheck, ...]) -> None:
    bad = [c for c in checks if c.problem]
    if bad:
        raise CoreosGpuError(f"{len(bad)} of {len(checks)} bundles fail: {bad[0].problem}",
                             code=bad[0].code)
