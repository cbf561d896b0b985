"""The test-input builder's own contract: mirror derivation, cache, manifest lines, the .run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testinputs import cache
from testinputs.debian import (
    AptSource,
    deb_file_glob,
    debian_mirror,
    find_debian_source,
    parse_one_line_sources,
    render_private_sources,
)
from testinputs.nvidia_branches import R470
from testinputs.nvidia_run import (
    PACKAGE_DIR,
    VERSION,
    check_tree,
    render_manifest_line,
    render_run_header,
)

REPO = Path(__file__).resolve().parent.parent
MIRROR = "http://mirror.example/debian"
DEB822 = f"""\
# the machine's main archive
Types: deb
URIs: {MIRROR}/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
ONE_LINE = f"""\
# deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb-src {MIRROR} bookworm main
deb http://security.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/etc/apt/keyrings/debian.gpg] {MIRROR}/ bookworm main contrib
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_mirror_from_deb822(tmp_path: Path) -> None:
    write(tmp_path / "sources.list.d/other.sources", "Types: deb\nURIs: http://x.example/repo\n"
          "Suites: nodistro\nComponents: main\n")
    write(tmp_path / "sources.list.d/debian.sources", DEB822)
    assert debian_mirror(tmp_path) == MIRROR
    source = find_debian_source(tmp_path)
    assert source.signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"


def test_mirror_from_one_line_sources_list(tmp_path: Path) -> None:
    write(tmp_path / "sources.list", ONE_LINE)
    assert debian_mirror(tmp_path) == MIRROR
    assert find_debian_source(tmp_path).signed_by == "/etc/apt/keyrings/debian.gpg"


def test_disabled_deb822_stanza_is_ignored(tmp_path: Path) -> None:
    write(tmp_path / "sources.list.d/debian.sources", "Enabled: no\n" + DEB822)
    with pytest.raises(RuntimeError, match="no apt source for Debian bookworm"):
        debian_mirror(tmp_path)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("deb http://m.example/debian bookworm main",
         AptSource(("deb",), ("http://m.example/debian",), ("bookworm",), ("main",))),
        ("deb [ arch=amd64,i386 ] http://m.example/debian/ bookworm main contrib # note",
         AptSource(("deb",), ("http://m.example/debian",), ("bookworm",), ("main", "contrib"))),
        ("#deb http://m.example/debian bookworm main", None),
        ("deb http://m.example/debian", None),
    ],
)
def test_parse_one_line_sources(line: str, expected: AptSource | None) -> None:
    assert parse_one_line_sources(line) == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux-image-6.1.0-50-amd64=6.1.176-1", "linux-image-6.1.0-50-amd64_6.1.176-1_*.deb"),
        # apt escapes an epoch's colon in lower case: %3a, not quote()'s %3A.
        ("busybox-static=1:1.35.0-4+deb12u1+b1", "busybox-static_1%3a1.35.0-4+deb12u1+b1_*.deb"),
        ("libcuda1:i386=535.261.03-1", "libcuda1_535.261.03-1_i386.deb"),
    ],
)
def test_deb_file_glob_matches_apts_file_names(spec: str, expected: str) -> None:
    assert deb_file_glob(spec) == expected


def test_private_sources_have_every_component() -> None:
    source = AptSource(("deb",), (MIRROR,), ("bookworm",), ("main",), "/k.gpg")
    assert render_private_sources(source) == (
        f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib non-free non-free-firmware\nSigned-By: /k.gpg\n"
    )


@pytest.mark.parametrize(
    ("file", "mode", "type_", "target", "expected"),
    [
        ("kernel/nvidia/nv.c", 0o644, "KERNEL_MODULE_SRC", None,
         "kernel/nvidia/nv.c 0644 KERNEL_MODULE_SRC INHERIT_PATH_DEPTH:1 MODULE:m"),
        ("libcuda.so.1", 0, "CUDA_SYMLINK", "libcuda.so.5",
         "libcuda.so.1 0000 CUDA_SYMLINK NATIVE / libcuda.so.5 MODULE:m"),
        ("32/libcuda.so.5", 0o755, "CUDA_LIB", None,
         "32/libcuda.so.5 0755 CUDA_LIB COMPAT32 / MODULE:m"),
        ("libnvidia-ml.so.5", 0o755, "UTILITY_LIB", None,
         "libnvidia-ml.so.5 0755 UTILITY_LIB NATIVE MODULE:m"),
        ("libnvidia-ml.so.1", 0, "UTILITY_LIB_SYMLINK", "libnvidia-ml.so.5",
         "libnvidia-ml.so.1 0000 UTILITY_LIB_SYMLINK NATIVE libnvidia-ml.so.5 MODULE:m"),
        ("nvidia-smi", 0o755, "UTILITY_BINARY", None, "nvidia-smi 0755 UTILITY_BINARY MODULE:m"),
        ("nvidia.icd", 0o644, "CUDA_ICD", None, "nvidia.icd 0644 CUDA_ICD MODULE:m"),
    ],
)
def test_manifest_line_follows_type_table(
    file: str, mode: int, type_: str, target: str | None, expected: str
) -> None:
    assert render_manifest_line(file, mode, type_, "m", target=target) == expected


def test_manifest_line_rejects_symlink_without_target() -> None:
    with pytest.raises(ValueError, match="needs target"):
        render_manifest_line("libcuda.so.1", 0, "CUDA_SYMLINK", "compute")


def test_tree_with_a_symlink_is_not_nvidias(tmp_path: Path) -> None:
    (tmp_path / f"libcuda.so.{VERSION}").write_text("elf")
    (tmp_path / "libcuda.so.1").symlink_to(f"libcuda.so.{VERSION}")
    lines = [render_manifest_line(f"libcuda.so.{VERSION}", 0o755, "CUDA_LIB", "compute"),
             render_manifest_line("libcuda.so.1", 0, "CUDA_SYMLINK", "compute",
                                  target=f"libcuda.so.{VERSION}")]
    with pytest.raises(RuntimeError, match=r"manifest/tree mismatch: \['libcuda.so.1'\]"):
        check_tree(tmp_path, lines)


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_run_header_parses(shell: str, tmp_path: Path) -> None:
    header = tmp_path / "header.sh"
    header.write_text(render_run_header(sha256="0" * 64, skip=99))
    subprocess.run([shell, "-n", header], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_run_header_passes_shellcheck(tmp_path: Path) -> None:
    header = tmp_path / "header.sh"
    header.write_text(render_run_header(sha256="0" * 64, skip=99))
    subprocess.run(["shellcheck", "-s", "sh", header], check=True)


def test_build_cached_builds_once_and_drops_old_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COREOS_GPU_TESTINPUTS_CACHE", str(tmp_path))
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "result").write_text("ok")

    old = cache.build_cached("thing", b"recipe 1", build)
    first = cache.build_cached("thing", b"recipe 2", build)
    again = cache.build_cached("thing", b"recipe 2", build)
    assert first == again and len(calls) == 2
    assert (first / "result").read_text() == "ok" and (first / cache.MARKER).exists()
    assert not old.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, "thing.lock"]


def test_build_cached_leaves_nothing_when_build_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COREOS_GPU_TESTINPUTS_CACHE", str(tmp_path))

    def build(out: Path) -> None:
        (out / "half").write_text("")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.build_cached("thing", b"recipe", build)
    assert [p.name for p in tmp_path.iterdir()] == ["thing.lock"]


CONCURRENT_BUILD = """
import sys, time
from testinputs.cache import build_cached

