"""Bundle stage: kernel modules (one set per kernel) + userspace + node files → one archive.

Where each file goes is layout.py's business; how the archive stays reproducible (the same
inputs give the same bytes) is archive.py's; reading a bundle back is inspection.py's. This
module is the stage's entry point and re-exports what its callers need.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Any

from coreos_gpu.archive import ArchiveWriter, Digest, archive_mtime, create_archive
from coreos_gpu.cache import copy_atomically, hash_inputs, write_atomically
from coreos_gpu.config import Compression, Persistence, Profile
from coreos_gpu.driver import DriverPackage
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inspection import BundleReport, ModuleReport, PartSize, inspect_bundle
from coreos_gpu.layout import (
    CONTENTS_NAME,
    FORMAT,
    MACHINE,
    MANIFEST_NAME,
    SUMS_NAME,
    ReleaseInputs,
    dangling_links,
    link_resolves_to,
    link_target,
    module_path,
    payload_dir,
    payload_path,
    render_contents,
    render_sums,
)
from coreos_gpu.modinfo import vermagic_release
from coreos_gpu.modules import ModuleSet
from coreos_gpu.node import NodeSettings, default_node_files, render_node_files

__all__ = [
    "Bundle",
    "BundleReport",
    "ModuleReport",
    "NodeSettings",
    "PartSize",
    "ReleaseInputs",
    "assemble_bundle",
    "check_persistence",
    "default_node_files",
    "inspect_bundle",
]

_UNSAFE = re.compile(r"[\n\\]")  # characters sha256sum -c would need escaped
_PERSISTENCED = "bin/nvidia-persistenced"  # what nvidia-persistenced.service runs


@dataclass(frozen=True)
class Bundle:
    path: Path
    sha256: str  # of the compressed archive
    size: int
    manifest: Mapping[str, Any]  # MANIFEST.json as written


@dataclass(frozen=True)
class _Member:
    """One archive member to write: exactly one of source, data, target is set."""

    path: str
    mode: int
    source: Path | None = None
    data: bytes | None = None
    target: str | None = None
    sha256: str = ""  # what a source must hash to (modules, checked by the modules stage)


def _userspace_members(package: DriverPackage, profile: Profile) -> list[_Member]:
    members = []
    for entry in package.files(profile):
        path = f"{payload_dir(package.version)}/{payload_path(entry, package.version)}"
        if entry.is_symlink:
            # The manifest names every link's target (NVIDIA's packages hold no links);
            # layout says what it points at from where the link goes.
            members.append(_Member(path, 0o777, target=link_target(entry, package.version)))
        else:
            members.append(_Member(path, entry.mode & 0o7777, source=package.root / entry.file))
    return members


def _module_members(version: str, module_sets: Sequence[ModuleSet]) -> list[_Member]:
    return [_Member(module_path(version, s.kernel_release, m.name), 0o644, source=m.path,
                    sha256=m.sha256)
            for s in module_sets for m in s.modules]


def _node_members(node: NodeSettings, scripts: Traversable | None, package: DriverPackage,
                  module_sets: Sequence[ModuleSet], profile: Profile, os: str,
                  tool_version: str) -> list[_Member]:
    return [_Member(f.path, f.mode, data=f.data) for f in render_node_files(
        node, driver_version=package.version, flavour=module_sets[0].flavour.value,
        profile=profile.value, os=os, module_sets=module_sets, tool_version=tool_version,
        scripts=scripts)]


def _contents_member(members: Sequence[_Member]) -> _Member:
    """node/contents: every member but the folders, itself and the two written last."""
    described = {m.path: (m.mode, m.target) for m in members}
    described.update({CONTENTS_NAME: (0o644, None), MANIFEST_NAME: (0o644, None),
                      SUMS_NAME: (0o644, None)})
    try:
        return _Member(CONTENTS_NAME, 0o644, data=render_contents(described))
    except ValueError as e:
        raise _bad(f"cannot bundle {e}") from e


def _bad(message: str, hint: str = "") -> CoreosGpuError:
    return CoreosGpuError(message, hint=hint, code=ExitCode.BUNDLE)


def check_persistence(package: DriverPackage, profile: Profile,
                      persistence: Persistence) -> None:
    """Refuse persistence = daemon for a profile without the daemon's binary: build calls it
    right after the driver is read, before any image is fetched; assemble_bundle again."""
    if persistence is not Persistence.DAEMON or any(
            payload_path(e, package.version) == _PERSISTENCED for e in package.files(profile)):
        return
    raise CoreosGpuError(
        f"persistence = daemon runs {_PERSISTENCED}, which the {profile.value} profile of "
        f"driver {package.version} does not ship",
        hint='set persistence = "legacy" (nvidia-smi -pm 1 at boot) or "off" '
        "(--persistence), or use a driver .run that has nvidia-persistenced",
        code=ExitCode.CONFIG)


def _check_inputs(package: DriverPackage, module_sets: Sequence[ModuleSet],
                  releases: Sequence[ReleaseInputs]) -> None:
    kernels = [s.kernel_release for s in module_sets]
    if not kernels or not releases:
        raise _bad("nothing to bundle: no kernel modules or no OS release")
    if len(set(kernels)) < len(kernels):
        raise _bad(f"two module sets for one kernel: {', '.join(sorted(kernels))}")
    if len({s.flavour for s in module_sets}) > 1:
        raise _bad("the module sets mix proprietary and open kernel modules")
    if len({r.os for r in releases}) > 1:
        raise _bad("the releases mix operating systems: one bundle serves one OS")
    for s in module_sets:
        if not s.modules:
            raise _bad(f"no kernel modules were built for kernel {s.kernel_release}")
        core = next((m.version for m in s.modules if m.name == "nvidia"), "")
        for m in s.modules:
            # A module that declares no version (470's nvidia-uvm) was accepted by the modules
            # stage for its link to the set's nvidia.ko, which must then be this driver's.
            version = m.version or core
            if vermagic_release(m.vermagic) != s.kernel_release or version != package.version:
                raise _bad(f"{m.path} is built for kernel {vermagic_release(m.vermagic)} and "
                           f"driver {m.version}, not {s.kernel_release} and {package.version}",
                           hint="rebuild the modules")
    for release in releases:
        if release.kernel_release not in kernels:
            raise _bad(f"{release.os} {release.version} runs kernel {release.kernel_release}, "
                       "for which no modules were built")
    unused = set(kernels) - {r.kernel_release for r in releases}
    if unused:
        raise _bad(f"modules for kernel {', '.join(sorted(unused))} belong to no release")


def _sorted_with_folders(members: list[_Member]) -> list[_Member]:
    """Members and every folder above them, parents first, in one fixed order."""
    by_path: dict[str, _Member] = {}
    for m in members:
        if PurePosixPath(m.path).is_absolute() or ".." in m.path.split("/") or _UNSAFE.search(
                m.path):
            raise _bad(f"refusing the archive path {m.path!r}")
        if m.path in by_path:
            raise _bad(f"two files would be bundled as {m.path}")
        by_path[m.path] = m
        for parent in PurePosixPath(m.path).parents[:-1]:
            by_path.setdefault(str(parent), _Member(str(parent), 0o755))
    return sorted(by_path.values(), key=lambda m: PurePosixPath(m.path).parts)


def check_links(members: Sequence[tuple[str, str | None]]) -> None:
    """Every link among the (path, link target or None) members, folders included, must name
    another member, as inspect checks it (layout.dangling_links): a link that resolves to
    nothing would dangle on the node. The build's last check before writing."""
    links = {path: target for path, target in members if target is not None}
    # A target that leaves the bundle names nothing in it either (inspect says so apart).
    why = {path: "missing" for path, target in links.items()
           if link_resolves_to(path, target) is None}
    why.update((path, reason) for path, _, reason in
               dangling_links((path for path, _ in members), links))
    for path, target in links.items():  # the first, in the bundle's order
        if path in why:
            raise _bad(f"{path}: a symlink to {target}, " + (
                "which is not in the bundle" if why[path] == "missing"
                else "which leads back to it (a symlink loop)"),
                hint="this is a coreos-gpu bug: please report it with the driver version "
                "and profile")


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in version.split("."))


