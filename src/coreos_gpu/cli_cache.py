"""The cache verbs of the `coreos-gpu` command: `cache list` and `cache prune`. cli.py declares
their arguments and runs them; like the other verbs, each calls the stage (inventory, prune)
and returns a Result that cli.py prints."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coreos_gpu.config import config_of
from coreos_gpu.inventory import CacheEntry, Inventory, Kind, human_size, scan_cache
from coreos_gpu.prune import Item, PruneResult, in_use, prune_cache
from coreos_gpu.results import Block, Fields, Result, Table

# How `cache list` groups what it shows, in this order.
SECTIONS = (
    ("releases", (Kind.RELEASE,)), ("drivers", (Kind.DRIVER,)),
    ("module sets", (Kind.MODULES,)), ("bundles", (Kind.BUNDLE,)),
    ("leftovers", (Kind.PARTIAL, Kind.WORK, Kind.TRASH, Kind.ORPHAN)),
)


def when(seconds: float) -> str:
    return (datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if seconds else "")


def entry_json(entry: CacheEntry, *, held: bool | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": entry.kind.value, "name": entry.name, "size": entry.size,
                            "last_used": when(entry.last_used)}
    if entry.kind is Kind.RELEASE:
        data |= {"os": entry.os or None, "channel": entry.channel or None,
                 "version": entry.version or None}
    elif entry.version:
        data["driver_version"] = entry.version
    if entry.kernels:
        data["kernel_releases"] = list(entry.kernels)
    if entry.kind is Kind.BUNDLE:
        data["releases"] = [{"os": os_name, "version": version}
                            for os_name, version in entry.releases]
    data |= {key.replace(" ", "_") + "_size": size for key, size in entry.parts}
    data |= dict(entry.details)
    data["paths"] = [str(p) for p in entry.paths]
    if held is not None:
        data["in_use"] = held
    return data


def _release_row(e: CacheEntry, held: bool) -> tuple[str, ...]:
    parts = dict(e.parts)
    return (e.os or "?", e.channel or "?", e.version or e.name, human_size(parts["image"]),
            human_size(parts["dev container"]), human_size(e.size), when(e.last_used),
            "yes" if held else "")


def cmd_cache_list(args: argparse.Namespace) -> CacheListResult:
    config = config_of(args)
    inventory = scan_cache(config.cache_dir)
    return CacheListResult(inventory, {e: in_use(e) for e in inventory.entries})


def cmd_cache_prune(args: argparse.Namespace) -> CachePruneResult:
    config = config_of(args)
    return CachePruneResult(prune_cache(config, dry_run=args.dry_run))


@dataclass(frozen=True)
class CacheListResult(Result):
    inventory: Inventory
    held: Mapping[CacheEntry, bool]  # in_use: what a build or another process holds

    def to_json(self) -> Any:
        inventory = self.inventory
        return {"cache_dir": str(inventory.cache_dir), "total": inventory.total,
                "other": inventory.other} | {
            title.replace(" ", "_"): [entry_json(e, held=self.held[e])
                                      for e in inventory.of(*kinds)]
            for title, kinds in SECTIONS}

    def to_text(self) -> Iterable[Block]:
        inventory, held = self.inventory, self.held
        yield Fields([("cache", inventory.cache_dir),
                         ("total", human_size(inventory.total))])
        for title, kinds in SECTIONS:
            entries = inventory.of(*kinds)
            if not entries:
                continue
            if kinds == (Kind.RELEASE,):
                yield Table(title, ("os", "channel", "version", "image", "dev container",
                                       "size", "last used", "in use"),
                               [_release_row(e, held[e]) for e in entries])
            else:
                yield Table(title, ("entry", "size", "last used", "in use"),
                               [(e.name, human_size(e.size), when(e.last_used),
                                 "yes" if held[e] else "") for e in entries])
        yield Fields([("other", f"{human_size(inventory.other)} (feeds, keys, index "
                                   "files, locks, logs)")])


def _item_json(item: Item) -> dict[str, Any]:
    return entry_json(item.entry) | {"reason": item.reason} | (
        {"skipped": item.skipped} if item.skipped else {})


@dataclass(frozen=True)
class CachePruneResult(Result):
    """What cache prune did; sync's JSON holds the JSON of its own prune."""

    result: PruneResult

    def to_json(self) -> Any:
        result = self.result
        return {"cache_dir": str(result.cache_dir), "dry_run": result.dry_run,
                "before": result.before, "freed": result.freed, "after": result.after,
                "removed": [_item_json(i) for i in result.removed],
                "skipped": [_item_json(i) for i in result.skipped],
                "kept_for_the_repository": [entry_json(e) for e in result.protected],
                "notes": list(result.notes)}

    def to_text(self) -> Iterable[Block]:
        result = self.result
        verb = "would remove" if result.dry_run else "removed"
        if result.removed:
            yield Table(f"{verb} from {result.cache_dir}", ("entry", "size", "why"),
                           [(i.entry.name, human_size(i.entry.size), i.reason)
                            for i in result.removed])
        if result.skipped:
            yield Table("skipped", ("entry", "size", "why it stays"),
                           [(i.entry.name, human_size(i.entry.size), i.skipped)
                            for i in result.skipped])
        if result.protected:
            yield Table("kept: the repository lists them", ("entry", "size"),
                           [(e.name, human_size(e.size)) for e in result.protected])
        yield Fields([(verb, f"{len(result.removed)} entries, {human_size(result.freed)}"),
                         ("cache", f"{human_size(result.before)} before, "
                                   f"{human_size(result.after)} after"),
                         *(("note", note) for note in result.notes)])