def build(out):
    with open(sys.argv[1], "a") as log:
        log.write("built\\n")
    time.sleep(0.5)
    (out / "result").write_text("ok")

print(build_cached("thing", b"recipe", build))
"""


def test_build_cached_serialises_concurrent_builds(tmp_path: Path) -> None:
    log = tmp_path / "log"
    env = {**os.environ, "COREOS_GPU_TESTINPUTS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, log], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert [proc.returncode for proc in procs] == [0, 0]
    assert len(paths) == 1 and (Path(paths.pop()) / "result").read_text() == "ok"
    assert log.read_text() == "built\n"


# --- the real .run: conftest's nvidia_run fixture builds it on first use, then it is cached --


def sh(shell: str, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shell, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          check=False)


def check_extracted(tree: Path) -> None:
    lines = (tree / ".manifest").read_text().splitlines()
    assert lines[:2] == ["NVIDIA Accelerated Graphics Driver for Linux-x86_64", VERSION]
    for line in lines[8:]:
        file, mode = line.split()[:2]
        # As in NVIDIA's packages, a symlink entry (mode 0000) names a link nvidia-installer
        # makes: the package holds no file for it.
        assert os.path.lexists(tree / file) == (mode != "0000"), line
    assert "libcuda.so.1 0000 CUDA_SYMLINK NATIVE / libcuda.so.535.261.03 MODULE:compute" in lines
    assert [p for p in tree.rglob("*") if p.is_symlink()] == []
    assert (tree / "kernel/Makefile").is_file()
    assert (tree / "kernel/nvidia/nv-kernel.o_binary").is_file()
    assert (tree / "kernel-open/Makefile").is_file()
    assert (tree / "nvidia-smi").stat().st_mode & 0o777 == 0o755


@pytest.mark.slow
@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_run_extracts_with_target(shell: str, nvidia_run: Path, tmp_path: Path) -> None:
    result = sh(shell, nvidia_run, "-x", "--target", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    check_extracted(tmp_path / "out")


@pytest.mark.slow
def test_the_470_run_has_that_branchs_quirks(nvidia_run_470: Path, tmp_path: Path) -> None:
    """The second generation differs from 535 where the real 470 package does."""
    result = sh("sh", nvidia_run_470, "-x", "--target", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    tree = tmp_path / "out"
    lines = (tree / ".manifest").read_text().splitlines()
    # The third (kernel interface) line is the empty variant; nvidia-installer ignores it.
    assert lines[:4] == ["NVIDIA Accelerated Graphics Driver for Linux-x86_64", R470.version,
                         "", "nvidia nvidia-uvm nvidia-modeset nvidia-drm nvidia-peermem"]
    assert not (tree / "kernel-open").exists()
    assert not (tree / "firmware").exists()
    assert (tree / "kernel/nvidia/nv-kernel.o_binary").is_file()
    # uvm.c ends with MODULE_LICENSE and MODULE_INFO: the module declares no version.
    assert "MODULE_VERSION" not in (tree / "kernel/nvidia-uvm/uvm.c").read_text()
    assert "MODULE_VERSION" in (tree / "kernel/nvidia/nv-frontend.c").read_text()
    assert (f"libnvidia-ifr.so.1 0000 NVIFR_LIB_SYMLINK NATIVE libnvidia-ifr.so.{R470.version} "
            "MODULE:nvfbc") in lines
    for line in lines[8:]:
        file, mode = line.split()[:2]
        assert os.path.lexists(tree / file) == (mode != "0000"), line


@pytest.mark.slow
def test_run_extracts_into_cwd_and_target_equals(nvidia_run: Path, tmp_path: Path) -> None:
    result = sh("sh", nvidia_run, "--extract-only", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / PACKAGE_DIR / ".manifest").is_file()
    result = sh("sh", nvidia_run, "-x", f"--target={tmp_path / 'eq'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eq/.manifest").is_file()


@pytest.mark.slow
def test_run_refuses_non_empty_target(nvidia_run: Path, tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("")
    result = sh("sh", nvidia_run, "-x", "--target", tmp_path)
    assert result.returncode != 0
    assert "not empty" in result.stderr


@pytest.mark.slow
def test_run_with_flipped_payload_byte_fails(nvidia_run: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / nvidia_run.name
    shutil.copyfile(nvidia_run, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(corrupt.stat().st_size // 2)  # far past the ~2 KiB header
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = sh("sh", corrupt, "-x", "--target", tmp_path / "out")
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "returncode", "expected"),
    [
        ((), 1, "can only be extracted"),
        (("--bogus",), 1, "unknown option: --bogus"),
        (("--target",), 1, "--target needs a directory"),
        (("--info",), 0, f"Identification: NVIDIA Accelerated Graphics Driver for Linux-x86_64 "
                         f"{VERSION}"),
        (("--help",), 0, "--extract-only"),
        (("--check",), 0, "checksum OK"),
    ],
)
def test_run_options(nvidia_run: Path, args: tuple[str, ...], returncode: int,
                     expected: str) -> None:
    result = sh("sh", nvidia_run, *args)
    assert result.returncode == returncode
    assert expected in result.stdout + result.stderr
