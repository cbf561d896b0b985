"""The bundle repository's index: its model, its two forms, and how a reader trusts it.

A repository is static files (a folder, any HTTP(S) server, an S3 prefix):

    index.current               "coreos-gpu-repository 1 <T>": the one file that changes
    index/<T>.txt               the line-based index, T its sha256 (for nodes: sh + awk)
    index/<T>.txt.sig           DER signature of index/<T>.txt (openssl dgst -sha256)
    index/<J>.json              the JSON index, J its sha256, named in index/<T>.txt
    bundles/<sha256>/nvidia.tar.gz

Write order (publish.py): bundles, the JSON, the signature, the text index, and only then
index.current. Everything but index.current is content-addressed and never rewritten, so a
reader that reads index.current (one file, replaced atomically: a rename, or one S3 PUT)
finds the index it names and that index's signature already there, unchanging, whenever
it reads them. No reader ever sees an index without its signature, or a signature for other
bytes, even while publishers race, and caches may keep anything but index.current forever.

The text index's signature covers the JSON too: the text names the JSON's sha256, and a
reader checks that both list the same bundles.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inspection import BundleReport
from coreos_gpu.keys import PublicKey, fingerprint, load_public_key, public_pem, signature_matches

FORMAT = 1  # of the repository layout, the pointer and both index forms
POINTER = "index.current"
POINTER_MAGIC = "coreos-gpu-repository"
TEXT_MAGIC = "coreos-gpu-index"
# A bundle keeps the suffix of its compression: a node's tar is told which it is.
BUNDLE_NAMES = {"gzip": "nvidia.tar.gz", "xz": "nvidia.tar.xz", "zstd": "nvidia.tar.zst"}
# What a field of the text index may hold: no whitespace (fields are split on it), no comma
# (the releases field is a comma list), nothing a shell would need quoted.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:@-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
NONE = "-"  # an empty releases field


@dataclass(frozen=True)
class RepositoryTrust:
    """What a bundle built with --repository and --repository-key carries, so that its nodes
    fetch from that repository and trust no index but one signed by that key."""

    url: str
    public_key_pem: bytes  # normalised: what `openssl dgst -verify` reads
    fingerprint: str


def load_trust(url: str, key_path: str) -> RepositoryTrust | None:
    """The build's repository settings, checked: both or neither, and a usable public key."""
    if not url and not key_path:
        return None
    if not (url and key_path):
        given, missing = ("repository", "repository_key") if url else (
            "repository_key", "repository")
        raise CoreosGpuError(f"{given} is set but {missing} is not: a node must know both "
                             "where its repository is and which key signs it",
                             hint=f"set {missing} too (--{missing.replace('_', '-')})",
                             code=ExitCode.CONFIG)
    key = load_public_key(Path(key_path).expanduser())
    return RepositoryTrust(url.rstrip("/"), public_pem(key), fingerprint(key))


