"""The bundle stage and `inspect` on small synthetic inputs (tests/bundletools.py)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coreos_gpu.archive import ArchiveWriter, open_archive
from coreos_gpu.bundle import (
    Bundle,
    NodeSettings,
    ReleaseInputs,
    assemble_bundle,
    check_links,
    default_node_files,
    inspect_bundle,
)
from coreos_gpu.cache import sha256_of
from coreos_gpu.config import Compression, Persistence, Profile
from coreos_gpu.driver import DriverPackage
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.keys import write_key_pair
from coreos_gpu.layout import part_of, payload_path
from coreos_gpu.manifest import FILE_TYPES, parse_entry
from coreos_gpu.modules import KernelModule, ModuleSet
from coreos_gpu.repository import load_trust

from .bundletools import (
    CLOUD,
    CLOUD_RELEASE,
    KERNEL,
    MODULES,
    PERSISTENCED,
    RELEASE,
    RUN_URL,
    VERSION,
    dangling_links,
    extract,
    make_ko,
    make_package,
    module_set,
    rewrite,
)

P = f"payload/{VERSION}"
COMPUTE_FILES = {
    f"{P}/lib64/libnvidia-ml.so.{VERSION}", f"{P}/lib64/libcuda.so.{VERSION}",
    f"{P}/etc/OpenCL/vendors/nvidia.icd", f"{P}/bin/nvidia-smi", f"{P}/bin/nvidia-modprobe",
    f"{P}/firmware/nvidia/{VERSION}/gsp_ga10x.bin"}
COMPUTE_LINKS = {
    f"{P}/lib64/libnvidia-ml.so.1": f"libnvidia-ml.so.{VERSION}",
    f"{P}/lib64/libcuda.so.1": f"libcuda.so.{VERSION}",
    f"{P}/lib64/libcuda.so": "libcuda.so.1"}


# --- inputs -------------------------------------------------------------------------------

@pytest.fixture
def package(tmp_path: Path) -> DriverPackage:
    return make_package(tmp_path / "driver")


def assemble(package: DriverPackage, sets: list[ModuleSet], output: Path, *,
             releases: tuple[ReleaseInputs, ...] = (RELEASE,),
             profile: Profile = Profile.COMPUTE, compression: Compression = Compression.GZIP,
             node_files: Path | None = None) -> Bundle:
    if node_files is None:  # an empty folder: these tests must not depend on package data
        node_files = output.parent / "no-node-files"
        node_files.mkdir(exist_ok=True)
    return assemble_bundle(
        package=package, module_sets=sets, profile=profile, compression=compression,
        output=output, releases=releases, node=NodeSettings(("dcos-mesos-slave.service",)),
        tool_version="0.1.0", node_files=node_files)


@pytest.fixture
def bundle(package: DriverPackage, ko_dir: Path, tmp_path: Path) -> Bundle:
    return assemble(package, [module_set(ko_dir, KERNEL)], tmp_path / "nvidia.tar.gz")


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with open_archive(path) as archive:  # Python 3.11's tarfile cannot read zstd itself
        return {m.name: m for m in archive.tar}


# --- layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f"libcuda.so.{VERSION} 0755 CUDA_LIB NATIVE / MODULE:compute",
         f"lib64/libcuda.so.{VERSION}"),
        (f"32/libcuda.so.1 0000 CUDA_SYMLINK COMPAT32 / libcuda.so.{VERSION} MODULE:compute",
         "lib32/libcuda.so.1"),
        (f"libnvidia-ml.so.{VERSION} 0755 UTILITY_LIB NATIVE MODULE:nvml",
         f"lib64/libnvidia-ml.so.{VERSION}"),
        (f"libvdpau_nvidia.so.{VERSION} 0755 VDPAU_LIB NATIVE vdpau MODULE:vdpau",
         f"lib64/vdpau/libvdpau_nvidia.so.{VERSION}"),
        (f"libnvidia-tls.so.{VERSION} 0755 TLS_LIB NATIVE tls MODULE:opengl",
         f"lib64/tls/libnvidia-tls.so.{VERSION}"),
        ("nvidia-drm_gbm.so 0000 GBM_BACKEND_LIB_SYMLINK NATIVE libnvidia-allocator.so.1 "
         "MODULE:nvalloc", "lib64/gbm/nvidia-drm_gbm.so"),
        # nvidia-installer's set_destinations: the GBM folder whatever the arch; VGX, GRID
        # and FLEXERA in the 64-bit library folder; systemd unit links below /etc.
        ("nvidia-drm_gbm.so 0000 GBM_BACKEND_LIB_SYMLINK COMPAT32 libnvidia-allocator.so.1 "
         "MODULE:nvalloc", "lib64/gbm/nvidia-drm_gbm.so"),
        (f"libnvidia-vgxcfg.so.{VERSION} 0755 VGX_LIB MODULE:vgpu",
         f"lib64/libnvidia-vgxcfg.so.{VERSION}"),
        ("libFlxCore64.so.1 0000 FLEXERA_LIB_SYMLINK / libFlxCore64.so.2021.02.0 MODULE:vgpu",
         "lib64/libFlxCore64.so.1"),
        (f"libnvidia-grid.so.{VERSION} 0755 GRID_LIB grid MODULE:vgpu",
         f"lib64/grid/libnvidia-grid.so.{VERSION}"),
        ("nvidia-suspend.service 0000 SYSTEMD_UNIT_SYMLINK systemd-suspend.service.requires "
         "MODULE:powermanagement",
         "etc/systemd/system/systemd-suspend.service.requires/nvidia-suspend.service"),
        ("systemd/system/nvidia-suspend.service 0644 SYSTEMD_UNIT MODULE:powermanagement",
         "lib/systemd/system/nvidia-suspend.service"),
        ("nvidia-installer 0755 INSTALLER_BINARY MODULE:installer", "bin/nvidia-installer"),
        ("nvidia-smi 0755 UTILITY_BINARY MODULE:nvml", "bin/nvidia-smi"),
        ("nvidia-modprobe 4755 NVIDIA_MODPROBE bin MODULE:installer", "bin/nvidia-modprobe"),
        ("nvidia-modprobe 0755 NVIDIA_MODPROBE /usr/bin MODULE:installer",
         "bin/nvidia-modprobe"),
        ("firmware/gsp_tu10x.bin 0644 FIRMWARE INHERIT_PATH_DEPTH:1 MODULE:gsp",
         f"firmware/nvidia/{VERSION}/gsp_tu10x.bin"),
        ("nvidia.icd 0644 CUDA_ICD MODULE:opencl", "etc/OpenCL/vendors/nvidia.icd"),
        ("NVIDIA_Changelog 0644 DOCUMENTATION / MODULE:installer", "share/doc/NVIDIA_Changelog"),
        ("LICENSE 0644 DOCUMENTATION share/doc/NVIDIA_GLX-1.0 MODULE:installer",
         "share/doc/NVIDIA_GLX-1.0/LICENSE"),
        ("nvidia-smi.1.gz 0644 MANPAGE share/man/man1 MODULE:nvml",
         "share/man/man1/nvidia-smi.1.gz"),
        ("nvidia_drv.so 0755 XMODULE_SHARED_LIB drivers MODULE:x",
         "lib64/xorg/modules/drivers/nvidia_drv.so"),
        ("10_nvidia.json 0644 GLVND_EGL_ICD_JSON MODULE:egl",
         "share/glvnd/egl_vendor.d/10_nvidia.json"),
        ("thing.dat 0644 SHINY_NEW_TYPE MODULE:x", "share/nvidia/thing.dat"),
    ],
)
def test_payload_path(line: str, expected: str) -> None:
    assert payload_path(parse_entry(line, 1), VERSION) == expected


def test_compute_layout(bundle: Bundle) -> None:
    found = members(bundle.path)
    files = {n for n, m in found.items() if m.isreg()}
    links = {n: m.linkname for n, m in found.items() if m.issym()}
    modules = {f"{P}/modules/{KERNEL}/{name}.ko" for name in MODULES}
    generated = {"nvidia.service", "node/agent-dropin.conf", "node/bundle.env",
                 "node/module-deps", "node/contents"}
    assert files == COMPUTE_FILES | modules | generated | {"MANIFEST.json", "SHA256SUMS"}
    assert links == COMPUTE_LINKS
    # Folders are members too (mode 0755), each before what it holds.
    names = list(found)
    assert {f"{P}/lib64", f"{P}/firmware/nvidia/{VERSION}", f"{P}/modules/{KERNEL}"} <= {
        n for n, m in found.items() if m.isdir() and m.mode == 0o755}
    assert all(names.index(str(Path(n).parent)) < names.index(n) for n in names if "/" in n)
    assert names[-2:] == ["MANIFEST.json", "SHA256SUMS"]  # last: they describe the rest
    assert found[f"{P}/bin/nvidia-modprobe"].mode == 0o4755  # the manifest's, setuid
    assert found[f"{P}/bin/nvidia-smi"].mode == 0o755
    assert found[f"{P}/firmware/nvidia/{VERSION}/gsp_ga10x.bin"].mode == 0o644
    assert found[f"{P}/modules/{KERNEL}/nvidia.ko"].mode == 0o644
    assert found[f"{P}/lib64/libcuda.so"].mode == 0o777
    for m in found.values():
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "root", "root")


# --- links: placed and aimed the way nvidia-installer does it --------------------------------

# One link of every link type the manifest format has (manifest.FILE_TYPES: 535's manifest.c,
# plus NVIFR of 470 and TLS of 390), each with what it names, in the field layout of its type
# in nvidia-installer's manifest.c (arch, path, target); the GBM line as 580's manifest spells
# it, the other names NVIDIA's where known. ENTRIES has the CUDA and UTILITY_LIB links.
EVERY_LINK = f"""\
libnvidia-allocator.so.{VERSION} 0755 OPENGL_LIB NATIVE MODULE:nvalloc
libnvidia-allocator.so.1 0000 OPENGL_SYMLINK NATIVE libnvidia-allocator.so.{VERSION} MODULE:nvalloc
nvidia-drm_gbm.so 0000 GBM_BACKEND_LIB_SYMLINK NATIVE libnvidia-allocator.so.1 MODULE:nvalloc
libnvidia-opencl.so.{VERSION} 0755 OPENCL_LIB NATIVE / MODULE:opencl
libnvidia-opencl.so.1 0000 OPENCL_LIB_SYMLINK NATIVE / libnvidia-opencl.so.{VERSION} MODULE:opencl
libOpenCL.so.1.0.0 0755 OPENCL_WRAPPER_LIB NATIVE / MODULE:opencl
libOpenCL.so.1 0000 OPENCL_WRAPPER_SYMLINK NATIVE / libOpenCL.so.1.0.0 MODULE:opencl
tls/libnvidia-tls.so.{VERSION} 0755 TLS_LIB NATIVE tls MODULE:opengl
tls/libnvidia-tls.so.1 0000 TLS_SYMLINK NATIVE tls libnvidia-tls.so.{VERSION} MODULE:opengl
nvidia-installer 0755 INSTALLER_BINARY MODULE:installer
nvidia-uninstall 0000 UTILITY_BIN_SYMLINK nvidia-installer MODULE:installer
nvidia-debugdump 0755 UTILITY_BINARY MODULE:nvml
nvidia-dbgdump 0000 UTILITY_BIN_SYMLINK nvidia-debugdump MODULE:nvml
libglxserver_nvidia.so.{VERSION} 0755 GLX_MODULE_SHARED_LIB extensions/ MODULE:x
libglxserver_nvidia.so 0000 GLX_MODULE_SYMLINK extensions/ libglxserver_nvidia.so.{VERSION} MODULE:x
libvdpau_nvidia.so.1 0000 VDPAU_SYMLINK NATIVE vdpau libvdpau_nvidia.so.{VERSION} MODULE:vdpau
libvdpau_nvidia.so 0000 VDPAU_SYMLINK NATIVE / vdpau/libvdpau_nvidia.so.1 MODULE:vdpau
libnvcuvid.so.{VERSION} 0755 NVCUVID_LIB NATIVE MODULE:nvcuvid
libnvcuvid.so.1 0000 NVCUVID_LIB_SYMLINK NATIVE libnvcuvid.so.{VERSION} MODULE:nvcuvid
libnvidia-encode.so.{VERSION} 0755 ENCODEAPI_LIB NATIVE MODULE:enc
libnvidia-encode.so.1 0000 ENCODEAPI_LIB_SYMLINK NATIVE libnvidia-encode.so.{VERSION} MODULE:enc
libnvidia-vgxcfg.so.{VERSION} 0755 VGX_LIB MODULE:vgpu
libnvidia-vgxcfg.so.1 0000 VGX_LIB_SYMLINK libnvidia-vgxcfg.so.{VERSION} MODULE:vgpu
libnvidia-grid.so.{VERSION} 0755 GRID_LIB / MODULE:vgpu
libnvidia-grid.so.1 0000 GRID_LIB_SYMLINK / libnvidia-grid.so.{VERSION} MODULE:vgpu
libFlxCore64.so.2021.02.0 0755 FLEXERA_LIB / MODULE:vgpu
libFlxCore64.so.1 0000 FLEXERA_LIB_SYMLINK / libFlxCore64.so.2021.02.0 MODULE:vgpu
libGL.so.1.7.0 0755 GLVND_LIB NATIVE MODULE:opengl
libGL.so.1 0000 GLVND_SYMLINK NATIVE libGL.so.1.7.0 MODULE:opengl
libGLX_nvidia.so.{VERSION} 0755 GLX_CLIENT_LIB NATIVE MODULE:opengl
libGLX_nvidia.so.0 0000 GLX_CLIENT_SYMLINK NATIVE libGLX_nvidia.so.{VERSION} MODULE:opengl
libEGL_nvidia.so.{VERSION} 0755 EGL_CLIENT_LIB NATIVE MODULE:opengl
libEGL_nvidia.so.0 0000 EGL_CLIENT_SYMLINK NATIVE libEGL_nvidia.so.{VERSION} MODULE:opengl
libnvidia-ifr.so.{VERSION} 0755 NVIFR_LIB NATIVE MODULE:nvfbc
libnvidia-ifr.so.1 0000 NVIFR_LIB_SYMLINK NATIVE libnvidia-ifr.so.{VERSION} MODULE:nvfbc
systemd/system/nvidia-suspend.service 0644 SYSTEMD_UNIT MODULE:pm
nvidia-suspend.service 0000 SYSTEMD_UNIT_SYMLINK systemd-suspend.service.requires MODULE:pm
"""


def test_every_link_type_resolves_in_every_profile(ko_dir: Path, tmp_path: Path) -> None:
    package = make_package(tmp_path / "driver", extra=EVERY_LINK)
    link_types = {e.type for e in package.manifest.entries if e.is_symlink}
    assert link_types == {t for t, info in FILE_TYPES.items() if info.is_symlink}
    for profile in Profile:
        bundle = assemble(package, [module_set(ko_dir, KERNEL)],
                          tmp_path / f"{profile.value}.tar.gz", profile=profile)
        root = extract(bundle.path, tmp_path / profile.value)
        assert dangling_links(root) == [], profile
        assert inspect_bundle(bundle.path).problems == (), profile
    links = {n: m.linkname for n, m in members(tmp_path / "full.tar.gz").items() if m.issym()}
    # The GBM backend link sits in <libdir>/gbm and names the library in <libdir>.
    assert links[f"{P}/lib64/gbm/nvidia-drm_gbm.so"] == "../libnvidia-allocator.so.1"
    unit = "nvidia-suspend.service"
    assert links[f"{P}/etc/systemd/system/systemd-suspend.service.requires/{unit}"] == \
        f"../../../../lib/systemd/system/{unit}"
    assert links[f"{P}/lib64/libnvidia-vgxcfg.so.1"] == f"libnvidia-vgxcfg.so.{VERSION}"
    assert links[f"{P}/lib64/libvdpau_nvidia.so"] == "vdpau/libvdpau_nvidia.so.1"
    assert links[f"{P}/lib64/xorg/modules/extensions/libglxserver_nvidia.so"] == \
        f"libglxserver_nvidia.so.{VERSION}"
    # Every type ships in full but the link to nvidia-installer, which no profile ships.
    shipped = {e.type for e in package.files(Profile.FULL) if e.is_symlink}
    assert shipped == link_types
    assert f"{P}/bin/nvidia-uninstall" not in links and f"{P}/bin/nvidia-dbgdump" in links


def test_a_link_to_nothing_in_the_bundle_is_refused_before_writing() -> None:
    """The build's own last check, for a link the layout would get wrong."""
    lib, gbm = f"{P}/lib64/libnvidia-allocator.so.1", f"{P}/lib64/gbm/nvidia-drm_gbm.so"
    with pytest.raises(CoreosGpuError) as info:
        check_links([(lib, None), (gbm, "libnvidia-allocator.so.1")])
    assert info.value.code is ExitCode.BUNDLE
    assert info.value.message == f"{gbm}: a symlink to libnvidia-allocator.so.1, which is " \
        "not in the bundle"
    check_links([(lib, None), (gbm, "../libnvidia-allocator.so.1")])


