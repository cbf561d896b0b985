"""The modules stage's compiler: the one the kernel was built with, found in the dev root."""

from __future__ import annotations

import dataclasses
import os
import types
from pathlib import Path

import pytest

from coreos_gpu.cache import link_tree
from coreos_gpu.config import Board, Channel, KernelModuleType, OsName, Runtime
from coreos_gpu.devcontainer import DevRoot, resolve_in_root, unpack_image
from coreos_gpu.driver import load_driver
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.kconfig import CompilerWanted, read_kconfig, wanted_compiler
from coreos_gpu.modules import (
    Toolchain,
    build_modules,
    find_command,
    module_set_key,
    resolve_toolchain,
)
from coreos_gpu.release import OsRelease
from coreos_gpu.sandbox import EngineOptions

KERNEL = "6.1.0-50-amd64"
BUILD_DIR = f"/usr/lib/modules/{KERNEL}/build"
RELEASE = OsRelease(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "3975.2.2", None, "")

# .config lines as kernels write them (scripts/kconfig); CONFIG_CC_VERSION_TEXT is the first
# line of `$(CC) --version` (Linux 5.8 and later), CONFIG_GCC_VERSION/CLANG_VERSION 4.18+.
DEBIAN = ('CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"\nCONFIG_CC_IS_GCC=y\n'
          "CONFIG_GCC_VERSION=120200\nCONFIG_CLANG_VERSION=0\nCONFIG_LD_IS_BFD=y\n")
CROSS = ('CONFIG_CC_VERSION_TEXT="x86_64-cros-linux-gnu-gcc (Gentoo Hardened 13.3.1_p20240614 '
           'p17) 13.3.1 20240614"\nCONFIG_CC_IS_GCC=y\nCONFIG_GCC_VERSION=130301\n'
           "CONFIG_LD_IS_BFD=y\n")
UBUNTU = ('CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-12 (Ubuntu 12.3.0-1ubuntu1~22.04) '
          '12.3.0"\nCONFIG_CC_IS_GCC=y\nCONFIG_GCC_VERSION=120300\n')
FEDORA = ('CONFIG_CC_VERSION_TEXT="gcc (GCC) 13.2.1 20231011 (Red Hat 13.2.1-4)"\n'
          "CONFIG_CC_IS_GCC=y\nCONFIG_GCC_VERSION=130201\n")
AS_CC = 'CONFIG_CC_VERSION_TEXT="cc (GCC) 12.2.0"\nCONFIG_CC_IS_GCC=y\nCONFIG_GCC_VERSION=120200\n'
CLANG_LLD = ('CONFIG_CC_VERSION_TEXT="Debian clang version 16.0.6 (15)"\nCONFIG_CC_IS_CLANG=y\n'
             "CONFIG_CLANG_VERSION=160006\nCONFIG_LD_IS_LLD=y\nCONFIG_LLD_VERSION=160006\n")
CLANG_BFD = ('CONFIG_CC_VERSION_TEXT="ClangBuiltLinux clang version 19.1.0 '
             '(https://github.com/llvm/llvm-project.git a4bf6cd7cfb1)"\nCONFIG_CC_IS_CLANG=y\n'
             "CONFIG_CLANG_VERSION=190100\nCONFIG_LD_IS_BFD=y\n")
GCC_4_19 = "CONFIG_CC_IS_GCC=y\nCONFIG_GCC_VERSION=80300\n"  # before CONFIG_CC_VERSION_TEXT
ANCIENT = "CONFIG_X86_64=y\n# CONFIG_KVM is not set\n"  # before CONFIG_GCC_VERSION