class MissingFile(CoreosGpuError):
    """A repository file that is not there (HTTP 404, no such key, no such file)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ExitCode.REPOSITORY)


class Reader(Protocol):
    """Read access to a repository, whatever holds it (stores.py)."""

    location: str  # for messages: the URL or folder

    def read(self, name: str) -> bytes: ...  # MissingFile when absent

    def digest(self, name: str) -> tuple[str, int]: ...  # sha256 and size, streamed


@dataclass(frozen=True)
class Release:
    channel: str
    version: str
    kernel_release: str


@dataclass(frozen=True)
class Entry:
    """One bundle in the index."""

    sha256: str
    path: str  # bundles/<sha256>/nvidia.tar.gz (or .tar.xz, .tar.zst)
    size: int
    published: str  # when it entered the repository, UTC, 2025-01-31T12:00:00Z
    os: str
    driver_version: str
    flavour: str
    profile: str
    kernel_releases: tuple[str, ...]
    releases: tuple[Release, ...]
    tool_version: str

    def releases_of(self, kernel: str) -> tuple[str, ...]:
        return tuple(r.version for r in self.releases if r.kernel_release == kernel)


@dataclass(frozen=True)
class Index:
    # one more at every change; a node refuses to go back (docs/reference/repository.md)
    generation: int
    created: str
    key: str  # fingerprint of the key that signs it (keys.fingerprint)
    entries: tuple[Entry, ...]  # sorted by (os, driver, flavour, profile, published, sha256)
    # After this time nodes refuse the index: a copy replayed by a mirror or cache is stale
    # within a bounded time. "" in an index older than the field (nodes refuse those too).
    expires: str = ""


@dataclass(frozen=True)
class LoadedIndex:
    index: Index
    text_sha256: str  # which index.current names


def bundle_path(sha256: str, compression: str) -> str:
    return f"bundles/{sha256}/{BUNDLE_NAMES[compression]}"


def text_path(sha256: str) -> str:
    return f"index/{sha256}.txt"


def json_path(sha256: str) -> str:
    return f"index/{sha256}.json"


def _bad(location: str, what: str) -> CoreosGpuError:
    return CoreosGpuError(f"{location} is not a coreos-gpu repository: {what}",
                          code=ExitCode.REPOSITORY)


def entry_from_report(report: BundleReport, published: str) -> Entry:
    """The index entry of an archive that passed inspect. Raises when a value cannot go into
    the text index as one field."""
    entry = Entry(
        sha256=report.sha256, path=bundle_path(report.sha256, report.compression.value),
        size=report.size, published=published, os=report.os,
        driver_version=report.driver_version, flavour=report.flavour, profile=report.profile,
        kernel_releases=report.kernel_releases,
        releases=tuple(Release(r.channel, r.version, r.kernel_release) for r in report.releases),
        tool_version=report.tool_version)
    problem = _entry_problem(entry)
    if problem:
        raise CoreosGpuError(f"{report.path}: {problem}", code=ExitCode.BUNDLE)
    return entry


def _entry_problem(entry: Entry) -> str:
    named = {"os": entry.os, "driver_version": entry.driver_version, "flavour": entry.flavour,
             "profile": entry.profile, "tool_version": entry.tool_version}
    named |= {f"kernel release {k!r}": k for k in entry.kernel_releases}
    named |= {f"release {r.version!r}": r.version for r in entry.releases}
    named |= {f"channel {r.channel!r}": r.channel for r in entry.releases}
    for what, value in named.items():
        if not _TOKEN.fullmatch(value):
            return f"{what} is {value!r}, which cannot be a field of the index"
    if not entry.kernel_releases:
        return "no kernel releases"
    if not _SHA256.fullmatch(entry.sha256) or entry.size < 0 or not _TIME.fullmatch(
            entry.published):
        return "a malformed sha256, size or time"
    if entry.path not in {f"bundles/{entry.sha256}/{n}" for n in BUNDLE_NAMES.values()}:
        return f"its path {entry.path!r} is not bundles/<sha256>/nvidia.tar.*"
    return ""


def sort_entries(entries: Sequence[Entry]) -> tuple[Entry, ...]:
    return tuple(sorted(entries, key=lambda e: (e.os, e.driver_version, e.flavour, e.profile,
                                                e.published, e.sha256)))


# --- the JSON form -------------------------------------------------------------------------


def render_json(index: Index) -> bytes:
    data = {
        "format": FORMAT, "generation": index.generation, "created": index.created,
        "expires": index.expires, "key": index.key,
        "bundles": [{
            "sha256": e.sha256, "path": e.path, "size": e.size, "published": e.published,
            "os": e.os, "driver_version": e.driver_version, "flavour": e.flavour,
            "profile": e.profile, "kernel_releases": list(e.kernel_releases),
            "releases": [{"channel": r.channel, "version": r.version,
                          "kernel_release": r.kernel_release} for r in e.releases],
            "tool_version": e.tool_version,
        } for e in index.entries],
    }
    return (json.dumps(data, indent=2) + "\n").encode()


def _entry_from_json(item: Any) -> Entry:
    releases = tuple(Release(str(r["channel"]), str(r["version"]), str(r["kernel_release"]))
                     for r in item["releases"])
    entry = Entry(
        sha256=str(item["sha256"]), path=str(item["path"]), size=int(item["size"]),
        published=str(item["published"]),
        os=str(item["os"]), driver_version=str(item["driver_version"]),
        flavour=str(item["flavour"]), profile=str(item["profile"]),
        kernel_releases=tuple(str(k) for k in item["kernel_releases"]), releases=releases,
        tool_version=str(item["tool_version"]))
    if problem := _entry_problem(entry):
        raise ValueError(f"bundle {entry.sha256}: {problem}")
    return entry


def parse_json(data: bytes, location: str) -> Index:
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise _bad(location, f"index.json has format {doc.get('format')!r}, this "
                       f"coreos-gpu reads {FORMAT}")
        return Index(int(doc["generation"]), str(doc["created"]), str(doc["key"]),
                     tuple(_entry_from_json(item) for item in doc["bundles"]),
                     str(doc.get("expires", "")))
    except CoreosGpuError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _bad(location, f"its JSON index is malformed ({e})") from e


# --- the line-based form, for nodes ---------------------------------------------------------


def render_bundle_lines(entries: Sequence[Entry]) -> str:
    """One line per (bundle, kernel release); fields are split by whitespace:
    bundle DRIVER FLAVOUR PROFILE OS RELEASES KERNEL PATH SHA256 SIZE PUBLISHED"""
    return "".join(
        f"bundle {e.driver_version} {e.flavour} {e.profile} {e.os} "
        f"{','.join(e.releases_of(k)) or NONE} {k} {e.path} {e.sha256} {e.size} "
        f"{e.published}\n"
        for e in entries for k in e.kernel_releases)


def render_text(index: Index, json_sha256: str) -> bytes:
    # A record a reader does not know is skipped (format 1 readers before `expires` read
    # this index too); a node reads generation, expires and key with awk.
    return (f"{TEXT_MAGIC} {FORMAT}\n"
            f"generation {index.generation}\n"
            f"created {index.created}\n"
            + (f"expires {index.expires}\n" if index.expires else "")
            + f"key {index.key}\n"
            f"json {json_path(json_sha256)} {json_sha256}\n"
            + render_bundle_lines(index.entries)).encode()


@dataclass(frozen=True)
class TextIndex:
    """What the text index says about itself and the JSON; its bundle lines as they are."""

    generation: int
    created: str
    key: str
    json_sha256: str
    bundle_lines: str
    expires: str


def parse_text(data: bytes, location: str) -> TextIndex:
    try:
        lines = data.decode("ascii").splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise _bad(location, "its index is not text") from e
    if not lines or lines[0].split() != [TEXT_MAGIC, str(FORMAT)]:
        raise _bad(location, f"its index does not start with '{TEXT_MAGIC} {FORMAT}'")
    header: dict[str, list[str]] = {}
    bundles = []
    for line in lines[1:]:
        fields = line.split()
        if fields[:1] == ["bundle"]:
            bundles.append(line)
        elif fields:
            header.setdefault(fields[0], fields[1:])  # other records: for later formats
    try:
        (generation,), (created,), (key,) = (header["generation"], header["created"],
                                             header["key"])
        _, json_sha256 = header["json"]
        (expires,) = header.get("expires", [""])
        return TextIndex(int(generation), created, key, json_sha256, "".join(bundles), expires)
    except (KeyError, ValueError) as e:
        raise _bad(location, "its index lacks a generation, created, key or json line") from e


# --- the pointer ---------------------------------------------------------------------------


def render_pointer(text_sha256: str) -> bytes:
    return f"{POINTER_MAGIC} {FORMAT} {text_sha256}\n".encode()


# One line, single spaces, the final newline optional: exactly what node/repository.sh's
# repo_pointer accepts (spec/pointer.json holds the cases both must agree on).
_POINTER = re.compile(rf"{POINTER_MAGIC} ([0-9]+) ([0-9a-f]{{64}})\n?")


def parse_pointer(data: bytes, location: str) -> str:
    match = _POINTER.fullmatch(data.decode("ascii", "replace"))
    if match is None:
        raise _bad(location, f"{POINTER} is not '{POINTER_MAGIC} {FORMAT} <sha256>'")
    if match.group(1) != str(FORMAT):
        raise _bad(location, f"its layout is format {match.group(1)}; this coreos-gpu reads "
                   f"format {FORMAT}")
    return match.group(2)


# --- reading and trusting ------------------------------------------------------------------


def _signature_error(reader: Reader, name: str, key: PublicKey, signer: str) -> CoreosGpuError:
    given = fingerprint(key)
    if signer and signer != given:
        return CoreosGpuError(
            f"{reader.location}/{name} is signed by another key ({signer}), not by {given}",
            hint="pass the repository's public key with --key", code=ExitCode.SIGNATURE)
    return CoreosGpuError(
        f"{reader.location}/{name} does not match its signature: the index was tampered with "
        "or damaged", code=ExitCode.SIGNATURE)


def load_index(reader: Reader, key: PublicKey | None) -> LoadedIndex | None:
    """The repository's current index, or None where there is none yet (an empty folder or
    prefix). With a key, its signature must verify; without one, nothing is trusted but the
    index's own consistency."""
    try:
        pointer = reader.read(POINTER)
    except MissingFile:
        return None
    return load_index_at(reader, key, pointer)


