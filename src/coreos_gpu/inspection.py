"""`coreos-gpu inspect`: what a bundle holds, and whether it is whole.

One streaming pass over the archive hashes every member and reads each .ko's modinfo; then
the members are checked against SHA256SUMS, MANIFEST.json and node/contents (by the node's
own rules, layout.contents_problems), every module against the kernel folder it sits in and
the driver version, and every symlink for where extracting the archive, and installing its
driver folder, would make it point (or write through it), and for whether anything is there.
Nothing is extracted but one .ko at a time, to a temporary folder, because pyelftools reads
ELF files by seeking.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from coreos_gpu.archive import COPY_BUFFER, open_archive
from coreos_gpu.config import Compression
from coreos_gpu.errors import CoreosGpuError
from coreos_gpu.keys import fingerprint_of_pem
from coreos_gpu.layout import (
    CONTENTS_NAME,
    FORMAT,
    MACHINE,
    MANIFEST_NAME,
    NODE,
    PAYLOAD,
    REPOSITORY_KEY_NAME,
    SUMS_NAME,
    ReleaseInputs,
    contents_problems,
    dangling_links,
    link_leaves,
    link_resolves_to,
    parse_contents,
    part_of,
    sums_problems,
)
from coreos_gpu.modinfo import ModuleIdentity, identity_problem, read_identity, vermagic_release
from coreos_gpu.node import read_bundle_env, settings_problem

_TEXT_LIMIT = 64 << 20  # MANIFEST.json and SHA256SUMS are read into memory: a bound
_PART_ORDER = ("libraries", "binaries", "firmware", "modules", "node files", "other",
               "metadata")
_METADATA = (MANIFEST_NAME, SUMS_NAME)
_BUNDLE_ENV = f"{NODE}/bundle.env"  # node.render_bundle_env's; what every node script reads
_KEPT = (*_METADATA, REPOSITORY_KEY_NAME, CONTENTS_NAME, _BUNDLE_ENV)  # read into memory


@dataclass(frozen=True)
class PartSize:
    part: str  # libraries, binaries, firmware, "modules <kernel-release>", node files, …
    files: int  # files and symlinks
    size: int  # bytes before compression


@dataclass(frozen=True)
class ModuleReport:
    path: str
    kernel_release: str  # of the folder the .ko sits in
    vermagic: str
    version: str
    depends: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class BundleReport:
    path: Path
    compression: Compression  # as the magic bytes say, whatever the file's name
    size: int
    sha256: str
    # Of its SHA256SUMS, which covers every other file: what install_nvidia.sh
    # --expect-sha256 takes, and whose first 12 digits are the bundle id on the node.
    contents_sha256: str  # empty when there is no SHA256SUMS
    tool_version: str
    os: str
    arch: str
    driver_version: str
    flavour: str
    profile: str
    releases: tuple[ReleaseInputs, ...]
    kernel_releases: tuple[str, ...]
    agent_units: tuple[str, ...]
    on_driver_failure: str
    repository_url: str  # empty when the bundle names no repository
    repository_key_fingerprint: str
    parts: tuple[PartSize, ...]
    modules: tuple[ModuleReport, ...]
    problems: tuple[str, ...]  # one line each; empty when the bundle is whole

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> list[tuple[str, str]]:
        """(label, value) rows for a text rendering."""
        return [("archive", f"{self.path} ({self.compression.value}, {self.size} bytes)"),
                ("sha256", self.sha256),
                ("contents sha256", f"{self.contents_sha256} (install_nvidia.sh --expect-sha256; "
                 f"bundle id {self.contents_sha256[:12]})" if self.contents_sha256 else "none"),
                ("driver", f"{self.driver_version} ({self.flavour})"),
                ("profile", self.profile), ("os", f"{self.os} ({self.arch})"),
                ("releases", ", ".join(f"{r.channel} {r.version} ({r.kernel_release})"
                                       for r in self.releases)),
                ("kernel releases", ", ".join(self.kernel_releases)),
                ("agent units", ", ".join(self.agent_units)),
                ("on driver failure", self.on_driver_failure),
                ("repository", f"{self.repository_url} (key {self.repository_key_fingerprint})"
                 if self.repository_url else "none"),
                ("built by", f"coreos-gpu {self.tool_version}")]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "ok": self.ok, "problems": list(self.problems),
            "compression": self.compression.value, "size": self.size, "sha256": self.sha256,
            "contents_sha256": self.contents_sha256 or None,
            "tool_version": self.tool_version, "os": self.os, "arch": self.arch,
            "driver_version": self.driver_version, "flavour": self.flavour,
            "profile": self.profile, "releases": [r.to_json() for r in self.releases],
            "kernel_releases": list(self.kernel_releases),
            "agent_units": list(self.agent_units),
            "on_driver_failure": self.on_driver_failure,
            "repository": {"url": self.repository_url,
                           "key_fingerprint": self.repository_key_fingerprint}
            if self.repository_url else None,
            "parts": [{"part": p.part, "files": p.files, "size": p.size} for p in self.parts],
            "modules": [{"path": m.path, "kernel_release": m.kernel_release,
                         "vermagic": m.vermagic, "version": m.version,
                         "depends": list(m.depends), "size": m.size} for m in self.modules],
        }


@dataclass(frozen=True)
class _Seen:
    kind: str  # "file" or "symlink", as MANIFEST.json writes it
    mode: int
    sha256: str = ""
    size: int = 0
    target: str = ""


@dataclass
class _Scan:
    """What one pass over the archive found (the one mutable workspace of an inspection)."""

    members: dict[str, _Seen] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # of every member, folders too
    texts: dict[str, bytes] = field(default_factory=dict)  # MANIFEST.json, SHA256SUMS
    modules: dict[str, ModuleIdentity] = field(default_factory=dict)  # by .ko path
    problems: list[str] = field(default_factory=list)


def _scan_file(tar: tarfile.TarFile, member: tarfile.TarInfo, scan: _Scan, tmp: Path) -> None:
    name = member.name
    stream = tar.extractfile(member)
    assert stream is not None  # a regular file always has one
    keep = name in _KEPT and member.size <= _TEXT_LIMIT
    chunks: list[bytes] = []
    # pyelftools reads by seeking, so each .ko goes to a temporary file, one at a time.
    module = tmp / PurePosixPath(name).name if name.endswith(".ko") else None
    digest, size = hashlib.sha256(), 0
    with stream, (module.open("wb") if module else nullcontext()) as copy:
        while chunk := stream.read(COPY_BUFFER):
            digest.update(chunk)
            size += len(chunk)
            if keep:
                chunks.append(chunk)
            if copy is not None:
                copy.write(chunk)
    scan.members[name] = _Seen("file", member.mode, digest.hexdigest(), size)
    if keep:
        scan.texts[name] = b"".join(chunks)
    if module:
        try:
            scan.modules[name] = read_identity(module)
        except CoreosGpuError as e:
            scan.problems.append(f"{name}: {e.message}")
        finally:
            module.unlink()


def _scan(path: Path) -> tuple[Compression, str, int, _Scan]:
    try:
        return _scan_archive(path)
    except OSError as e:  # the temporary copies; open_archive words the archive's own errors
        raise CoreosGpuError(f"cannot inspect {path}: {e}") from e


def _scan_archive(path: Path) -> tuple[Compression, str, int, _Scan]:
    scan = _Scan()
    with tempfile.TemporaryDirectory(prefix="coreos-gpu-inspect-") as tmp, \
            open_archive(path) as archive:
        for member in archive.tar:
            name = member.name
            scan.names.append(name)
            if name in scan.members:
                scan.problems.append(f"{name}: in the archive twice")
            if PurePosixPath(name).is_absolute() or ".." in name.split("/"):
                scan.problems.append(f"{name}: a path outside the folder it is extracted to")
            if member.isreg():
                _scan_file(archive.tar, member, scan, Path(tmp))
            elif member.issym():
                scan.members[name] = _Seen("symlink", member.mode, target=member.linkname)
                _check_link(name, member.linkname, scan)
            elif not member.isdir():
                scan.problems.append(f"{name}: neither a file, a folder nor a symlink")
        digest = archive.finish()
    _check_beneath_links(scan)
    _check_link_targets(scan)
    return archive.compression, digest.sha256, digest.size, scan


def _check_link(name: str, target: str, scan: _Scan) -> None:
    """A link must point inside the folder the archive is extracted to, as tar would make it."""
    if not target:
        scan.problems.append(f"{name}: a symlink without a target")
    elif target.startswith("/"):
        scan.problems.append(f"{name}: a symlink to the absolute path {target}, outside the "
                             "folder it is extracted to")
    elif link_resolves_to(name, target) is None:
        scan.problems.append(f"{name}: a symlink to {target}, which leaves the folder it is "
                             "extracted to")
    elif (left := _leaves(name, target)) is not None:
        # install_nvidia.sh's rule, which issue 28 picked over the folder the archive is
        # extracted to: the node installs payload/<version>/ alone, as a folder of another
        # name, so a hop above it names no file of the bundle there. (Above the top, both
        # rules are one: a target cannot climb back into a folder whose name it lacks.)
        scan.problems.append(f"{name}: a symlink to {target}, which steps out of {left}, the "
                             "folder the node installs")


def _leaves(name: str, target: str) -> str | None:
    """layout.link_leaves for an archive member, of whichever payload folder it sits in."""
    path = posixpath.normpath(name)
    parts = path.split("/")
    version = parts[1] if parts[0] == PAYLOAD and len(parts) > 2 else ""
    return link_leaves(path, target, version)


def _check_link_targets(scan: _Scan) -> None:
    """A link must point at a member of the archive (a file, a folder or another link), and
    a chain of links must end at one that is no link: else it dangles once extracted."""
    links = {name: seen.target for name, seen in scan.members.items()
             if seen.kind == "symlink" and seen.target}
    for name, target, why in dangling_links(scan.names, links):
        scan.problems.append(f"{name}: a symlink to {target}, " + (
            "which is not in the archive" if why == "missing"
            else "which leads back to it (a symlink loop)"))


def _check_beneath_links(scan: _Scan) -> None:
    """Nothing may sit beneath a symlink: extracting it would write wherever the link points,
    which is how a hostile archive writes outside its folder with harmless-looking names."""
    links = {posixpath.normpath(n) for n, seen in scan.members.items() if seen.kind == "symlink"}
    if not links:
        return
    for name in scan.names:
        parts = posixpath.normpath(name).split("/")
        above = next(("/".join(parts[:i]) for i in range(1, len(parts))
                      if "/".join(parts[:i]) in links), None)
        if above is not None:
            scan.problems.append(f"{name}: beneath the symlink {above}, so extracting it would "
                                 "write where the link points")


def _check_contents(scan: _Scan, listed: dict[str, Any], driver_version: str) -> None:
    """node/contents, the list install_nvidia.sh trusts, passes the node's own check
    (layout.contents_problems) and says what MANIFEST.json's list (listed) says of every
    member: kind, file mode, link target; of MANIFEST.json and SHA256SUMS, what the archive
    holds. A member missing from or extra in the archive is named by the MANIFEST.json check;
    without a usable MANIFEST.json, node/contents is held against the archive itself."""
    text = scan.texts.get(CONTENTS_NAME)
    if text is None:
        scan.problems.append(f"{CONTENTS_NAME} is missing")
        return
    entries, problems = parse_contents(text.decode("utf-8", "replace"))
    scan.problems.extend(problems)
    version = driver_version or next(
        (p.split("/")[1] for p in entries if p.startswith(f"{PAYLOAD}/") and p.count("/") > 1),
        "")
    scan.problems.extend(f"{CONTENTS_NAME}: {p}" for p in contents_problems(entries, version))
    described = {path: seen for path, entry in listed.items()
                 if (seen := _expected(entry)) is not None} if listed else dict(scan.members)
    described.update({n: scan.members[n] for n in _METADATA if n in scan.members})
    for path in sorted(set(entries) | set(described)):
        line, seen = entries.get(path), described.get(path)
        if line is None:
            scan.problems.append(f"{path}: not in {CONTENTS_NAME}")
        elif seen is None:
            scan.problems.append(f"{path}: in {CONTENTS_NAME}, not in the bundle")
        elif (line.kind, line.target) != (_KINDS.get(seen.kind, seen.kind), seen.target):
            scan.problems.append(
                f"{path}: {CONTENTS_NAME} says {_kind(line.kind, line.target)}, the bundle "
                f"has {_kind(_KINDS.get(seen.kind, seen.kind), seen.target)}")
        elif line.kind == "file" and _OCTAL.fullmatch(line.mode) and int(line.mode, 8) != seen.mode:
            scan.problems.append(f"{path}: {CONTENTS_NAME} says mode {line.mode}, the bundle "
                                 f"has {seen.mode:04o}")


_KINDS = {"symlink": "link"}  # MANIFEST.json's word → node/contents'
_OCTAL = re.compile(r"[0-7]+")  # any other mode is contents_problems' to name


def _kind(kind: str, target: str) -> str:
    return f"a link to {target}" if kind == "link" else f"a {kind}"


def _check_sums(scan: _Scan) -> None:
    """SHA256SUMS by the node's rules (layout.sums_problems), against the archive's files."""
    text = scan.texts.get(SUMS_NAME)
    if text is None:
        scan.problems.append(f"{SUMS_NAME} is missing")
        return
    files = {name: seen.sha256 for name, seen in scan.members.items() if seen.kind == "file"}
    scan.problems.extend(sums_problems(text.decode("utf-8", "replace"), files))


# MANIFEST.json's fields and their JSON types. Required: those of the first format-1 bundle
# that inspect reads; optional: those added since (arch, on_driver_failure, repository), and
# two that no reader uses. Unknown fields are skipped: a later coreos-gpu may add some (as in
# the repository's index). Nodes do not read it (sh reads no JSON): the build side alone does.
_STRINGS = ("tool_version", "os", "driver_version", "flavour", "profile")
_STRING_LISTS = ("kernel_releases", "agent_units")
_OPTIONAL: dict[str, tuple[type, ...]] = {"arch": (str,), "on_driver_failure": (str,),
                                          "repository": (dict, type(None)), "inputs": (list,),
                                          "modules": (dict,)}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODE = re.compile(r"[0-7]{3,4}")


class DuplicateName(ValueError):
    """A JSON object that gives a name twice; name: the first such."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"a name given twice in one object: {names}")
        self.name = next(n for n in names if names.count(n) > 1)