@pytest.mark.parametrize(
    ("config", "wanted"),
    [
        (DEBIAN, CompilerWanted("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0", ("gcc-12", "gcc"))),
        (CROSS, CompilerWanted(
            "x86_64-cros-linux-gnu-gcc (Gentoo Hardened 13.3.1_p20240614 p17) 13.3.1 20240614",
            ("x86_64-cros-linux-gnu-gcc", "gcc-13", "gcc"), ("x86_64-cros-linux-gnu-ld",))),
        (UBUNTU, CompilerWanted("x86_64-linux-gnu-gcc-12 (Ubuntu 12.3.0-1ubuntu1~22.04) 12.3.0",
                                ("x86_64-linux-gnu-gcc-12", "gcc-12", "gcc"),
                                ("x86_64-linux-gnu-ld",))),
        (FEDORA, CompilerWanted("gcc (GCC) 13.2.1 20231011 (Red Hat 13.2.1-4)",
                                ("gcc", "gcc-13"))),
        (AS_CC, CompilerWanted("cc (GCC) 12.2.0", ("cc", "gcc-12", "gcc"))),
        # clang prints its version, not the name it was run as.
        (CLANG_LLD, CompilerWanted("Debian clang version 16.0.6 (15)", ("clang-16", "clang"),
                                   ("ld.lld-16", "ld.lld"), ld_required=True)),
        (CLANG_BFD, CompilerWanted("ClangBuiltLinux clang version 19.1.0 (https://github.com/"
                                   "llvm/llvm-project.git a4bf6cd7cfb1)", ("clang-19", "clang"))),
        (GCC_4_19, CompilerWanted("gcc 8", ("gcc-8", "gcc"))),
        (ANCIENT, CompilerWanted("an unknown compiler")),  # kbuild's default, as before
    ],
    ids=["debian", "cross-prefixed", "ubuntu", "fedora", "run-as-cc", "clang-lld", "clang-bfd",
         "gcc-4.19-kernel", "no-compiler-info"],
)
def test_the_kernels_compiler_from_its_config(config: str, wanted: CompilerWanted) -> None:
    assert wanted_compiler(read_kconfig(config)) == wanted


def test_read_kconfig_unquotes_and_skips_unset() -> None:
    assert read_kconfig('CONFIG_A="say \\"hi\\" \\\\ there"\n# CONFIG_B is not set\n'
                        "CONFIG_C=y\nCONFIG_D=0x10\n\n") == {
        "CONFIG_A": 'say "hi" \\ there', "CONFIG_C": "y", "CONFIG_D": "0x10"}


def _root(tmp_path: Path, config: str, commands: dict[str, str]) -> DevRoot:
    """A dev root with a .config and commands in usr/bin: name -> "x" (an executable),
    "-" (a file that is not executable) or "@other" (an absolute link to /usr/bin/other)."""
    tree = tmp_path / "usr/src/linux"
    tree.mkdir(parents=True)
    (tree / ".config").write_text(config)
    build = tmp_path / BUILD_DIR.lstrip("/")
    build.parent.mkdir(parents=True)
    build.symlink_to("/usr/src/linux")  # absolute: resolved inside the root
    (tmp_path / "usr/bin").mkdir()
    for name, kind in commands.items():
        path = tmp_path / "usr/bin" / name
        if kind.startswith("@"):
            path.symlink_to(f"/usr/bin/{kind[1:]}")
        else:
            path.write_text("#!/bin/sh\n")
            path.chmod(0o755 if kind == "x" else 0o644)
    return DevRoot(tmp_path, KERNEL, BUILD_DIR, "0" * 64, RELEASE)


@pytest.mark.parametrize(
    ("config", "commands", "toolchain"),
    [
        # The test developer container: gcc-12 and x86_64-linux-gnu-gcc-12, no cc, no gcc.
        (DEBIAN, {"x86_64-linux-gnu-gcc-12": "x", "gcc-12": "@x86_64-linux-gnu-gcc-12"},
         Toolchain("gcc-12")),
        (DEBIAN, {"gcc": "x", "cc": "@gcc"}, Toolchain("gcc")),
        (CROSS, {"x86_64-cros-linux-gnu-gcc": "x", "gcc": "x", "x86_64-cros-linux-gnu-ld": "x"},
         Toolchain("x86_64-cros-linux-gnu-gcc", "x86_64-cros-linux-gnu-ld")),
        (CROSS, {"gcc-13": "x", "ld": "x"}, Toolchain("gcc-13")),  # kbuild's ld, then
        (CLANG_LLD, {"clang-16": "x", "ld.lld": "x"}, Toolchain("clang-16", "ld.lld")),
        (CLANG_BFD, {"clang": "x", "ld": "x"}, Toolchain("clang")),
        (ANCIENT, {}, Toolchain()),
    ],
)
def test_toolchain_is_found_in_the_root(tmp_path: Path, config: str, commands: dict[str, str],
                                        toolchain: Toolchain) -> None:
    assert resolve_toolchain(_root(tmp_path, config, commands)) == toolchain