def _manifest(package: DriverPackage, module_sets: Sequence[ModuleSet], profile: Profile,
              releases: Sequence[ReleaseInputs], node: NodeSettings, tool_version: str,
              entries: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "tool_version": tool_version,
        "os": releases[0].os,
        "arch": MACHINE,
        "driver_version": package.version,
        "flavour": module_sets[0].flavour.value,
        "profile": profile.value,
        "kernel_releases": [s.kernel_release for s in module_sets],
        "releases": [r.to_json() for r in releases],
        "agent_units": list(node.agent_units),
        "on_driver_failure": node.on_driver_failure.value,
        "repository": ({"url": node.repository.url,
                        "key_fingerprint": node.repository.fingerprint}
                       if node.repository else None),
        "inputs": [{"what": "driver", "source": package.source, "sha256": package.sha256}] + [
            {"what": f"{r.os} {r.channel} {r.version} image", "source": r.image_url,
             "sha256": r.image_sha256} for r in releases],
        "modules": {s.kernel_release: [
            {"name": m.name, "path": module_path(package.version, s.kernel_release, m.name),
             "vermagic": m.vermagic, "version": m.version, "depends": list(m.depends)}
            for m in sorted(s.modules, key=lambda m: m.name)] for s in module_sets},
        "files": [{"path": path, **entries[path]} for path in sorted(entries)],
    }


