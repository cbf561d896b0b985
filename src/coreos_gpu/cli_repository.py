"""The repository verbs of the `coreos-gpu` command: keygen, publish, repository list/verify.

cli.py registers them (add_repository_verbs) beside the other verbs; like those, each one
parses, calls the stages (keys, publish, repository, stores) and renders through ui.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coreos_gpu import ui
from coreos_gpu.config import find_config_file, load_config
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.keys import fingerprint, load_private_key, load_public_key, write_key_pair
from coreos_gpu.publish import PublishResult, publish
from coreos_gpu.repository import (
    POINTER,
    BundleCheck,
    LoadedIndex,
    check_bundles,
    render_json,
    require_index,
    text_path,
)
from coreos_gpu.stores import open_reader, open_store

Verb = Callable[[Any, str, str, Callable[[argparse.Namespace], int | None]],
                argparse.ArgumentParser]


def _reader(args: argparse.Namespace) -> Any:
    config = load_config(vars(args), find_config_file(args.config, Path.cwd()))
    return open_reader(args.url, cache_dir=config.cache_dir,
                       s3_endpoint_url=args.s3_endpoint_url)


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
    key = load_private_key(args.key)  # a bad key fails before anything is read or written
    store = open_store(args.to, s3_endpoint_url=args.s3_endpoint_url)
    with ui.step(f"publishing {len(args.archives)} archive(s) to {store.location}"):
        result = publish(args.archives, store, key)
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


def _publish_json(result: PublishResult) -> dict[str, Any]:
    return {"repository": result.location, "generation": result.generation,
            "index": text_path(result.index_sha256), "changed": result.changed,
            "bundles": [{"archive": str(p.archive), "path": p.entry.path,
                         "sha256": p.entry.sha256, "added": p.added} for p in result.bundles]}


def _summary(loaded: LoadedIndex, location: str, signature: str) -> list[tuple[str, Any]]:
    index = loaded.index
    return [("repository", location), ("index", text_path(loaded.text_sha256)),
            ("generation", index.generation), ("created", index.created),
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
    return int(ExitCode.OK)


def _raise_first(checks: tuple[BundleCheck, ...]) -> None:
    bad = [c for c in checks if c.problem]
    if bad:
        raise CoreosGpuError(f"{len(bad)} of {len(checks)} bundles fail: {bad[0].problem}",
                             code=bad[0].code)


def _add_s3(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", default="", metavar="URL",
                        help="an S3-compatible server instead of AWS (region and credentials "
                        "come from the usual AWS settings)")


def add_repository_verbs(verbs: Any, verb: Verb) -> None:
    # Not through verb(): its setting flags include build's --output (the archive to write).
    helptext = "make a key pair that signs a repository's index"
    keygen: argparse.ArgumentParser = verbs.add_parser("keygen", help=helptext,
                                                       description=helptext)
    keygen.set_defaults(func=cmd_keygen)
    keygen.add_argument("--json", action="store_true", help="print JSON")
    keygen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
    keygen.add_argument("--output", type=Path, required=True, metavar="PATH",
                        help="the private key (mode 0600); the public one goes to PATH.pub")
    pub = verb(verbs, "publish", "upload bundles to a repository and sign its new index",
               cmd_publish)
    pub.add_argument("archives", type=Path, nargs="+", metavar="ARCHIVE",
                     help="nvidia.tar.gz files made by coreos-gpu build")
    pub.add_argument("--to", required=True, metavar="DEST",
                     help="a folder, file://PATH or s3://BUCKET[/PREFIX]")
    pub.add_argument("--key", type=Path, required=True, metavar="PATH",
                     help="the private key (coreos-gpu keygen)")
    _add_s3(pub)

    repository = verbs.add_parser("repository", help="bundle repositories").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    listing = verb(repository, "list", "list what a repository offers", cmd_repository_list)
    verify = verb(repository, "verify", "check a repository's signature and every bundle's "
                  "size and sha256", cmd_repository_verify)
    for sub, required in ((listing, False), (verify, True)):
        sub.add_argument("url", metavar="URL",
                         help=f"the folder holding {POINTER}: a path, file://, http(s):// "
                         "or s3://")
        sub.add_argument("--key", type=Path, required=required, metavar="PUB.pem",
                         help="the repository's public key" + (
                             "" if required else " (checks the signature)"))
        _add_s3(sub)