@pytest.mark.parametrize(
    ("config", "commands", "message"),
    [
        (DEBIAN, {"clang": "x", "gcc-12": "-"},
         f"kernel {KERNEL} was built with 'gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0', but the "
         "developer container has no such compiler: none of gcc-12, gcc is on its PATH"),
        (CLANG_LLD, {"clang-16": "x", "ld": "x"},
         f"kernel {KERNEL} was built with 'Debian clang version 16.0.6 (15)', but the developer "
         "container has no such linker: none of ld.lld-16, ld.lld is on its PATH"),
    ],
)
def test_a_compiler_missing_from_the_root_is_one_line(tmp_path: Path, config: str,
                                                      commands: dict[str, str],
                                                      message: str) -> None:
    with pytest.raises(CoreosGpuError) as info:
        resolve_toolchain(_root(tmp_path, config, commands))
    assert info.value.code is ExitCode.IMAGE
    assert info.value.message == message


def test_make_args() -> None:
    assert Toolchain("gcc-12").make_args() == ["CC=gcc-12"]
    assert Toolchain("clang-16", "ld.lld-16").make_args() == ["CC=clang-16", "LD=ld.lld-16"]
    assert Toolchain().make_args() == []


# A Module.symvers line: CRC, symbol, module, export kind, namespace (Linux 5.4 and later).
SYMVERS = "0x1a2b3c4d\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n"


def _key_of(root: DevRoot, kernel: str = KERNEL) -> str:
    package = types.SimpleNamespace(sha256="5" * 64)
    root = dataclasses.replace(root, kernel_release=kernel)
    return module_set_key(package, root, KernelModuleType.PROPRIETARY,  # type: ignore[arg-type]
                          resolve_toolchain(root))


