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
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inspection import inspect_bundle
from coreos_gpu.keys import PrivateKey, PublicKey, fingerprint, sign, signature_matches
from coreos_gpu.repository import (
    EMPTY,
    POINTER,
    Entry,
    Index,
    MissingFile,
    entry_from_report,
    json_path,
    load_index_at,
    parse_text,
    render_json,
    render_pointer,
    render_text,
    text_path,
    with_entries,
)
from coreos_gpu.stores import Conflict, Store

ATTEMPTS = 10
# How long a signed index stays valid: the index_lifetime setting's default (config.py).
LIFETIME = timedelta(days=21)


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


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def now_utc() -> str:
    return _utc(datetime.now(UTC))


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


# How far apart the clocks may be that stamp an index's created time (the publisher's) and
# its file's modification time (the folder's or S3's).
CLOCK_SLACK_S = 3600
_TEXT_NAME = re.compile(r"index/([0-9a-f]{64})\.txt")  # text_path's names


def check_not_rolled_back(store: Store, key: PublicKey, current: Index, version: str,
                          text_sha256: str) -> None:
    """Refuse to go on from an index.current that names an older index than one this key
    signed: it was set back (a restore, a sync job with stale state), and the next index
    would drop the newer one's entries and reuse its generation, which nodes that saw it
    refuse. version, text_sha256: what _read_current gives with current.

    Only files modified since the current index was created or written (the earlier of the
    two, CLOCK_SLACK_S before) are read, not the hundreds of older indexes a repository
    gathers: a newer index was written after the current one, and setting index.current
    back leaves it, like every content-addressed file, with that time (or a later one where
    it was copied). An index this key did not sign counts for nothing: no file planted in
    index/ can stop publishing, nor can an index another publisher is about to swap in
    (store.in_flight_after)."""
    own = text_path(text_sha256) if text_sha256 else ""
    listed = store.list_indexes()
    since = [f.modified for f in listed if f.name == own]
    if current.created:  # "": no index.current
        since.append(datetime.fromisoformat(current.created).timestamp())
    floor = min(since) - CLOCK_SLACK_S if since else -math.inf
    others = [f for f in listed if f.modified >= floor and f.name != own]
    if not others:
        return  # what a publish finds, as a rule
    in_flight = store.in_flight_after(version)
    newest, newest_sha = current.generation, ""
    for found in sorted(others, key=lambda f: f.modified, reverse=True):
        match = _TEXT_NAME.fullmatch(found.name)
        if found.modified < floor:
            break
        if found.modified >= in_flight or match is None:
            continue
        generation = _signed_generation_above(store, key, found.name, newest)
        if generation is not None:
            newest, newest_sha = generation, match.group(1)
            # an index newer still was written after this one
            floor = max(floor, found.modified - CLOCK_SLACK_S)
    if newest_sha:
        named = f"names generation {current.generation}" if text_sha256 else "is missing"
        raise CoreosGpuError(
            f"{store.location}/{POINTER} {named}, but {text_path(newest_sha)} (signed by this "
            f"key) is generation {newest}: {POINTER} was set back, or a publish stopped "
            "before writing it",
            hint="to go on from the newest index (complete: it was written last), write the line "
            f"'{render_pointer(newest_sha).decode().strip()}' into {store.location}/{POINTER} "
            "and publish again", code=ExitCode.REPOSITORY)


def _signed_generation_above(store: Store, key: PublicKey, name: str,
                             generation: int) -> int | None:
    """The generation of the text index `name` where it is above `generation` and the file
    is one that index.current may name: the sha256 in its name, and signed by this key."""
    try:
        text = store.read(name)
    except MissingFile:
        return None
    try:
        found = parse_text(text, store.location).generation
    except CoreosGpuError:
        return None  # not an index
    if found <= generation or text_path(hashlib.sha256(text).hexdigest()) != name:
        return None
    try:
        signature = store.read(f"{name}.sig")
    except MissingFile:
        return None
    return found if signature_matches(key, text, signature) else None


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


