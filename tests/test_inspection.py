"""`coreos-gpu inspect` against hand-made hostile archives: links that leave the folder the
archive is extracted to, and members that would be written through a link."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from coreos_gpu.inspection import inspect_bundle

P = "payload/535.261.03"


def _archive(path: Path, members: list[tuple[str, str]]) -> Path:
    """A gzipped tar of (name, link target) members; an empty target makes a file, a
    target of "/" a folder."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, target in members:
            info = tarfile.TarInfo(name)
            if target == "/":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif target:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                data = f"{name}\n".encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _link_problems(path: Path) -> list[str]:
    """The problems about links; a hand-made archive has others (no SHA256SUMS...)."""
    return [p for p in inspect_bundle(path).problems if "symlink" in p]


@pytest.mark.parametrize(
    ("members", "problems"),
    [
        ([(f"{P}/lib64/libcuda.so.1", "/etc/shadow")],
         [f"{P}/lib64/libcuda.so.1: a symlink to the absolute path /etc/shadow, outside the "
          "folder it is extracted to"]),
        ([(f"{P}/lib64/libcuda.so.1", "../../../../etc/shadow")],
         [f"{P}/lib64/libcuda.so.1: a symlink to ../../../../etc/shadow, which leaves the "
          "folder it is extracted to"]),
        ([("evil", "..")], ["evil: a symlink to .., which leaves the folder it is extracted to"]),
        # Down, then up past the top: still out.
        ([("a/b", "c/../../../x")],
         ["a/b: a symlink to c/../../../x, which leaves the folder it is extracted to"]),
        # A harmless-looking link, then a file written through it.
        ([(f"{P}/lib64", "/"), (f"{P}/lib64/up", ".."), (f"{P}/lib64/up/x", "")],
         [f"{P}/lib64/up/x: beneath the symlink {P}/lib64/up, so extracting it would write "
          "where the link points"]),
        # Through a link to an absolute folder, by a spelling tar normalises.
        ([("etc", "/etc"), ("./etc/cron.d/x", ""), ("etc/cron.d", "/")],
         ["etc: a symlink to the absolute path /etc, outside the folder it is extracted to",
          "./etc/cron.d/x: beneath the symlink etc, so extracting it would write where the link "
          "points",
          "etc/cron.d: beneath the symlink etc, so extracting it would write where the link "
          "points"]),
        ([("empty", "")], []),  # a file, not a link
        ([(f"{P}/lib64/libcuda.so", "libcuda.so.1"), (f"{P}/lib64/libcuda.so.1", ""),
          (f"{P}/lib64/gbm/nvidia-drm_gbm.so", "../libnvidia-allocator.so.1"),
          (f"{P}/lib64/libnvidia-allocator.so.1", ""), (f"{P}/lib", "lib64"),
          ("node/x", "../README"), ("README", "")], []),  # all inside, all there
        # Inside the folder the archive is extracted to, but out of the driver folder: this
        # case was accepted until issue 28 ("inspect checks what the node checks") picked the
        # rule of install_nvidia.sh, which refuses it: the node installs payload/<version>/
        # alone, under another name, so the link would name nothing of the bundle there.
        ([(f"{P}/lib64/x", "../../../README"), ("README", "")],
         [f"{P}/lib64/x: a symlink to ../../../README, which steps out of {P}/, the folder "
          "the node installs"]),
        # Out and back in by the folder's name: not the same name on the node, so out too.
        ([(f"{P}/lib64/x", "../../535.261.03/lib64/y"), (f"{P}/lib64/y", "")],
         [f"{P}/lib64/x: a symlink to ../../535.261.03/lib64/y, which steps out of {P}/, the "
          "folder the node installs"]),
        ([("node/a", "../../node/b"), ("node/b", "")],
         ["node/a: a symlink to ../../node/b, which leaves the folder it is extracted to"]),

        # Inside, but nothing there: the GBM link as the build wrote it.
        ([(f"{P}/lib64/libnvidia-allocator.so.1", ""),
          (f"{P}/lib64/gbm/nvidia-drm_gbm.so", "libnvidia-allocator.so.1")],
         [f"{P}/lib64/gbm/nvidia-drm_gbm.so: a symlink to libnvidia-allocator.so.1, which is "
          "not in the archive"]),
        # A chain that ends nowhere names its last link only; a loop names each.
        ([(f"{P}/lib64/libcuda.so", "libcuda.so.1"), (f"{P}/lib64/libcuda.so.1", "libcuda.so.5")],
         [f"{P}/lib64/libcuda.so.1: a symlink to libcuda.so.5, which is not in the archive"]),
        ([("a", "b"), ("b", "a")],
         ["a: a symlink to b, which leads back to it (a symlink loop)",
          "b: a symlink to a, which leads back to it (a symlink loop)"]),
    ],
    ids=["absolute", "dotdot", "parent", "down-then-out", "file-beneath-link",
         "folder-beneath-link", "no-links", "links-inside", "out-of-the-driver-folder",
         "out-and-back-in", "out-of-the-bundle", "dangling", "dangling-chain", "loop"],
)
def test_hostile_links_are_problems(tmp_path: Path, members: list[tuple[str, str]],
                                    problems: list[str]) -> None:
    assert _link_problems(_archive(tmp_path / "x.tar.gz", members)) == problems