def test_inspect_refuses_the_dangling_gbm_link_of_issue_31(
        ko_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:  # type: ignore[no-untyped-def]
    """A bundle whole in every other way (sums, MANIFEST.json, node/contents agree), written
    the way the build did before links were aimed as nvidia-installer aims them: the GBM
    link kept the manifest's bare target in lib64/gbm/, the systemd unit link the manifest's
    word. inspect names each, one line each, and nothing else."""
    package = make_package(tmp_path / "driver", extra=EVERY_LINK)
    monkeypatch.setattr("coreos_gpu.bundle.link_target", lambda entry, version: entry.target)
    monkeypatch.setattr("coreos_gpu.bundle.check_links", lambda members: None)
    bundle = assemble(package, [module_set(ko_dir, KERNEL)], tmp_path / "old.tar.gz",
                      profile=Profile.FULL)
    link = f"{P}/lib64/gbm/nvidia-drm_gbm.so"
    unit = f"{P}/etc/systemd/system/systemd-suspend.service.requires/nvidia-suspend.service"
    problems = (
        # The manifest's word, which nvidia-installer replaces: here, the link itself.
        f"{unit}: a symlink to nvidia-suspend.service, which leads back to it (a symlink "
        "loop)",
        f"{link}: a symlink to libnvidia-allocator.so.1, which is not in the archive")
    assert inspect_bundle(bundle.path).problems == problems
    result = cli("inspect", bundle.path, "--json")
    assert result.code == ExitCode.BUNDLE == 12
    assert tuple(json.loads(result.stdout)["problems"]) == problems


def test_full_profile_adds_32bit_libs_subpaths_and_docs(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    bundle = assemble(package, [module_set(ko_dir, KERNEL)], tmp_path / "full.tar.gz",
                      profile=Profile.FULL)
    found = members(bundle.path)
    assert found[f"{P}/lib32/libcuda.so.{VERSION}"].isreg()
    assert found[f"{P}/lib32/libcuda.so.1"].linkname == f"libcuda.so.{VERSION}"
    assert found[f"{P}/lib64/vdpau/libvdpau_nvidia.so.{VERSION}"].isreg()
    assert found[f"{P}/share/doc/NVIDIA_GLX-1.0/NVIDIA_Changelog"].isreg()
    assert bundle.manifest["profile"] == "full"


def test_node_files_go_to_the_top_and_into_node(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    node = tmp_path / "resources-node"
    (node / "dropins").mkdir(parents=True)
    (node / "install_nvidia.sh").write_text("#!/bin/sh\nexit 0\n")
    (node / "startup.sh").write_text("#!/bin/sh\n")
    (node / "dropins/10-nvidia.conf").write_text("[Unit]\nAfter=nvidia.service\n")
    (node / "__init__.py").write_text("")  # package plumbing, not a node file
    bundle = assemble(package, [module_set(ko_dir, KERNEL)], tmp_path / "n.tar.gz",
                      node_files=node)
    found = members(bundle.path)
    assert {n: m.mode for n, m in found.items() if n.split("/")[0] != "payload" and m.isreg()
            } == {"install_nvidia.sh": 0o755, "nvidia.service": 0o644, "startup.sh": 0o755,
                  "node/dropins/10-nvidia.conf": 0o644, "node/agent-dropin.conf": 0o644,
                  "node/bundle.env": 0o644, "node/module-deps": 0o644, "node/contents": 0o644,
                  "MANIFEST.json": 0o644, "SHA256SUMS": 0o644}
    report = inspect_bundle(bundle.path)
    assert report.ok, report.problems
    assert [(p.part, p.files) for p in report.parts] == [
        ("libraries", 5), ("binaries", 2), ("firmware", 1), (f"modules {KERNEL}", 3),
        ("node files", 8), ("other", 1), ("metadata", 2)]


def test_the_packaged_node_files_are_carried(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    bundle = assemble_bundle(
        package=package, module_sets=[module_set(ko_dir, KERNEL)], profile=Profile.COMPUTE,
        compression=Compression.GZIP, output=tmp_path / "d.tar.gz", releases=[RELEASE],
        node=NodeSettings(()), tool_version="0.1.0")
    node = default_node_files()
    packaged = set()
    if node.is_dir():
        stack = [(node, "")]
        while stack:
            folder, prefix = stack.pop()
            for child in folder.iterdir():
                if child.name.startswith((".", "__")):
                    continue
                if child.is_dir():
                    stack.append((child, f"{prefix}{child.name}/"))
                else:
                    packaged.add(f"{prefix}{child.name}")
    carried = {f["path"] for f in bundle.manifest["files"] if part_of(f["path"]) == "node files"}
    generated = {"nvidia.service", "agent-dropin.conf", "bundle.env", "module-deps", "contents"}
    assert {n.removeprefix("node/") for n in carried} == packaged | generated
    assert {"install_nvidia.sh", "startup.sh", "lib.sh", "nvidia-doctor"} <= packaged


def test_node_contents_describes_every_member(bundle: Bundle) -> None:
    """node/contents (what install_nvidia.sh checks the extracted bundle and its copy
    against) lists every member but the folders, with its mode and kind, and each link's
    target, exactly as the archive holds them."""
    found = members(bundle.path)
    with tarfile.open(bundle.path) as tar:
        stream = tar.extractfile("node/contents")
        assert stream is not None
        lines = stream.read().decode().splitlines()
    assert lines == sorted(lines, key=lambda line: line.split(" ")[2])
    described = {}
    for line in lines:
        mode, kind, path, *target = line.split(" ")
        described[path] = (int(mode, 8), kind, target)
    assert described == {
        n: (m.mode, "link" if m.issym() else "file", [m.linkname] if m.issym() else [])
        for n, m in found.items() if not m.isdir()}
    assert described[f"{P}/lib64/libcuda.so.1"] == (0o777, "link", [f"libcuda.so.{VERSION}"])


def test_manifest_json(bundle: Bundle, package: DriverPackage) -> None:
    with tarfile.open(bundle.path) as tar:
        stream = tar.extractfile("MANIFEST.json")
        assert stream is not None
        manifest = json.loads(stream.read())
    assert manifest == json.loads(json.dumps(bundle.manifest))
    assert list(manifest)[:9] == ["format", "tool_version", "os", "arch", "driver_version",
                                  "flavour", "profile", "kernel_releases", "releases"]
    assert (manifest["tool_version"], manifest["os"], manifest["arch"],
            manifest["driver_version"], manifest["flavour"], manifest["profile"]) == (
        "0.1.0", "flatcar", "x86_64", VERSION, "proprietary", "compute")
    assert manifest["kernel_releases"] == [KERNEL]
    assert manifest["releases"] == [RELEASE.to_json()]
    assert manifest["agent_units"] == ["dcos-mesos-slave.service"]
    assert manifest["on_driver_failure"] == "start-without-gpus"
    assert manifest["inputs"] == [
        {"what": "driver", "source": RUN_URL, "sha256": "1" * 64},
        {"what": "flatcar stable 3975.2.2 image", "source": RELEASE.image_url,
         "sha256": "2" * 64}]
    assert [m["name"] for m in manifest["modules"][KERNEL]] == list(MODULES)
    assert manifest["modules"][KERNEL][2]["depends"] == ["nvidia"]
    paths = [f["path"] for f in manifest["files"] if part_of(f["path"]) != "node files"]
    assert paths == sorted(COMPUTE_FILES | set(COMPUTE_LINKS) | {
        f"{P}/modules/{KERNEL}/{name}.ko" for name in MODULES})
    files = {f.pop("path"): f for f in manifest["files"]}
    smi = files[f"{P}/bin/nvidia-smi"]
    source = package.root / "nvidia-smi"
    assert smi == {"type": "file", "sha256": sha256_of(source),
                   "size": source.stat().st_size, "mode": "0755"}
    assert files[f"{P}/lib64/libcuda.so"] == {"type": "symlink", "target": "libcuda.so.1",
                                              "mode": "0777"}


@pytest.mark.parametrize("compression", list(Compression))
def test_sha256sums_verify_with_tar_and_sha256sum(
        package: DriverPackage, ko_dir: Path, tmp_path: Path, compression: Compression) -> None:
    if shutil.which("zstd") is None and compression is Compression.ZSTD:
        pytest.skip("GNU tar needs the zstd command for .tar.zst")
    bundle = assemble(package, [module_set(ko_dir, KERNEL)], tmp_path / "nvidia.archive",
                      compression=compression)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "xf", bundle.path, "-C", out], check=True)
    check = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=out,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = [line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()]
    assert listed == sorted(listed)
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*")
               if p.is_file() and not p.is_symlink()}
    assert set(listed) == on_disk - {"SHA256SUMS"}
    assert os.readlink(out / P / "lib64/libcuda.so.1") == f"libcuda.so.{VERSION}"


def test_two_kernels_two_module_folders_one_userspace(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    # Two releases share KERNEL, a third runs CLOUD.
    sibling = ReleaseInputs(**{**RELEASE.to_json(), "version": "3975.2.1"})
    bundle = assemble(package, [module_set(ko_dir, KERNEL), module_set(ko_dir, CLOUD)],
                      tmp_path / "two.tar.gz", releases=(RELEASE, CLOUD_RELEASE, sibling))
    found = members(bundle.path)
    for kernel in (KERNEL, CLOUD):
        assert {n for n in found if n.startswith(f"{P}/modules/{kernel}/")} == {
            f"{P}/modules/{kernel}/{name}.ko" for name in MODULES}
    assert [n for n in found if n.endswith(f"libcuda.so.{VERSION}")] == [
        f"{P}/lib64/libcuda.so.{VERSION}"]
    assert bundle.manifest["kernel_releases"] == [KERNEL, CLOUD]
    assert [r["version"] for r in bundle.manifest["releases"]] == [
        "3975.2.1", "3975.2.2", "4081.2.0"]
    report = inspect_bundle(bundle.path)
    assert report.ok, report.problems
    assert [p.part for p in report.parts] == [
        "libraries", "binaries", "firmware", f"modules {KERNEL}", f"modules {CLOUD}",
        "node files", "other", "metadata"]


# --- reproducibility and atomic output -----------------------------------------------------

@pytest.mark.parametrize("compression", list(Compression))
def test_same_inputs_same_bytes(package: DriverPackage, ko_dir: Path, tmp_path: Path,
                                compression: Compression,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    sets = [module_set(ko_dir, KERNEL), module_set(ko_dir, CLOUD)]
    first = assemble(package, sets, tmp_path / "a", compression=compression,
                     releases=(RELEASE, CLOUD_RELEASE))
    # The files' own mtimes and the order of the inputs must not matter.
    for path in package.root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_700_000_000, 1_700_000_000))
    second = assemble(package, sets[::-1], tmp_path / "b", compression=compression,
                      releases=(CLOUD_RELEASE, RELEASE))
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256 == sha256_of(first.path)
    assert first.size == first.path.stat().st_size
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    third = assemble(package, sets, tmp_path / "c", compression=compression,
                     releases=(RELEASE, CLOUD_RELEASE))
    assert third.sha256 != first.sha256
    assert {m.mtime for m in members(third.path).values()} == {1_700_000_000}


def test_a_malformed_source_date_epoch_is_refused(
        package: DriverPackage, ko_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(CoreosGpuError, match="SOURCE_DATE_EPOCH") as error:
        assemble(package, [module_set(ko_dir, KERNEL)], tmp_path / "x.tar.gz")
    assert error.value.code is ExitCode.CONFIG
    assert not (tmp_path / "x.tar.gz").exists()


def test_gzip_header_has_no_time_and_no_name(bundle: Bundle) -> None:
    head = bundle.path.read_bytes()[:10]
    assert head[:3] == b"\x1f\x8b\x08"
    assert head[3] == 0  # FLG: no FNAME, no FCOMMENT, no FEXTRA
    assert head[4:8] == b"\0\0\0\0"  # MTIME
    gzip.decompress(bundle.path.read_bytes())  # and it is one valid stream


def test_a_failure_midway_leaves_no_file(package: DriverPackage, ko_dir: Path,
                                         tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "out" / "nvidia.tar.gz"
    output.parent.mkdir()
    sets = [module_set(ko_dir, KERNEL)]
    (package.root / "nvidia-smi").unlink()
    with pytest.raises(CoreosGpuError) as error:
        assemble(package, sets, output)
    assert error.value.code is ExitCode.BUNDLE
    assert "nvidia-smi" in error.value.message
    assert sorted(p.name for p in output.parent.iterdir()) == ["no-node-files"]


def test_ctrl_c_keeps_the_previous_archive(bundle: Bundle, package: DriverPackage,
                                           ko_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    before = bundle.path.read_bytes()
    real = ArchiveWriter.add_file
    calls = iter(range(100))

    def interrupted(self: ArchiveWriter, name: str, source: Path, *, mode: int) -> object:
        if next(calls) == 3:
            raise KeyboardInterrupt
        return real(self, name, source, mode=mode)

    monkeypatch.setattr(ArchiveWriter, "add_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assemble(package, [module_set(ko_dir, KERNEL)], bundle.path)
    assert bundle.path.read_bytes() == before
    assert sorted(p.name for p in bundle.path.parent.iterdir() if p.name.startswith(".")) == []


def test_a_module_that_changed_in_the_cache_is_refused(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    good = module_set(ko_dir, KERNEL)
    lying = KernelModule(**{**good.modules[0].__dict__, "sha256": "5" * 64})
    with pytest.raises(CoreosGpuError, match="changed after it was built"):
        assemble(package, [ModuleSet(**{**good.__dict__, "modules": (lying,)})],
                 tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()


@pytest.mark.parametrize(
    ("sets", "releases", "message"),
    [
        ((KERNEL,), (RELEASE, CLOUD_RELEASE), "no modules were built"),
        ((KERNEL, CLOUD), (RELEASE,), "belong to no release"),
        ((KERNEL, KERNEL), (RELEASE,), "two module sets for one kernel"),
        ((), (RELEASE,), "nothing to bundle"),
    ],
)
def test_inconsistent_inputs_are_refused(
        package: DriverPackage, ko_dir: Path, tmp_path: Path, sets: tuple[str, ...],
        releases: tuple[ReleaseInputs, ...], message: str) -> None:
    with pytest.raises(CoreosGpuError, match=message) as error:
        assemble(package, [module_set(ko_dir, k) for k in sets], tmp_path / "x",
                 releases=releases)
    assert error.value.code is ExitCode.BUNDLE


def test_an_empty_module_set_is_refused(package: DriverPackage, ko_dir: Path,
                                        tmp_path: Path) -> None:
    empty = ModuleSet(**{**module_set(ko_dir, KERNEL).__dict__, "modules": ()})
    with pytest.raises(CoreosGpuError, match=f"no kernel modules were built for kernel {KERNEL}"):
        assemble(package, [empty], tmp_path / "x")


def test_a_module_for_another_kernel_is_refused(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    good = module_set(ko_dir, KERNEL)
    wrong = KernelModule(**{**good.modules[0].__dict__, "vermagic": f"{CLOUD} SMP "})
    with pytest.raises(CoreosGpuError, match=f"built for kernel {CLOUD}"):
        assemble(package, [ModuleSet(**{**good.__dict__, "modules": (wrong,)})],
                 tmp_path / "x")


# --- inspect --------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", list(Compression))
def test_inspect_a_whole_bundle(package: DriverPackage, ko_dir: Path, tmp_path: Path,
                                compression: Compression) -> None:
    # A name that says nothing: the compression is recognised by its magic bytes.
    bundle = assemble(package, [module_set(ko_dir, KERNEL)], tmp_path / "bundle.bin",
                      compression=compression)
    report = inspect_bundle(bundle.path)
    assert report.ok, report.problems
    assert (report.compression, report.sha256, report.size) == (
        compression, bundle.sha256, bundle.size)
    assert (report.driver_version, report.flavour, report.profile, report.os, report.arch,
            report.tool_version) == (VERSION, "proprietary", "compute", "flatcar", "x86_64",
                                     "0.1.0")
    assert report.releases == (RELEASE,)
    assert report.kernel_releases == (KERNEL,)
    assert report.agent_units == ("dcos-mesos-slave.service",)
    assert report.on_driver_failure == "start-without-gpus"
    assert [(m.path.rsplit("/", 1)[1], m.kernel_release, m.version) for m in report.modules
            ] == [(f"{name}.ko", KERNEL, VERSION) for name in MODULES]
    assert report.modules[2].depends == ("nvidia",)
    parts = {p.part: p for p in report.parts}
    assert parts["binaries"].files == 2
    assert parts["libraries"].files == 5  # 2 files, 3 symlinks
    assert parts["firmware"].size == (package.root / "firmware/gsp_ga10x.bin").stat().st_size
    assert parts[f"modules {KERNEL}"].size == sum(
        m.size for m in module_set(ko_dir, KERNEL).modules)
    data = report.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is True and data["problems"] == []
    assert dict(report.summary())["driver"] == f"{VERSION} (proprietary)"


def test_inspect_finds_a_changed_byte(bundle: Bundle, tmp_path: Path) -> None:
    target = f"{P}/lib64/libcuda.so.{VERSION}"

    def flip(member: tarfile.TarInfo, data: bytes) -> bytes:
        return bytes([data[0] ^ 1]) + data[1:] if member.name == target else data

    report = inspect_bundle(rewrite(bundle.path, tmp_path / "bad.tar.gz", flip))
    assert not report.ok
    assert len(report.problems) == 2, report.problems
    assert report.problems[0].startswith(f"{target}: sha256 ")
    assert "does not match SHA256SUMS" in report.problems[0]
    assert report.problems[1].startswith(f"{target}: sha256 is ")
    assert "MANIFEST.json says" in report.problems[1]


def test_inspect_refuses_a_bundle_for_another_machine(bundle: Bundle, tmp_path: Path) -> None:
    """MANIFEST.json's arch; a manifest of format 1 written before it had one is x86_64."""
    def edit(arch: str | None) -> Callable[[tarfile.TarInfo, bytes], bytes]:
        def change(member: tarfile.TarInfo, data: bytes) -> bytes:
            if member.name != "MANIFEST.json":
                return data
            manifest = json.loads(data)
            if arch is None:
                del manifest["arch"]
            else:
                manifest["arch"] = arch
            return json.dumps(manifest).encode()
        return change

    other = inspect_bundle(rewrite(bundle.path, tmp_path / "arm.tar.gz", edit("aarch64")))
    assert "MANIFEST.json: arch is 'aarch64'; coreos-gpu builds x86_64" in other.problems
    older = inspect_bundle(rewrite(bundle.path, tmp_path / "old.tar.gz", edit(None)))
    assert older.arch == "x86_64"
    assert not [p for p in older.problems if "arch" in p], older.problems


def test_inspect_finds_missing_and_extra_files(bundle: Bundle, tmp_path: Path) -> None:
    gone = f"{P}/bin/nvidia-smi"
    bad = rewrite(bundle.path, tmp_path / "bad.tar.gz",
                  lambda m, data: None if m.name == gone else data,
                  extra={f"{P}/bin/evil": b"#!/bin/sh\n"})
    assert set(inspect_bundle(bad).problems) == {
        f"{gone}: listed in SHA256SUMS, missing from the archive",
        f"{gone}: listed in MANIFEST.json, missing from the archive",
        f"{P}/bin/evil: in the archive, not in SHA256SUMS",
        f"{P}/bin/evil: in the archive, not in MANIFEST.json"}


def test_inspect_finds_a_module_for_another_kernel(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    # The cache claims KERNEL, but the .ko files were built for CLOUD.
    bundle = assemble(package, [module_set(ko_dir, KERNEL, built_for=CLOUD)],
                      tmp_path / "x.tar.gz")
    report = inspect_bundle(bundle.path)
    assert not report.ok
    assert [p.split(":")[0] for p in report.problems] == [
        f"{P}/modules/{KERNEL}/{name}.ko" for name in MODULES]
    assert f"built for kernel '{CLOUD}'" in report.problems[0]
    assert f"folder of {KERNEL}" in report.problems[0]


def test_inspect_finds_a_module_of_another_driver(bundle: Bundle, ko_dir: Path,
                                                  tmp_path: Path) -> None:
    other = make_ko(ko_dir, "nvidia", KERNEL, version="550.163.01").read_bytes()
    name = f"{P}/modules/{KERNEL}/nvidia.ko"
    bad = rewrite(bundle.path, tmp_path / "bad.tar.gz",
                  lambda m, data: other if m.name == name else data)
    problems = inspect_bundle(bad).problems
    assert f"{name}: nvidia.ko is version 550.163.01, not driver {VERSION}" in problems


def _edit_contents(edit: Callable[[str], str]) -> Callable[[tarfile.TarInfo, bytes], bytes]:
    return lambda m, data: edit(data.decode()).encode() if m.name == "node/contents" else data


SMI = f"{P}/bin/nvidia-smi"


@pytest.mark.parametrize(
    ("edit", "problems"),
    [
        (lambda text: text.replace(f"0755 file {SMI}\n", f"0666 file {SMI}\n"),
         [f"node/contents: {SMI}: mode 0666 is not a safe file mode (group or world could "
          "write it)", f"{SMI}: node/contents says mode 0666, the bundle has 0755"]),
        (lambda text: text.replace(f"0755 file {SMI}\n", ""),
         [f"{SMI}: not in node/contents"]),
        (lambda text: text + f"0777 link {P}/lib64/x ../../../README\n",
         [f"node/contents: {P}/lib64/x: links to ../../../README, outside {P}/",
          f"{P}/lib64/x: in node/contents, not in the bundle"]),
        (lambda text: text.replace(f"link {P}/lib64/libcuda.so libcuda.so.1",
                                   f"link {P}/lib64/libcuda.so /usr/lib/libcuda.so.1"),
         [f"node/contents: {P}/lib64/libcuda.so: links to the absolute path "
          "/usr/lib/libcuda.so.1", f"{P}/lib64/libcuda.so: node/contents says a link to "
          "/usr/lib/libcuda.so.1, the bundle has a link to libcuda.so.1"]),
        (lambda text: text + "0644 file payload/1.2.3/x\n0644 file README\n"
                             f"0644 file {P}/node/x\n0644 file {P}/lib64/libcuda.so/x\n",
         [f"node/contents: payload/1.2.3/x: outside {P}",
          "node/contents: README: not part of a coreos-gpu bundle",
          f"node/contents: {P}/node/x: would land on the driver folder's own node",
          f"node/contents: {P}/lib64/libcuda.so/x: lies beneath the link {P}/lib64/libcuda.so",
          *(f"{path}: in node/contents, not in the bundle" for path in (
              "payload/1.2.3/x", "README", f"{P}/node/x", f"{P}/lib64/libcuda.so/x"))]),
        (lambda text: "0644 file\n" + text, ["node/contents line 1 is malformed"]),
        # CRLF: awk, as the node reads it, keeps the \r in the path: another path.
        (lambda text: text.replace(f"{SMI}\n", f"{SMI}\r\n"),
         [f"{SMI}: not in node/contents", f"{SMI}\r: in node/contents, not in the bundle"]),
    ],
    ids=["writable-mode", "missing-line", "hostile-link", "absolute-link", "outside-parts",
         "malformed", "crlf"],
)
def test_inspect_checks_node_contents_as_the_node_does(
        bundle: Bundle, tmp_path: Path, edit: Callable[[str], str], problems: list[str]) -> None:
    """node/contents is what install_nvidia.sh trusts: inspect applies the node's own rules
    to it, and holds it against MANIFEST.json (issue 28)."""
    found = inspect_bundle(rewrite(bundle.path, tmp_path / "bad.tar.gz",
                                   _edit_contents(edit))).problems
    assert set(problems) <= set(found), found
    # Beside those, only the sums and MANIFEST.json catch the edit, of node/contents itself.
    assert all(p.startswith(("node/contents: sha256 ", "node/contents: size "))
               for p in set(found) - set(problems)), found


def test_inspect_needs_node_contents(bundle: Bundle, tmp_path: Path) -> None:
    bad = rewrite(bundle.path, tmp_path / "bad.tar.gz",
                  lambda m, data: None if m.name == "node/contents" else data)
    assert "node/contents is missing" in inspect_bundle(bad).problems


def test_inspect_finds_missing_metadata(bundle: Bundle, tmp_path: Path) -> None:
    bad = rewrite(bundle.path, tmp_path / "bad.tar.gz",
                  lambda m, data: None if m.name in ("MANIFEST.json", "SHA256SUMS") else data)
    report = inspect_bundle(bad)
    assert "SHA256SUMS is missing" in report.problems
    assert "MANIFEST.json is missing or not a JSON object" in report.problems
    assert report.modules  # what can still be read is still reported


@pytest.fixture
def not_bundles(bundle: Bundle, tmp_path: Path) -> Iterator[Path]:
    data = bundle.path.read_bytes()
    (tmp_path / "text").write_text("hello\n")
    (tmp_path / "truncated.tar.gz").write_bytes(data[:len(data) // 2])
    (tmp_path / "gzip-but-not-tar.gz").write_bytes(gzip.compress(b"x" * 5000))
    yield tmp_path


@pytest.mark.parametrize(("name", "message"), [
    ("text", "is not a gzip, xz or zstd compressed archive"),
    ("truncated.tar.gz", "damaged or truncated"),
    ("gzip-but-not-tar.gz", "damaged or truncated"),
    ("missing.tar.gz", "cannot read"),
])
def test_inspect_refuses_what_is_no_archive(not_bundles: Path, name: str, message: str) -> None:
    with pytest.raises(CoreosGpuError, match=message) as error:
        inspect_bundle(not_bundles / name)
    assert error.value.code is ExitCode.BUNDLE


def test_inspect_hashes_match_hashlib(bundle: Bundle) -> None:
    assert inspect_bundle(bundle.path).sha256 == hashlib.sha256(
        bundle.path.read_bytes()).hexdigest()


# --- the repository a bundle's nodes trust ---------------------------------------------------
def test_a_bundle_carries_its_repository_and_inspect_checks_the_key(
        package: DriverPackage, ko_dir: Path, tmp_path: Path) -> None:
    """build --repository URL --repository-key PUB.pem: node/repository.pub is that key as
    `openssl dgst -verify` reads it, bundle.env and MANIFEST.json name the repository and the
    key's fingerprint, and inspect shows them and refuses a key that is not the named one."""
    pair = write_key_pair(tmp_path / "keys/repo")
    trust = load_trust("https://repo.example/gpu/", str(pair.public))
    assert trust is not None
    empty = tmp_path / "no-node-files"
    empty.mkdir()
    bundle = assemble_bundle(
        package=package, module_sets=[module_set(ko_dir, KERNEL)], profile=Profile.COMPUTE,
        compression=Compression.GZIP, output=tmp_path / "repo.tar.gz", releases=[RELEASE],
        node=NodeSettings(("dcos-mesos-slave.service",), repository=trust),
        tool_version="0.1.0", node_files=empty)
    with tarfile.open(bundle.path) as tar:
        def read(name: str) -> bytes:
            stream = tar.extractfile(name)
            assert stream is not None
            return stream.read()
        assert read("node/repository.pub") == pair.public.read_bytes()
        env = read("node/bundle.env").decode()
    assert "REPOSITORY_URL=https://repo.example/gpu\n" in env
    assert f"REPOSITORY_KEY_FINGERPRINT={pair.fingerprint}\n" in env
    assert bundle.manifest["repository"] == {"url": "https://repo.example/gpu",
                                             "key_fingerprint": pair.fingerprint}
    report = inspect_bundle(bundle.path)
    assert report.ok, report.problems
    assert report.to_json()["repository"] == bundle.manifest["repository"]
    assert ("repository", f"https://repo.example/gpu (key {pair.fingerprint})") in (
        report.summary())
    # Another key in its place: inspect names both.
    other = write_key_pair(tmp_path / "keys/other")
    swapped = rewrite(bundle.path, tmp_path / "swapped.tar.gz", lambda m, data: (
        other.public.read_bytes() if m.name == "node/repository.pub" else data))
    problems = inspect_bundle(swapped).problems
    assert (f"node/repository.pub is key {other.fingerprint}, not {pair.fingerprint} as "
            "MANIFEST.json says") in problems, problems


def test_a_bundle_without_a_repository(bundle: Bundle) -> None:
    assert "node/repository.pub" not in members(bundle.path)
    assert bundle.manifest["repository"] is None
    report = inspect_bundle(bundle.path)
    assert report.ok and report.repository_url == "" and report.to_json()["repository"] is None
    assert ("repository", "none") in report.summary()


# --- persistence: how the nodes keep their GPUs initialised -----------------------------------
@pytest.mark.parametrize("persistence", list(Persistence))
def test_bundle_env_says_the_persistence_and_daemon_brings_its_unit(
        ko_dir: Path, tmp_path: Path, persistence: Persistence) -> None:
    package = make_package(tmp_path / "driver", extra=PERSISTENCED)
    empty = tmp_path / "no-node-files"
    empty.mkdir()
    bundle = assemble_bundle(
        package=package, module_sets=[module_set(ko_dir, KERNEL)], profile=Profile.COMPUTE,
        compression=Compression.GZIP, output=tmp_path / "p.tar.gz", releases=[RELEASE],
        node=NodeSettings(("my-agent.service", "other-agent.service"),
                          persistence=persistence),
        tool_version="0.1.0", node_files=empty)
    unit = "node/nvidia-persistenced.service"
    with tarfile.open(bundle.path) as tar:
        def read(name: str) -> str:
            stream = tar.extractfile(name)
            assert stream is not None
            return stream.read().decode()
        assert f"\nPERSISTENCE={persistence.value}\n" in read("node/bundle.env")
        names = tar.getnames()
        text = read(unit) if unit in names else ""
    assert f"{P}/bin/nvidia-persistenced" in names
    if persistence is not Persistence.DAEMON:
        assert unit not in names
        return
    lines = text.splitlines()
    # install_nvidia.sh knows its own units by the first line.
    assert lines[0].startswith(f"# Written by coreos-gpu for NVIDIA driver {VERSION}; ")
    for line in ("Requires=nvidia.service", "After=nvidia.service",
                 "Before=my-agent.service other-agent.service",
                 "ConditionPathExists=/dev/nvidiactl", "Type=forking",
                 "PIDFile=/run/nvidia-persistenced/nvidia-persistenced.pid",
                 "ExecStart=/opt/nvidia/current/bin/nvidia-persistenced",
                 "ExecStopPost=/bin/rm -rf /run/nvidia-persistenced",
                 "WantedBy=multi-user.target"):
        assert line in lines, line
    assert not [line for line in lines if line.startswith(("User=", "ExecStart=")) and
                "--user" in line]
    assert not re.search(r"@[A-Z_]+@", text)
    assert inspect_bundle(bundle.path).ok


@pytest.mark.parametrize("profile", list(Profile))
def test_daemon_without_the_daemon_is_refused(package: DriverPackage, ko_dir: Path,
                                              tmp_path: Path, profile: Profile) -> None:
    """The package has no nvidia-persistenced: persistence = daemon would start a unit whose
    ExecStart= is missing on every node."""
    with pytest.raises(CoreosGpuError) as error:
        assemble_bundle(
            package=package, module_sets=[module_set(ko_dir, KERNEL)], profile=profile,
            compression=Compression.GZIP, output=tmp_path / "d.tar.gz", releases=[RELEASE],
            node=NodeSettings(("dcos-mesos-slave.service",), persistence=Persistence.DAEMON),
            tool_version="0.1.0")
    assert error.value.code is ExitCode.CONFIG
    assert str(error.value) == (
        f"persistence = daemon runs bin/nvidia-persistenced, which the {profile.value} profile "
        f"of driver {VERSION} does not ship")
    assert error.value.hint == ('set persistence = "legacy" (nvidia-smi -pm 1 at boot) or '
                                '"off" (--persistence), or use a driver .run that has '
                                "nvidia-persistenced")
    assert not (tmp_path / "d.tar.gz").exists()