def load_index_at(reader: Reader, key: PublicKey | None, pointer: bytes) -> LoadedIndex:
    """The index that the pointer (index.current's bytes) names; see load_index."""
    text_sha = parse_pointer(pointer, reader.location)
    name = text_path(text_sha)
    text = reader.read(name)
    if key is not None and not signature_matches(key, text, reader.read(f"{name}.sig")):
        try:  # only to say whose key it claims, in the message: nothing else is trusted
            signer = parse_text(text, reader.location).key
        except CoreosGpuError:
            signer = ""
        raise _signature_error(reader, name, key, signer)
    parsed = parse_text(text, reader.location)
    if hashlib.sha256(text).hexdigest() != text_sha:
        raise CoreosGpuError(f"{reader.location}/{name} does not match the sha256 in its name",
                             code=ExitCode.DIGEST)
    json_name = json_path(parsed.json_sha256)
    data = reader.read(json_name)
    if hashlib.sha256(data).hexdigest() != parsed.json_sha256:
        raise CoreosGpuError(f"{reader.location}/{json_name} does not match the sha256 the "
                             "signed index gives for it: it was tampered with or damaged",
                             code=ExitCode.DIGEST)
    index = parse_json(data, reader.location)
    if (render_bundle_lines(index.entries) != parsed.bundle_lines
            or (index.generation, index.created, index.key, index.expires)
            != (parsed.generation, parsed.created, parsed.key, parsed.expires)):
        raise _bad(reader.location, f"{name} and {json_name} list different bundles")
    return LoadedIndex(index, text_sha)