def test_inspect_exits_12_on_a_hostile_link(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    archive = _archive(tmp_path / "nvidia.tar.gz", [("lib", "/usr/lib"), ("lib/x.so", "")])
    result = cli("inspect", archive, "--json")
    assert result.code == 12
    assert "lib/x.so: beneath the symlink lib, so extracting it would write where the link " \
        "points" in result.stdout


def test_inspect_exits_12_naming_a_dangling_link_on_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    link = f"{P}/lib64/gbm/nvidia-drm_gbm.so"
    archive = _archive(tmp_path / "nvidia.tar.gz", [
        (f"{P}/lib64/libnvidia-allocator.so.1", ""), (link, "libnvidia-allocator.so.1")])
    result = cli("inspect", archive)
    assert result.code == 12
    assert [line for line in result.stdout.splitlines() if link in line] == [
        f"  {link}: a symlink to libnvidia-allocator.so.1, which is not in the archive"]


def test_inspect_shows_the_contents_sha256(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The sha256 of SHA256SUMS, which install_nvidia.sh --expect-sha256 takes (the bundle id
    on the node is its first 12 digits); none without one."""
    archive = _archive(tmp_path / "nvidia.tar.gz", [("SHA256SUMS", ""), ("x", "")])
    digest = hashlib.sha256(b"SHA256SUMS\n").hexdigest()  # _archive's contents of the file
    assert inspect_bundle(archive).contents_sha256 == digest
    assert json.loads(cli("inspect", archive, "--json").stdout)["contents_sha256"] == digest
    [line] = [line for line in cli("inspect", archive).stdout.splitlines()
              if line.startswith("contents sha256 ")]
    assert line.split(None, 2)[2] == (f"{digest} (install_nvidia.sh --expect-sha256; "
                                      f"bundle id {digest[:12]})")
    none = _archive(tmp_path / "none.tar.gz", [("x", "")])
    assert inspect_bundle(none).contents_sha256 == ""
    assert json.loads(cli("inspect", none, "--json").stdout)["contents_sha256"] is None


def _files_archive(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


_ENV = ("DRIVER_VERSION=535.261.03\nFLAVOUR=proprietary\nPROFILE=compute\nOS=flatcar\n"
        "ARCH=x86_64\nKERNEL_RELEASES=6.1.0-50-amd64\nAGENT_UNITS=a.service\n"
        "ON_DRIVER_FAILURE=wait\nPERSISTENCE=off\nREPOSITORY_URL=''\n"
        "REPOSITORY_KEY_FINGERPRINT=''\n")
_MANIFEST = {"format": 1, "tool_version": "0.1.0", "os": "flatcar", "driver_version": "535.261.03",
             "flavour": "proprietary", "profile": "compute",
             "kernel_releases": ["6.1.0-50-amd64"], "releases": [], "agent_units": ["a.service"],
             "on_driver_failure": "wait", "repository": None, "files": []}


# bundle.env's values that MANIFEST.json states, in the order inspect compares them.
_CRLF = [(k, v, v) for k, v in (("DRIVER_VERSION", "535.261.03"), ("FLAVOUR", "proprietary"),
                                 ("PROFILE", "compute"), ("OS", "flatcar"),
                                 ("KERNEL_RELEASES", "6.1.0-50-amd64"),
                                 ("AGENT_UNITS", "a.service"), ("ON_DRIVER_FAILURE", "wait"),
                                 ("ARCH", "x86_64"))] + [
    ("REPOSITORY_URL", "''", ""), ("REPOSITORY_KEY_FINGERPRINT", "''", "")]


@pytest.mark.parametrize(("env", "manifest", "problems"), [
    (_ENV, {}, []),
    # The node acts on bundle.env; inspect shows MANIFEST.json: they must say the same.
    (_ENV.replace("OS=flatcar", "OS=coreos"), {},
     ["node/bundle.env: OS is 'coreos', MANIFEST.json says 'flatcar'"]),
    (_ENV, {"kernel_releases": ["6.1.0-50-amd64", "6.6.54-flatcar"]},
     ["node/bundle.env: KERNEL_RELEASES is '6.1.0-50-amd64', MANIFEST.json says "
      "'6.1.0-50-amd64 6.6.54-flatcar'"]),
    (_ENV, {"arch": "aarch64"},
     ["node/bundle.env: ARCH is 'x86_64', MANIFEST.json says 'aarch64'"]),
    # What check_settings refuses on the node, inspect refuses.
    (_ENV.replace("AGENT_UNITS=a.service", "AGENT_UNITS=../x.service"),
     {"agent_units": ["../x.service"]},
     ["node/bundle.env: AGENT_UNITS=../x.service is not a valid value"]),
    # Read as the node reads it: the \r stays in each value.
    (_ENV.replace("\n", "\r\n"), {},
     ["node/bundle.env: DRIVER_VERSION=535.261.03\r is not a valid value",
      *(f"node/bundle.env: {key} is {value + chr(13)!r}, MANIFEST.json says {want!r}"
        for key, value, want in _CRLF)]),
    (None, {}, ["node/bundle.env is missing"]),
], ids=["agrees", "os", "kernels", "arch", "hostile-unit", "crlf", "missing"])
def test_inspect_reads_bundle_env_as_the_node_does(
        tmp_path: Path, env: str | None, manifest: dict[str, object], problems: list[str]) -> None:
    files = {"MANIFEST.json": json.dumps({**_MANIFEST, **manifest}).encode()}
    if env is not None:
        files["node/bundle.env"] = env.encode()
    # A hand-made archive has other problems (no SHA256SUMS, node/contents...).
    found = [p for p in inspect_bundle(_files_archive(tmp_path / "b.tar.gz", files)).problems
             if "bundle.env" in p and not p.startswith("node/bundle.env: in the archive")]
    assert found == problems


def test_inspect_reads_sha256sums_as_the_node_does(tmp_path: Path) -> None:
    """A CRLF line names another path on the node (its awk keeps the \r): inspect, which
    read it as the writer meant it, refuses it too (spec/sha256sums.json)."""
    data = b"#!/bin/sh\n"
    sums = f"{hashlib.sha256(data).hexdigest()}  install_nvidia.sh\r\n".encode()
    report = inspect_bundle(_files_archive(tmp_path / "b.tar.gz", {
        "install_nvidia.sh": data, "SHA256SUMS": sums}))
    assert "SHA256SUMS line 1: 'install_nvidia.sh\\r' has white space in it" in report.problems
    assert "install_nvidia.sh: in the archive, not in SHA256SUMS" in report.problems