def _write_member(writer: ArchiveWriter, m: _Member) -> dict[str, Any] | None:
    """Add one member; its MANIFEST.json entry (None for a folder)."""
    mode = f"{m.mode:04o}"
    if m.target is not None:
        writer.add_symlink(m.path, m.target)
        return {"type": "symlink", "target": m.target, "mode": mode}
    if m.source is None and m.data is None:
        writer.add_directory(m.path)
        return None
    try:
        digest: Digest = (writer.add_file(m.path, m.source, mode=m.mode) if m.source is not None
                          else writer.add_bytes(m.path, m.data or b"", mode=m.mode))
    except OSError as e:
        raise _bad(f"cannot bundle {m.source}: {e.strerror or e}") from e
    if m.sha256 and digest.sha256 != m.sha256:
        raise _bad(f"{m.source} changed after it was built (sha256 {digest.sha256}, "
                   f"expected {m.sha256})", hint="rebuild the modules")
    return {"type": "file", "sha256": digest.sha256, "size": digest.size, "mode": mode}


def assemble_bundle(*, package: DriverPackage, module_sets: Sequence[ModuleSet],
                    profile: Profile, compression: Compression, output: Path,
                    releases: Sequence[ReleaseInputs], node: NodeSettings,
                    tool_version: str, node_files: Traversable | None = None,
                    cache_dir: Path | None = None) -> Bundle:
    """Write the bundle to output (atomically) and return what was written.

    node: the build-time node settings, rendered into the node files.
    node_files: the folder of node scripts; the package's resources/node by default.
    cache_dir: where finished archives are kept by a hash of their inputs, so an unchanged
    rebuild copies the archive instead of compressing it again.
    """
    _check_inputs(package, module_sets, releases)
    check_persistence(package, profile, node.persistence)
    module_sets = sorted(module_sets, key=lambda s: _version_key(s.kernel_release))
    releases = sorted(releases, key=lambda r: (r.os, r.channel, _version_key(r.version)))
    listed = (_userspace_members(package, profile) + _module_members(package.version, module_sets)
              + _node_members(node, node_files, package, module_sets, profile, releases[0].os,
                             tool_version))
    members = _sorted_with_folders([*listed, _contents_member(listed)])
    check_links([(m.path, m.target) for m in members])
    key = _bundle_key(members, module_sets, profile, compression, releases, node,
                      tool_version, package)
    if cache_dir is not None and (hit := _from_cache(cache_dir / "bundles", key, output)):
        return hit
    entries: dict[str, dict[str, Any]] = {}
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with create_archive(output, compression, mtime=archive_mtime()) as writer:
            for m in members:
                entry = _write_member(writer, m)
                if entry is not None:
                    entries[m.path] = entry
            manifest = _manifest(package, module_sets, profile, releases, node,
                                 tool_version, entries)
            text = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
            sums = {path: e["sha256"] for path, e in entries.items() if e["type"] == "file"}
            sums[MANIFEST_NAME] = writer.add_bytes(MANIFEST_NAME, text, mode=0o644).sha256
            writer.add_bytes(SUMS_NAME, render_sums(sums), mode=0o644)
    except OSError as e:
        raise _bad(f"cannot write {output}: {e.strerror or e}") from e
    bundle = Bundle(output, writer.digest.sha256, writer.digest.size, manifest)
    if cache_dir is not None:
        _to_cache(cache_dir / "bundles", key, bundle)
    return bundle


def _bundle_key(members: Sequence[_Member], module_sets: Sequence[ModuleSet], profile: Profile,
                compression: Compression, releases: Sequence[ReleaseInputs],
                node: NodeSettings, tool_version: str, package: DriverPackage) -> str:
    """Every input of the archive's bytes: the package and module builds by their digests,
    node files by their content, and the settings that shape the archive."""
    inputs = {
        "format": FORMAT, "tool_version": tool_version, "mtime": archive_mtime(),
        "compression": compression.value, "profile": profile.value,
        "driver_sha256": package.sha256, "agent_units": list(node.agent_units),
        "on_driver_failure": node.on_driver_failure.value,
        "repository": [node.repository.url, node.repository.fingerprint]
        if node.repository else None,
        "releases": [r.to_json() for r in releases],
        "modules": [[s.key, [m.sha256 for m in s.modules]] for s in module_sets],
        "members": [[m.path, m.mode, m.target, str(m.source) if m.source else None,
                     hashlib.sha256(m.data).hexdigest() if m.data is not None else None]
                    for m in members],
    }
    return hash_inputs(inputs)


def _from_cache(folder: Path, key: str, output: Path) -> Bundle | None:
    try:
        record = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    cached = folder / key
    if not cached.is_file() or cached.stat().st_size != record["size"]:
        return None
    copy_atomically(cached, output)
    return Bundle(output, record["sha256"], record["size"], record["manifest"])


def _to_cache(folder: Path, key: str, bundle: Bundle) -> None:
    copy_atomically(bundle.path, folder / key)
    write_atomically(folder / f"{key}.json", json.dumps({
        "sha256": bundle.sha256, "size": bundle.size, "manifest": bundle.manifest}).encode())