def json_object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook for what coreos-gpu writes (MANIFEST.json, the JSON index):
    JSON readers differ on a name given twice (Python's json keeps the last, others the first
    or fail), and our writers give each once, so it is refused."""
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise DuplicateName(names)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json reads NaN and Infinity; JSON has neither


def read_manifest(data: bytes | None) -> tuple[dict[str, Any], list[str]]:
    """MANIFEST.json's fields ({} when it is no JSON object), and its problems: not UTF-8
    JSON, a key twice, another format, a field missing or of another type, and a malformed
    file entry (file_entry_problem)."""
    try:
        manifest = json.loads(data.decode(), object_pairs_hook=json_object_once,
                              parse_constant=_no_constant) if data is not None else None
    except DuplicateName as e:
        return {}, [f"{MANIFEST_NAME} gives the key {e.name} twice"]
    except ValueError:  # UnicodeDecodeError is one
        manifest = None
    if not isinstance(manifest, dict):
        return {}, [f"{MANIFEST_NAME} is missing or not a JSON object"]
    problems = []
    if type(manifest.get("format")) is not int or manifest["format"] != FORMAT:
        problems.append(f"{MANIFEST_NAME} has format {manifest.get('format')!r}; this "
                        f"coreos-gpu reads format {FORMAT}")
    for key in _STRINGS:
        if not isinstance(manifest.get(key), str):
            problems.append(f"{MANIFEST_NAME}: {key} is missing or not a string")
    for key in _STRING_LISTS:
        value = manifest.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{MANIFEST_NAME}: {key} is missing or not a list of strings")
    if not isinstance(manifest.get("releases"), list):
        problems.append(f"{MANIFEST_NAME}: releases is missing or not a list")
    for key, types in _OPTIONAL.items():
        if key in manifest and not isinstance(manifest[key], types):
            problems.append(f"{MANIFEST_NAME}: {key} is not a {types[0].__name__}")
    files = manifest.get("files")
    if not isinstance(files, list):
        problems.append(f"{MANIFEST_NAME} lacks its list of files")
        return manifest, problems
    paths: set[str] = set()
    for entry in files:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str):
            problems.append(f"{MANIFEST_NAME}: a file entry without a path: {entry!r:.80}")
            continue
        if path in paths:
            problems.append(f"{path}: listed twice in {MANIFEST_NAME}")
        paths.add(path)
        if (problem := file_entry_problem(path, entry)) is not None:
            problems.append(problem)
    return manifest, problems


def file_entry_problem(path: str, entry: dict[str, Any]) -> str | None:
    """What is wrong with one of MANIFEST.json's file entries: a path that is not plain and
    relative, a type other than file or symlink, a mode that is not octal digits, a file
    without its lower-case sha256 and whole size, a symlink without its target or to one
    outside the bundle (by the node's rule, layout.link_leaves)."""
    if not path or path.startswith("/") or "//" in path or path.endswith("/") or \
            any(part in (".", "..") for part in path.split("/")):
        return f"{path}: not a plain relative path in {MANIFEST_NAME}"
    if _expected(entry) is None:
        return f"{path}: its {MANIFEST_NAME} entry is malformed"
    target = entry.get("target", "")
    if entry["type"] == "symlink" and (target.startswith("/") or _leaves(path, target)
                                       is not None):
        return f"{path}: {MANIFEST_NAME} links it to {target}, outside the bundle"
    return None


def _load_manifest(scan: _Scan) -> dict[str, Any]:
    manifest, problems = read_manifest(scan.texts.get(MANIFEST_NAME))
    scan.problems.extend(problems)
    return manifest


def _expected(entry: Any) -> _Seen | None:
    """A well-formed file entry of MANIFEST.json as the archive should have it: each field
    of its one JSON type."""
    if not isinstance(entry, dict):
        return None
    kind, mode = entry.get("type"), entry.get("mode")
    if not isinstance(mode, str) or not _MODE.fullmatch(mode):
        return None
    if kind == "file":
        sha256, size = entry.get("sha256"), entry.get("size")
        if isinstance(sha256, str) and _SHA256.fullmatch(sha256) and type(size) is int \
                and size >= 0 and "target" not in entry:
            return _Seen("file", int(mode, 8), sha256, size)
    elif kind == "symlink":
        target = entry.get("target")
        if isinstance(target, str) and target and "sha256" not in entry and "size" not in entry:
            return _Seen("symlink", int(mode, 8), target=target)
    return None


def _listed_files(manifest: dict[str, Any]) -> dict[str, Any]:
    """MANIFEST.json's files by path (read_manifest names what is wrong with them)."""
    files = manifest.get("files")
    listed: dict[str, Any] = {}
    for entry in files if isinstance(files, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            listed[entry["path"]] = entry
    return listed


def _check_manifest_files(manifest: dict[str, Any], scan: _Scan) -> dict[str, Any]:
    """MANIFEST.json's files against the archive; MANIFEST.json's files by path."""
    listed = _listed_files(manifest)
    if not manifest:
        return listed
    for name, entry in sorted(listed.items()):
        seen, expected = scan.members.get(name), _expected(entry)
        if seen is None:
            scan.problems.append(f"{name}: listed in {MANIFEST_NAME}, missing from the archive")
        elif expected is not None:  # read_manifest names a malformed one
            for what, want, got in (("type", expected.kind, seen.kind),
                                    ("mode", f"{expected.mode:04o}", f"{seen.mode:04o}"),
                                    ("sha256", expected.sha256, seen.sha256),
                                    ("size", expected.size, seen.size),
                                    ("target", expected.target, seen.target)):
                if want != got:
                    scan.problems.append(f"{name}: {what} is {got}, {MANIFEST_NAME} says {want}")
    for name in sorted(set(scan.members) - set(listed) - set(_METADATA)):
        scan.problems.append(f"{name}: in the archive, not in {MANIFEST_NAME}")
    return listed


def _check_bundle_env(scan: _Scan, manifest: dict[str, Any], arch: str) -> None:
    """node/bundle.env, read as the node reads it (node.read_bundle_env), passes the node's
    check_settings (node.settings_problem) and says what MANIFEST.json says of what both
    state: the node acts on bundle.env, inspect and `repository` show MANIFEST.json."""
    text = scan.texts.get(_BUNDLE_ENV)
    if text is None:
        scan.problems.append(f"{_BUNDLE_ENV} is missing")
        return
    values = read_bundle_env(text.decode("utf-8", "replace"))
    driver_version = _text(manifest, "driver_version") or values.get("DRIVER_VERSION", "")
    if (problem := settings_problem(values, driver_version)) is not None:
        scan.problems.append(problem)
    if not manifest:
        return
    stated = {"DRIVER_VERSION": "driver_version", "FLAVOUR": "flavour", "PROFILE": "profile",
              "OS": "os", "KERNEL_RELEASES": "kernel_releases", "AGENT_UNITS": "agent_units",
              "ON_DRIVER_FAILURE": "on_driver_failure"}
    wanted = {key: " ".join(_texts(manifest, field)) if field in _STRING_LISTS else
              _text(manifest, field) for key, field in stated.items() if field in manifest}
    wanted["ARCH"] = arch
    repository = manifest.get("repository")
    if isinstance(repository, dict) or "repository" in manifest:
        named = repository if isinstance(repository, dict) else {}
        wanted["REPOSITORY_URL"] = str(named.get("url", ""))
        wanted["REPOSITORY_KEY_FINGERPRINT"] = str(named.get("key_fingerprint", ""))
    for key, want in wanted.items():
        if values.get(key, "") != want:
            scan.problems.append(f"{_BUNDLE_ENV}: {key} is {values.get(key, '')!r}, "
                                 f"{MANIFEST_NAME} says {want!r}")


def _check_modules(scan: _Scan, driver_version: str,
                   kernels: tuple[str, ...]) -> tuple[ModuleReport, ...]:
    reports = []
    # By folder, then module name: nvidia before nvidia-modeset ("-" sorts before ".ko").
    for name, identity in sorted(scan.modules.items(), key=lambda item: (
            PurePosixPath(item[0]).parent, PurePosixPath(item[0]).stem)):
        info = identity.fields
        parts = name.split("/")
        folder = parts[3] if len(parts) == 5 and parts[0] == PAYLOAD and parts[2] == "modules" \
            else ""
        vermagic, version = info.get("vermagic", ""), info.get("version", "")
        if not folder:
            scan.problems.append(f"{name}: a kernel module outside "
                                 f"{PAYLOAD}/<driver-version>/modules/<kernel-release>/")
        elif vermagic_release(vermagic) != folder:
            scan.problems.append(f"{name}: built for kernel {vermagic_release(vermagic)!r} "
                                 f"(vermagic {vermagic!r}), but it sits in the folder of {folder}")
        elif folder not in kernels:
            scan.problems.append(f"{name}: kernel {folder} is not one of the bundle's kernels")
        core = scan.modules.get(str(PurePosixPath(name).with_name("nvidia.ko")))
        problem = identity_problem(PurePosixPath(name).name, identity,
                                   driver_version=driver_version, core=core)
        if driver_version and problem:
            scan.problems.append(f"{name}: {problem}")
        depends = tuple(d for d in info.get("depends", "").split(",") if d)
        reports.append(ModuleReport(name, folder, vermagic, version, depends,
                                    scan.members[name].size))
    for kernel in kernels:
        if not any(r.kernel_release == kernel for r in reports):
            scan.problems.append(f"no kernel modules for kernel {kernel}")
    payload = {n.split("/")[1] for n in scan.members if n.startswith(f"{PAYLOAD}/")}
    for folder in sorted(payload - {driver_version} if driver_version else ()):
        scan.problems.append(f"{PAYLOAD}/{folder}: not the folder of driver {driver_version}")
    return tuple(reports)


def _parts(scan: _Scan) -> tuple[PartSize, ...]:
    totals: dict[str, tuple[int, int]] = {}
    for name, seen in scan.members.items():
        files, size = totals.get(part_of(name), (0, 0))
        totals[part_of(name)] = (files + 1, size + seen.size)

    def order(part: str) -> tuple[int, str]:
        return _PART_ORDER.index("modules" if part.startswith("modules ") else part), part

    return tuple(PartSize(p, *totals[p]) for p in sorted(totals, key=order))


def _repository(manifest: dict[str, Any], scan: _Scan) -> tuple[str, str]:
    """The repository MANIFEST.json names, checked against the key the nodes will trust."""
    named = manifest.get("repository")
    has_key = REPOSITORY_KEY_NAME in scan.members
    if named is None:
        if has_key:
            scan.problems.append(f"{REPOSITORY_KEY_NAME} is there, but {MANIFEST_NAME} names "
                                 "no repository")
        return "", ""
    url = str(named.get("url", "")) if isinstance(named, dict) else ""
    want = str(named.get("key_fingerprint", "")) if isinstance(named, dict) else ""
    key = scan.texts.get(REPOSITORY_KEY_NAME)
    if not url or not want:
        scan.problems.append(f"{MANIFEST_NAME}'s repository lacks its url or key_fingerprint")
    elif key is None:
        scan.problems.append(f"{MANIFEST_NAME} names the repository {url}, but "
                             f"{REPOSITORY_KEY_NAME} is missing")
    elif (found := fingerprint_of_pem(key)) != want:
        scan.problems.append(f"{REPOSITORY_KEY_NAME} is key {found or 'no usable key'}, not "
                             f"{want} as {MANIFEST_NAME} says")
    return url, want


def _text(manifest: dict[str, Any], key: str) -> str:
    value = manifest.get(key, "")
    return value if isinstance(value, str) else str(value)


def _arch(manifest: dict[str, Any], scan: _Scan) -> str:
    """The machine the bundle is for; a bundle of this format before "arch" was x86_64."""
    arch = _text(manifest, "arch") or MACHINE
    if arch != MACHINE:
        scan.problems.append(f"{MANIFEST_NAME}: arch is {arch!r}; coreos-gpu builds {MACHINE}")
    return arch


def _texts(manifest: dict[str, Any], key: str) -> tuple[str, ...]:
    value = manifest.get(key)
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _releases(manifest: dict[str, Any], scan: _Scan) -> tuple[ReleaseInputs, ...]:
    releases = []
    for item in manifest.get("releases") or []:
        if isinstance(item, dict):
            releases.append(ReleaseInputs(*(str(item.get(k, "")) for k in (
                "os", "channel", "version", "kernel_release", "image_url", "image_sha256"))))
        else:
            scan.problems.append(f"{MANIFEST_NAME}: a release entry is not an object")
    return tuple(releases)


def inspect_bundle(path: Path) -> BundleReport:
    """Read a bundle (gzip, xz or zstd) and check it; problems are listed, not raised.

    Raises CoreosGpuError (ExitCode.BUNDLE) only when the file cannot be read as a compressed
    tar at all: missing, another format, damaged or truncated.
    """
    compression, sha256, size, scan = _scan(path)
    _check_sums(scan)
    manifest = _load_manifest(scan)
    listed = _check_manifest_files(manifest, scan)
    driver_version = _text(manifest, "driver_version")
    _check_contents(scan, listed, driver_version)
    kernels = _texts(manifest, "kernel_releases")
    releases = _releases(manifest, scan)
    modules = _check_modules(scan, driver_version, kernels)
    url, key_fingerprint = _repository(manifest, scan)
    arch = _arch(manifest, scan)
    _check_bundle_env(scan, manifest, arch)
    for release in releases:
        if release.kernel_release not in kernels:
            scan.problems.append(f"release {release.version} runs kernel "
                                 f"{release.kernel_release}, which the bundle lacks")
    return BundleReport(
        path=path, compression=compression, size=size, sha256=sha256,
        contents_sha256=sums.sha256 if (sums := scan.members.get(SUMS_NAME)) else "",
        tool_version=_text(manifest, "tool_version"), os=_text(manifest, "os"),
        arch=arch,
        driver_version=driver_version, flavour=_text(manifest, "flavour"),
        profile=_text(manifest, "profile"), releases=releases, kernel_releases=kernels,
        agent_units=_texts(manifest, "agent_units"),
        on_driver_failure=_text(manifest, "on_driver_failure"), repository_url=url,
        repository_key_fingerprint=key_fingerprint, parts=_parts(scan), modules=modules,
        problems=tuple(scan.problems))
