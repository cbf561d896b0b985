"""`coreos-gpu publish`: bundles into a repository, and a new signed index that lists them.

Every archive passes `inspect` before anything is written. Then, under the store's lock
(a folder's flock; none on S3): the current index is read and its signature checked with
the publisher's own key (a publisher never re-signs entries it cannot trust), the bundles
are uploaded under their content-addressed paths, and the new index is written in the order
repository.py explains, ending with a conditional swap of index.current. When another
publisher swapped it in between (S3: 412 on If-Match), the index is read again, merged again
and written again: no entry is ever lost. A bundle already listed changes nothing.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inspection import inspect_bundle
from coreos_gpu.keys import PrivateKey, PublicKey, fingerprint, sign
from coreos_gpu.repository import (
    EMPTY,
    Entry,
    Index,
    entry_from_report,
    json_path,
    load_index_at,
    render_json,
    render_pointer,
    render_text,
    text_path,
    with_entries,
)
from coreos_gpu.stores import Conflict, Store

ATTEMPTS = 10


@dataclass(frozen=True)
class Published:
    archive: Path
    entry: Entry  # as the index lists it (an earlier publish's time, if it was there)
    added: bool  # False: the repository had it already


@dataclass(frozen=True)
class PublishResult:
    location: str
    bundles: tuple[Published, ...]
    generation: int
    index_sha256: str  # of index/<sha256>.txt, which index.current names
    changed: bool


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_archives(archives: Sequence[Path], published: str) -> list[tuple[Path, Entry]]:
    """Each archive's index entry; the first one that fails inspect stops everything."""
    checked: dict[str, tuple[Path, Entry]] = {}
    for archive in archives:
        report = inspect_bundle(archive)  # raises for what is no archive at all
        if not report.ok:
            more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
            raise CoreosGpuError(f"{archive} fails inspect: {report.problems[0]}{more}",
                                 hint=f"see coreos-gpu inspect {archive}",
                                 code=ExitCode.BUNDLE)
        checked.setdefault(report.sha256, (archive, entry_from_report(report, published)))
    return list(checked.values())


def _read_current(store: Store, key: PublicKey) -> tuple[Index, str, str]:
    """The current index (EMPTY for a new repository), the pointer's version, and the
    sha256 of the text index it names."""
    pointer, version = store.read_pointer()
    if pointer is None:
        return EMPTY, version, ""
    loaded = load_index_at(store, key, pointer)
    return loaded.index, version, loaded.text_sha256


def _write_index(store: Store, index: Index, key: PrivateKey) -> str:
    """Every file of the index but the pointer, the signature before the index it signs."""
    json_data = render_json(index)
    json_sha = hashlib.sha256(json_data).hexdigest()
    text = render_text(index, json_sha)
    text_sha = hashlib.sha256(text).hexdigest()
    store.put_bytes(json_path(json_sha), json_data)
    store.put_bytes(f"{text_path(text_sha)}.sig", sign(key, text))
    store.put_bytes(text_path(text_sha), text)
    return text_sha


def _backoff(attempt: int) -> None:
    # Random, so two publishers that collided do not collide again in step.
    time.sleep(random.uniform(0.05, 0.2) * min(2 ** attempt, 16))


def publish(archives: Sequence[Path], store: Store, key: PrivateKey) -> PublishResult:
    published = now_utc()
    wanted = check_archives(archives, published)
    public = key.public_key()
    with store.locked():
        _read_current(store, public)  # refuse a repository we cannot extend, before writing
        for archive, entry in wanted:
            store.put_file(entry.path, archive, entry.sha256)
        for attempt in range(ATTEMPTS):
            current, version, current_sha = _read_current(store, public)
            listed = {e.sha256: e for e in current.entries}
            missing = [entry for _, entry in wanted if entry.sha256 not in listed]
            if not missing:
                return PublishResult(store.location, _results(wanted, listed, ()),
                                     current.generation, current_sha, changed=False)
            index = with_entries(current, [*current.entries, *missing], created=published,
                                 key=fingerprint(public))
            text_sha = _write_index(store, index, key)
            try:
                store.swap_pointer(render_pointer(text_sha), version)
            except Conflict:
                _backoff(attempt)
                continue
            return PublishResult(store.location, _results(wanted, listed, missing),
                                 index.generation, text_sha, changed=True)
    raise CoreosGpuError(f"{store.location}: the index changed under every one of {ATTEMPTS} "
                         "attempts to update it", hint="other publishers are busy; run it "
                         "again", code=ExitCode.REPOSITORY)


def _results(wanted: Sequence[tuple[Path, Entry]], listed: dict[str, Entry],
             added: Sequence[Entry]) -> tuple[Published, ...]:
    new = {e.sha256 for e in added}
    return tuple(Published(archive, listed.get(entry.sha256, entry), entry.sha256 in new)
                 for archive, entry in wanted)