def publish(archives: Sequence[Path], store: Store, key: PrivateKey, *,
            lifetime: timedelta = LIFETIME) -> PublishResult:
    published = now_utc()
    wanted = check_archives(archives, published)
    public = key.public_key()
    with store.locked():
        # refuse a repository we cannot extend, before writing
        check_not_rolled_back(store, public, *_read_current(store, public))
        for archive, entry in wanted:
            store.put_file(entry.path, archive, entry.sha256)

        def added(current: Index) -> list[Entry]:
            listed = {e.sha256 for e in current.entries}
            return [entry for _, entry in wanted if entry.sha256 not in listed]

        read, written, text_sha = _commit(
            store, key, lambda current: [*current.entries, *new] if (new := added(current))
            else None, lifetime)
    listed = {e.sha256: e for e in read.entries}
    return PublishResult(store.location, _results(wanted, listed, added(read)),
                         (written or read).generation, text_sha, changed=written is not None)


def refresh(store: Store, key: PrivateKey, *, lifetime: timedelta = LIFETIME,
            due: Callable[[Index], bool] = lambda _: True) -> PublishResult:
    """The current index again, its entries unchanged, as the next generation with a new
    expiry: what keeps nodes accepting a repository that had nothing new to publish. Where
    due says the current index is not due, nothing is written (changed=False)."""

    def entries_of(current: Index) -> Sequence[Entry] | None:
        if not due(current):
            return None
        if current is EMPTY:
            raise CoreosGpuError(f"{store.location} has no index to refresh",
                                 hint="publish a bundle there first (coreos-gpu publish)",
                                 code=ExitCode.REPOSITORY)
        return current.entries

    with store.locked():
        read, written, text_sha = _commit(store, key, entries_of, lifetime)
    return PublishResult(store.location, (), (written or read).generation, text_sha,
                         changed=written is not None)


def refresh_if_due(store: Store, key: PrivateKey, *, lifetime: timedelta = LIFETIME) -> bool:
    """Refresh the index when it was signed more than a day ago (or has no expiry): what
    sync does at every run. Hourly syncs would otherwise add an index every hour; once a day
    keeps every index well inside any lifetime of a day or more. A repository without an
    index has nothing to refresh."""
    day_ago = _utc(datetime.now(UTC) - timedelta(days=1))
    return refresh(store, key, lifetime=lifetime, due=lambda current: current is not EMPTY and (
        not current.expires or current.created <= day_ago)).changed


def _commit(store: Store, key: PrivateKey,
            entries_of: Callable[[Index], Sequence[Entry] | None],
            lifetime: timedelta) -> tuple[Index, Index | None, str]:
    """Under the store's lock: the next generation of the current index, with the entries
    entries_of gives for it (None: no change), written and swapped in; read again and
    redone when another publisher swapped index.current in between. Returns the index it
    built on, the one it wrote (None: none), and the text sha256 index.current names."""
    public = key.public_key()
    for attempt in range(ATTEMPTS):
        current, version, current_sha = _read_current(store, public)
        entries = entries_of(current)
        if entries is None:
            return current, None, current_sha
        check_not_rolled_back(store, public, current, version, current_sha)
        created = datetime.now(UTC).replace(microsecond=0)
        index = with_entries(current, entries, created=_utc(created),
                             expires=_utc(created + lifetime), key=fingerprint(public))
        text_sha = _write_index(store, index, key)
        try:
            store.swap_pointer(render_pointer(text_sha), version)
        except Conflict:
            _backoff(attempt)
            continue
        return current, index, text_sha
    raise CoreosGpuError(f"{store.location}: the index changed under every one of {ATTEMPTS} "
                         "attempts to update it", hint="other publishers are busy; run it "
                         "again", code=ExitCode.REPOSITORY)


def _results(wanted: Sequence[tuple[Path, Entry]], listed: dict[str, Entry],
             added: Sequence[Entry]) -> tuple[Published, ...]:
    new = {e.sha256 for e in added}
    return tuple(Published(archive, listed.get(entry.sha256, entry), entry.sha256 in new)
                 for archive, entry in wanted)
