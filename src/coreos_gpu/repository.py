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
from coreos_gpu.inspection import BundleReport, json_object_once
from coreos_gpu.keys import PublicKey, fingerprint, load_public_key, public_pem, signature_matches

FORMAT = 1  # of the repository layout, the pointer and both index forms
POINTER = "index.current"
POINTER_MAGIC = "coreos-gpu-repository"
TEXT_MAGIC = "coreos-gpu-index"
# A bundle keeps the suffix of its compression: a node's tar is told which it is.
BUNDLE_NAMES = {"gzip": "nvidia.tar.gz", "xz": "nvidia.tar.xz", "zstd": "nvidia.tar.zst"}
# What a field of the text index may hold: no whitespace (fields are split on it), no comma
# (the releases field is a comma list), nothing a shell would need quoted. Each pattern is
# node/repository.sh's REPO_AWK's too (spec/index-text.json holds the cases both agree on).
_T = r"[A-Za-z0-9][A-Za-z0-9._+~:@-]*"
# A generation or size: what a node's shell and awk compare exactly (no leading zero, which
# $((...)) reads as octal; at most 15 digits, which awk's doubles hold exactly).
_N = r"(?:0|[1-9][0-9]{0,14})"
_TIME_RE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"
_TOKEN = re.compile(_T, re.ASCII)
_NUMBER = re.compile(_N, re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(_TIME_RE, re.ASCII)
_KEY = re.compile(r"sha256:[0-9a-f]{64}")  # keys.fingerprint
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
    if stray := [r.version for r in entry.releases
                 if r.kernel_release not in entry.kernel_releases]:
        return f"release {stray[0]} runs a kernel the bundle has no modules for"
    if not (_SHA256.fullmatch(entry.sha256) and _NUMBER.fullmatch(str(entry.size))
            and _TIME.fullmatch(entry.published)):
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


def _typed(item: Any, name: str, kind: type) -> Any:
    """item[name], which must be of JSON's type `kind`: "7" is no generation, true no size."""
    value = item[name]
    if type(value) is not kind:
        raise ValueError(f"{name} is {value!r}, not {kind.__name__}")
    return value


def _texts(item: Any, name: str) -> tuple[str, ...]:
    return tuple(_typed({name: v}, name, str) for v in _typed(item, name, list))


def _entry_from_json(item: Any) -> Entry:
    releases = tuple(Release(_typed(r, "channel", str), _typed(r, "version", str),
                             _typed(r, "kernel_release", str))
                     for r in _typed(item, "releases", list))
    entry = Entry(
        sha256=_typed(item, "sha256", str), path=_typed(item, "path", str),
        size=_typed(item, "size", int), published=_typed(item, "published", str),
        os=_typed(item, "os", str), driver_version=_typed(item, "driver_version", str),
        flavour=_typed(item, "flavour", str), profile=_typed(item, "profile", str),
        kernel_releases=_texts(item, "kernel_releases"), releases=releases,
        tool_version=_typed(item, "tool_version", str))
    if problem := _entry_problem(entry):
        raise ValueError(f"bundle {entry.sha256}: {problem}")
    return entry


def _header_problem(generation: int, created: str, key: str, expires: str) -> str:
    """What both forms hold about the index itself, checked alike; expires "" is an index
    from before indexes expired (it reads, and expiry_problem calls it expired)."""
    if not _NUMBER.fullmatch(str(generation)):
        return f"generation {generation} is not a number of at most 15 digits"
    if not _TIME.fullmatch(created) or not (expires == "" or _TIME.fullmatch(expires)):
        return f"created {created!r} or expires {expires!r} is not a UTC time"
    if not _KEY.fullmatch(key):
        return f"key {key!r} is not sha256:<64 lower-case hex digits>"
    return ""


def parse_json(data: bytes, location: str) -> Index:
    """The JSON index (spec/index-json.json holds its cases). Names this reader does not know
    are skipped, as a later coreos-gpu may add some."""
    try:
        doc = json.loads(data, object_pairs_hook=json_object_once)
        if type(doc) is not dict or type(doc.get("format")) is not int or (
                doc["format"] != FORMAT):
            given = doc.get("format") if type(doc) is dict else doc
            raise _bad(location, f"index.json has format {given!r}, this coreos-gpu reads "
                       f"{FORMAT}")
        index = Index(_typed(doc, "generation", int), _typed(doc, "created", str),
                      _typed(doc, "key", str),
                      tuple(_entry_from_json(item) for item in _typed(doc, "bundles", list)),
                      _typed(doc, "expires", str) if "expires" in doc else "")
        if problem := _header_problem(index.generation, index.created, index.key,
                                      index.expires):
            raise ValueError(problem)
        return index
    except CoreosGpuError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _bad(location, f"its JSON index is malformed ({e})") from e


# --- the line-based form, for nodes ---------------------------------------------------------
# docs/reference/repository.md "The line-based index"; node/repository.sh's repo_check reads it
# by the same rules, and spec/index-text.json holds the cases both readers are tested on.

TEXT_FIRST_LINE = f"{TEXT_MAGIC} {FORMAT}"


@dataclass(frozen=True)
class BundleLine:
    """One bundle line of the text index, a bundle for one kernel release: the one place its
    11 fields are laid out (render and parse), single spaces between them:
    bundle DRIVER FLAVOUR PROFILE OS RELEASES KERNEL PATH SHA256 SIZE PUBLISHED"""

    driver_version: str
    flavour: str
    profile: str
    os: str
    releases: tuple[str, ...]  # the OS releases that run this kernel; written "-" if none
    kernel_release: str
    path: str
    sha256: str
    size: int
    published: str

    def render(self) -> str:
        return (f"bundle {self.driver_version} {self.flavour} {self.profile} {self.os} "
                f"{','.join(self.releases) or NONE} {self.kernel_release} {self.path} "
                f"{self.sha256} {self.size} {self.published}\n")


# Exactly 11 fields: a later format adds records, not fields (a format 1 node reads by
# position). The path is the sha256's own: bundles/<the line's sha256>/nvidia.tar.*.
_BUNDLE_LINE = re.compile(
    rf"bundle ({_T}) ({_T}) ({_T}) ({_T}) ({NONE}|{_T}(?:,{_T})*) ({_T}) "
    rf"(bundles/([0-9a-f]{{64}})/nvidia\.tar\.(?:gz|xz|zst)) (\8) ({_N}) ({_TIME_RE})",
    re.ASCII)
# The header records a reader knows, each at most once (readers differ on which of two
# counts), each exactly this; other records are skipped: a later format may add some.
_RECORDS = {
    "generation": re.compile(rf"generation ({_N})", re.ASCII),
    "created": re.compile(rf"created ({_TIME_RE})", re.ASCII),
    "expires": re.compile(rf"expires ({_TIME_RE})", re.ASCII),
    "key": re.compile(r"key (sha256:[0-9a-f]{64})"),
    "json": re.compile(r"json index/([0-9a-f]{64})\.json (\1)"),
}
_REQUIRED = ("generation", "created", "key", "json")  # expires: see expiry_problem


def bundle_lines_of(entries: Sequence[Entry]) -> tuple[BundleLine, ...]:
    """One line per (bundle, kernel release)."""
    return tuple(BundleLine(e.driver_version, e.flavour, e.profile, e.os, e.releases_of(k), k,
                            e.path, e.sha256, e.size, e.published)
                 for e in entries for k in e.kernel_releases)


def render_text(index: Index, json_sha256: str) -> bytes:
    # A record a reader does not know is skipped (format 1 readers before `expires` read
    # this index too).
    return (f"{TEXT_FIRST_LINE}\n"
            f"generation {index.generation}\n"
            f"created {index.created}\n"
            + (f"expires {index.expires}\n" if index.expires else "")
            + f"key {index.key}\n"
            f"json {json_path(json_sha256)} {json_sha256}\n"
            + "".join(line.render() for line in bundle_lines_of(index.entries))).encode()


@dataclass(frozen=True)
class TextIndex:
    """What the text index says about itself and the JSON, and its bundle lines."""

    generation: int
    created: str
    key: str
    json_sha256: str
    bundles: tuple[BundleLine, ...]
    expires: str  # "" where it has no expires record


def _parse_bundle_line(line: str) -> BundleLine | None:
    match = _BUNDLE_LINE.fullmatch(line)
    if match is None:
        return None
    driver, flavour, profile, os, releases, kernel, path, _, sha, size, published = (
        match.groups())
    return BundleLine(driver, flavour, profile, os,
                      () if releases == NONE else tuple(releases.split(",")), kernel, path,
                      sha, int(size), published)


def parse_text(data: bytes, location: str) -> TextIndex:
    """Lines end in LF (the last one's is optional); a line's record is what comes before its
    first space or tab. Refused: a first line other than 'coreos-gpu-index 1', a known
    record (or bundle line) not exactly as written, one given twice, one of generation,
    created, key and json missing; a NUL byte anywhere (busybox awk ends a line there)."""
    text = data.decode("latin-1")  # bytes as they are: any byte is a character
    if "\0" in text:
        raise _bad(location, "its index holds a NUL byte")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != TEXT_FIRST_LINE:
        raise _bad(location, f"its index does not start with the line '{TEXT_FIRST_LINE}'")
    header: dict[str, str] = {}
    bundles = []
    for number, line in enumerate(lines[1:], 2):
        name = re.split(r"[ \t]", line, maxsplit=1)[0]
        if name == "bundle":
            bundle = _parse_bundle_line(line)
            if bundle is None:
                raise _bad(location, f"line {number} of its index: a malformed bundle line "
                           "(docs/reference/repository.md)")
            bundles.append(bundle)
        elif name in _RECORDS:
            match = _RECORDS[name].fullmatch(line)
            if match is None or name in header:
                raise _bad(location, f"line {number} of its index: a malformed or second "
                           f"{name} record")
            header[name] = match.group(1)
    if missing := [name for name in _REQUIRED if name not in header]:
        raise _bad(location, f"its index has no {' or '.join(missing)} record")
    return TextIndex(int(header["generation"]), header["created"], header["key"],
                     header["json"], tuple(bundles), header.get("expires", ""))


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
    if (bundle_lines_of(index.entries) != parsed.bundles
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
