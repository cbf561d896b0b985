"""A repository copy that is old cannot roll a node back or freeze it: the node remembers the
highest index generation it accepted (per signing key, under /var/lib) and refuses a lower
one (28), and refuses an index past its signed expiry or without one (29). The real node
scripts under bash, dash and busybox sh, against indexes publish and refresh signed, read
through file:// (the transport does not matter here: test_node_hostile has the servers).
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from coreos_gpu.keys import load_private_key
from coreos_gpu.publish import publish, refresh
from coreos_gpu.repository import POINTER, Index, load_index
from coreos_gpu.stores import FolderStore

from .bundletools import CLOUD
from .nodetree import SHELLS, snapshot
from .test_node_fetch import Made, archive, made, node_with, one_error, refused, without_locks

__all__ = ["made"]  # the module's bundles, shared with test_node_fetch


def key_id(key: Path) -> str:
    """The fingerprint's hex, as the index's key line names it (keys.fingerprint)."""
    der = load_private_key(key).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("shell", SHELLS)
def test_a_replayed_index_neither_rolls_back_nor_hides_a_bundle(tmp_path: Path, made: Made,
                                                                shell: str) -> None:
    """Generation 1 lists A; generation 2 adds B (CLOUD). A node that staged B from
    generation 2 is served generation 1's index.current again: --index refuses it, and a node
    that needs B is refused with 28, not told that no bundle exists (24), nothing staged."""
    repo = tmp_path / "repository"
    repo.mkdir()
    store, key = FolderStore(repo), load_private_key(made.key)
    publish([archive(made.a)], store, key)
    first = (repo / POINTER).read_bytes()
    publish([archive(made.b)], store, key)
    url = f"file://{repo}"
    node = node_with(tmp_path / "one", made.a, shell)
    twin = node_with(tmp_path / "two", made.a, shell)
    assert node.fetch("--kernel", CLOUD, env={"NVIDIA_REPOSITORY_URL": url}).code == 0
    remembered = node.root / "var/lib/coreos-gpu" / f"generation.{key_id(made.key)}"
    assert remembered.read_text() == "2\n"
    # The twin accepted generation 2 too (its memory, as if it had), but has not staged B.
    shutil.copytree(remembered.parent, twin.root / "var/lib/coreos-gpu")
    (repo / POINTER).write_bytes(first)  # the replay
    line = one_error(node.fetch("--index", env={"NVIDIA_REPOSITORY_URL": url}), 28)
    assert "generation 1, older than generation 2 this node accepted before" in line
    before = snapshot(twin.root)
    line = one_error(twin.fetch("--kernel", CLOUD, env={"NVIDIA_REPOSITORY_URL": url}), 28)
    assert f"remove /{remembered.relative_to(node.root)}" in line.replace(str(twin.root), "")
    assert without_locks(snapshot(twin.root)) == without_locks(before)
    assert snapshot(twin.root)["var/lib/coreos-gpu/" + remembered.name] == before[
        "var/lib/coreos-gpu/" + remembered.name]


def test_index_reads_remember_nothing_and_the_same_generation_passes(tmp_path: Path,
                                                                      made: Made) -> None:
    """--index (the doctor's, no root needed) checks without writing; the generation
    accepted before is accepted again (a boot after a boot), and a refreshed one raises it."""
    repo = tmp_path / "repository"
    repo.mkdir()
    store, key = FolderStore(repo), load_private_key(made.key)
    publish([archive(made.a), archive(made.b)], store, key)
    url = {"NVIDIA_REPOSITORY_URL": f"file://{repo}"}
    node = node_with(tmp_path / "node", made.a)
    assert node.fetch("--index", env=url).code == 0
    memory = node.root / "var/lib/coreos-gpu"
    assert not memory.exists()
    assert node.fetch("--kernel", CLOUD, env=url).code == 0
    assert node.fetch("--kernel", "6.6.6-nowhere", env=url).code == 24  # read again: fine
    refresh(store, key)
    assert node.fetch("--kernel", "6.6.6-nowhere", env=url).code == 24
    assert [p.read_text() for p in memory.iterdir()] == ["2\n"]


@pytest.mark.parametrize("shell", SHELLS)
def test_an_expired_index_is_refused(tmp_path: Path, made: Made, shell: str) -> None:
    repo = tmp_path / "repository"
    repo.mkdir()
    publish([archive(made.a), archive(made.b)], FolderStore(repo), load_private_key(made.key),
            lifetime=timedelta(seconds=-1))
    expires = load_index(FolderStore(repo), None)
    assert expires is not None
    line = refused(tmp_path, made, f"file://{repo}", 29, shell=shell)
    assert f"generation 1) expired at {expires.index.expires}" in line
    assert "coreos-gpu repository refresh" in line


def test_an_index_without_expiry_is_refused(tmp_path: Path, made: Made) -> None:
    """An index signed before indexes expired (a replay of one from then) is refused like an
    expired one: its age is unknown."""
    from coreos_gpu.publish import _write_index  # the publisher's own writer

    repo = tmp_path / "repository"
    repo.mkdir()
    store, key = FolderStore(repo), load_private_key(made.key)
    publish([archive(made.a), archive(made.b)], store, key)
    loaded = load_index(store, None)
    assert loaded is not None
    old: Index = loaded.index.__class__(**{**loaded.index.__dict__, "expires": ""})
    text_sha = _write_index(store, old, key)
    (repo / POINTER).write_text(f"coreos-gpu-repository 1 {text_sha}\n")
    line = refused(tmp_path, made, f"file://{repo}", 29)
    assert "has no expiry" in line