def require_index(reader: Reader, key: PublicKey | None) -> LoadedIndex:
    loaded = load_index(reader, key)
    if loaded is None:
        raise CoreosGpuError(f"{reader.location} is not a coreos-gpu repository: it has no "
                             f"{POINTER}", code=ExitCode.REPOSITORY,
                             hint="a repository URL names the folder that holds index.current")
    return loaded


@dataclass(frozen=True)
class BundleCheck:
    entry: Entry
    problem: str  # empty when its size and sha256 are those the index gives
    code: ExitCode = ExitCode.OK


def check_bundles(reader: Reader, index: Index) -> tuple[BundleCheck, ...]:
    """Every bundle's size and sha256 against the index, all of them, problems listed."""
    checks = []
    for entry in index.entries:
        try:
            sha, size = reader.digest(entry.path)
        except MissingFile:
            checks.append(BundleCheck(entry, f"{entry.path}: missing", ExitCode.REPOSITORY))
            continue
        if (sha, size) != (entry.sha256, entry.size):
            checks.append(BundleCheck(
                entry, f"{entry.path}: sha256 {sha} ({size} bytes), the index says "
                f"{entry.sha256} ({entry.size} bytes): tampered with or damaged",
                ExitCode.DIGEST))
        else:
            checks.append(BundleCheck(entry, ""))
    return tuple(checks)


EMPTY = Index(generation=0, created="", key="", entries=())


def with_entries(index: Index, entries: Sequence[Entry], *, created: str, expires: str,
                 key: str) -> Index:
    """The next generation of an index."""
    return replace(index, generation=index.generation + 1, created=created, expires=expires,
                   key=key, entries=sort_entries(entries))


def expiry_problem(index: Index, now: str) -> str:
    """Why a node would refuse this index at `now` (UTC, as `created`), or "": what
    node/repository.sh's repo_fresh checks, for `repository verify` to say it first."""
    if not _TIME.fullmatch(index.expires):
        return ("it has no expiry (an index from before indexes expired): nodes refuse it; "
                "run coreos-gpu repository refresh")
    if now > index.expires:
        return (f"it expired at {index.expires}: nodes refuse it; run coreos-gpu repository "
                "refresh (sync does it)")
    return ""