@pytest.fixture
def twin_roots(tmp_path: Path) -> tuple[DevRoot, DevRoot]:
    """Two releases' roots with equal kernel trees and compilers, in different images."""
    roots = []
    for name in ("beta", "stable"):
        root = _root(tmp_path / name, DEBIAN, {"gcc-12": "x"})
        tree = resolve_in_root(root.root, BUILD_DIR)
        (tree / "Module.symvers").write_text(SYMVERS)
        # Debian's split headers: generated files here, the rest behind modules/*/source.
        (tree / "include/generated").mkdir(parents=True)
        (tree / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{KERNEL}"\n')
        (tree / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
        common = root.root / "usr/src/linux-common"
        (common / "include/linux").mkdir(parents=True)
        (common / "include/linux/sched.h").write_text("struct task_struct { int state; };\n")
        (root.root / BUILD_DIR.lstrip("/")).with_name("source").symlink_to(
            "/usr/src/linux-common")
        (root.root / "usr/lib/os-release").write_text(f"VERSION_ID={name}\n")
        roots.append(dataclasses.replace(root, image_sha256=name[0] * 64))
    return roots[0], roots[1]


def _source_tree(root: DevRoot) -> Path:
    return resolve_in_root(root.root, BUILD_DIR.rsplit("/", 1)[0] + "/source")


def test_equal_kernel_trees_in_different_images_share_a_module_set(
        twin_roots: tuple[DevRoot, DevRoot]) -> None:
    beta, stable = twin_roots
    assert beta.image_sha256 != stable.image_sha256
    assert _key_of(beta) == _key_of(stable)


@pytest.mark.parametrize("change", [".config", "Module.symvers", "compiler", "release",
                                    "header", "source header", "new header", "link"])
def test_each_part_of_the_kernel_tree_changes_the_key(twin_roots: tuple[DevRoot, DevRoot],
                                                      change: str) -> None:
    beta, stable = twin_roots
    tree = resolve_in_root(stable.root, BUILD_DIR)
    kernel = KERNEL
    if change == ".config":
        (tree / ".config").write_text(DEBIAN + "CONFIG_DEBUG_INFO=y\n")
    elif change == "Module.symvers":
        (tree / "Module.symvers").write_text(SYMVERS.replace("0x1a2b3c4d", "0x4d3c2b1a"))
    elif change == "compiler":  # the same name, another binary (a rebuilt gcc-12 package)
        (stable.root / "usr/bin/gcc-12").write_text("#!/bin/sh\n# 12.2.0-14+deb12u2\n")
    elif change == "header":  # a patched header, same release, config and symbol CRCs
        with (tree / "include/generated/utsrelease.h").open("a") as f:
            f.write("/* patched */\n")
    elif change == "source header":  # the same, in the common tree behind modules/*/source
        source = _source_tree(stable)
        (source / "include/linux/sched.h").write_text("struct task_struct { int patched; };\n")
    elif change == "new header":
        (tree / "include/generated/extra.h").write_text("#define EXTRA 1\n")
    elif change == "link":
        (tree / "scripts").unlink()
        (tree / "scripts").symlink_to("../../lib/linux-kbuild-6.2/scripts")
    else:
        kernel = f"{KERNEL}-rt"
    assert _key_of(beta) != _key_of(stable, kernel)


def test_a_tree_without_module_symvers_is_an_image_error(tmp_path: Path) -> None:
    root = _root(tmp_path, DEBIAN, {"gcc-12": "x"})
    with pytest.raises(CoreosGpuError) as info:
        _key_of(root)
    assert info.value.code is ExitCode.IMAGE
    assert f"cannot read {BUILD_DIR}/Module.symvers" in info.value.message


@pytest.mark.slow
def test_build_in_a_root_without_cc_or_gcc(flatcar_release, nvidia_run_470: Path,  # type: ignore[no-untyped-def]
                                            tmp_path: Path) -> None:
    """The real 470 sources (the quicker of the two drivers to compile) compile in the test
    developer container made Flatcar-like: it has gcc-12 but no cc and no gcc, and without
    Debian's .kernelvariables the tree no longer names gcc-12 itself, so only the CC from
    CONFIG_CC_VERSION_TEXT makes the build work."""
    cache = tmp_path / "cache"
    devroot = unpack_image(flatcar_release.image, RELEASE, cache, runtime=Runtime.BWRAP,
                           engine=EngineOptions())
    root = tmp_path / "root"
    link_tree(devroot.root, root)  # hard links: replace files in it, never write through
    tree = resolve_in_root(root, devroot.build_dir)
    (tree / ".kernelvariables").unlink()
    assert find_command(root, ("cc", "gcc")) == ""
    assert find_command(root, ("gcc-12",)) == "gcc-12"
    package = load_driver(nvidia_run_470, cache)
    built = build_modules(package, dataclasses.replace(devroot, root=root),
                          KernelModuleType.PROPRIETARY, runtime=Runtime.BWRAP,
                          engine=EngineOptions(), jobs=os.cpu_count() or 1, cache_dir=cache)
    assert {"nvidia", "nvidia-uvm", "nvidia-modeset"} <= {m.name for m in built.modules}
    assert all(m.vermagic.startswith(f"{KERNEL} ") for m in built.modules)
    assert " CC=gcc-12 " in (built.folder / "build.log").read_text().splitlines()[0]
    # The compile says which sandbox it took (the build reports it: build.Build.sandbox).
    assert built.compiled and built.sandbox is not None
    assert built.sandbox.runtime is Runtime.BWRAP
