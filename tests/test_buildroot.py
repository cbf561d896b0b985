"""The build root: what a module build reads, found in an ext4 and copied out of it.

The image here is small but shaped like a developer container where it matters: merged /usr
(/lib, /bin, /lib64 as links, as Flatcar and Debian have them), a Debian-style split kernel
tree (build and source links into /usr/src, a Makefile that includes the common tree by its
absolute path, scripts linked into linux-kbuild), real ELF programs from this machine with
their real libraries and loader, a program with its own library found through
RUNPATH=$ORIGIN/..., libraries behind soname links, and bulk no build reads (a Portage
tree, documentation, an unused library). Its "compiler" is a shell script answering the
questions gcc answers (-print-prog-name, -print-libgcc-file-name, -E -v), run by the
image's own /bin/sh in the sandbox.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from coreos_gpu.buildroot import RootCopy, copy_build_root
from coreos_gpu.config import Runtime
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.sandbox import EngineOptions, SandboxSpec, run_in_sandbox

HOST_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64")
MULTIARCH = "usr/lib/x86_64-linux-gnu"
GCC_LIB = "usr/lib/gcc/x86_64-pc-linux-gnu/13"
GCC_LIBEXEC = "usr/libexec/gcc/x86_64-pc-linux-gnu/13"
BINUTILS = "usr/x86_64-pc-linux-gnu/bin"
# A Flatcar-like gcc's answers (Gentoo's layout: cc1 under libexec, crt and headers under lib,
# binutils' links in the target's bin). Like gcc, it names a part by its path only where the
# part is, and its search path and install folder whether they are or not.
FAKE_GCC = f"""#!/bin/sh
programs="/{GCC_LIBEXEC}/:/{GCC_LIBEXEC}/../:/{GCC_LIB}/:/{GCC_LIB}/../../../../x86_64-pc-linux-gnu/bin/"
case "$1" in
-print-search-dirs)
    echo "install: /{GCC_LIB}/"
    echo "programs: =$programs"
    echo "libraries: =/{GCC_LIB}/:/usr/lib64/" ;;
-print-prog-name=*)
    part=${{1#-print-prog-name=}}
    for folder in /{GCC_LIBEXEC} /{BINUTILS}; do
        [ -e "$folder/$part" ] && echo "$folder/$part" && exit 0
    done
    echo "$part" ;;
-print-file-name=include) echo "/{GCC_LIB}/include" ;;
-xc)
    if [ -x /{GCC_LIBEXEC}/cc1 ]; then
        echo '#include <...> search starts here:' >&2
        echo ' /{GCC_LIB}/include' >&2
        echo ' /usr/include' >&2
        echo 'End of search list.' >&2
    else
        echo 'ignoring nonexistent directory "/usr/include"' >&2
        echo "gcc: fatal error: cannot execute 'cc1'" >&2
        exit 1
    fi ;;
esac
"""
KERNEL = "6.1.0-test-amd64"
LONG_NAME = "a-header-name-long-enough-that-its-link-is-not-a-fast-symlink-in-ext4.h"


def _elf(path: Path) -> tuple[str, list[str]]:
    with path.open("rb") as f:
        elf = ELFFile(f)
        interpreter = next((s.get_interp_name() for s in elf.iter_segments()
                            if isinstance(s, InterpSegment)), "")
        dynamic = elf.get_section_by_name(".dynamic")
        needed = [t.needed for t in dynamic.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    return interpreter, needed


def _host_library(name: str) -> Path:
    return next(Path(d, name) for d in HOST_LIBRARY_DIRS if Path(d, name).exists())


def _install_program(root: Path, program: str, dest: str) -> None:
    """A program of this machine and its libraries, where a Debian root keeps them."""
    shutil.copy(program, root / dest)
    _, needed = _elf(Path(program))
    for name in needed:
        if not (root / MULTIARCH / name).exists():
            shutil.copy(_host_library(name), root / MULTIARCH / name)


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _compile(tmp: Path, out: Path, source: str, *flags: str) -> None:
    c = _write(tmp / f"{out.name}.c", source)
    subprocess.run(["gcc", "-O1", "-o", str(out), str(c), *flags], check=True)


def make_image(tmp: Path) -> tuple[Path, Path]:
    """(the ext4, the folder it was made from)."""
    if shutil.which("gcc") is None or shutil.which("mke2fs") is None:
        pytest.skip("needs gcc and mke2fs (scripts/test installs them)")
    root = tmp / "tree"
    for folder in ("usr/bin", "usr/sbin", MULTIARCH, "usr/lib64", "etc/ld.so.conf.d", "tmp",
                   "proc", "dev", "var/db/repos/gentoo/sys-devel/gcc", "usr/share/doc/gcc",
                   f"{GCC_LIB}/include", GCC_LIBEXEC, f"usr/lib/modules/{KERNEL}",
                   "usr/include"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        (root / name).symlink_to(target)
    _write(root / "etc/ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n")
    _write(root / "etc/ld.so.conf.d/x86_64-linux-gnu.conf", "# Multiarch support\n/" + MULTIARCH
           + "\n")
    _write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    # The loader where Debian keeps it, and the PT_INTERP path as a link to it.
    interpreter, _ = _elf(Path("/bin/sh"))
    loader = Path(interpreter).name
    shutil.copy(os.path.realpath(interpreter), root / MULTIARCH / loader)
    (root / "usr/lib64" / loader).symlink_to(f"../lib/x86_64-linux-gnu/{loader}")
    _install_program(root, os.path.realpath("/bin/sh"), "usr/bin/sh")
    _install_program(root, shutil.which("cat") or "/bin/cat", "usr/bin/cat")
    (root / "usr/bin/X11").symlink_to(".")  # Debian has it: a link to its own folder
    _write(root / "usr/bin/gcc", FAKE_GCC, 0o755)
    # gcc's own parts, each needing a library of its own through ld.so.conf's folder.
    lib = tmp / "build"
    lib.mkdir()
    _compile(lib, root / MULTIARCH / "libmpc.so.3.3.1", "int mpc(void) { return 3; }",
             "-shared", "-fPIC", "-Wl,-soname,libmpc.so.3")
    (root / MULTIARCH / "libmpc.so.3").symlink_to("libmpc.so.3.3.1")
    shutil.copy(root / MULTIARCH / "libmpc.so.3", lib / "libmpc.so")
    _compile(lib, root / GCC_LIBEXEC / "cc1", "int mpc(void); int main(void) { return mpc(); }",
             f"-L{lib}", "-lmpc")
    _write(root / GCC_LIB / "libgcc.a", "!<arch>\n")
    _write(root / "usr/lib/gcc/x86_64-pc-linux-gnu/12/libgcc.a", "!<arch>\n")  # an older gcc
    (root / BINUTILS).mkdir(parents=True)
    shutil.copy(root / "usr/bin/cat", root / BINUTILS / "as")  # an ELF program, as as is
    _write(root / GCC_LIB / "include/stddef.h", "/* gcc's */\n")
    _write(root / "usr/include/stdio.h", "/* libc's */\n")
    # A program with a private library through RUNPATH=$ORIGIN, behind a soname link.
    private = root / "usr/lib/tool"
    private.mkdir(parents=True)
    _compile(lib, private / "libpriv.so.1.0", "int priv(void) { return 1; }", "-shared",
             "-fPIC", "-Wl,-soname,libpriv.so.1")
    (private / "libpriv.so.1").symlink_to("libpriv.so.1.0")
    shutil.copy(private / "libpriv.so.1.0", lib / "libpriv.so")
    _compile(lib, root / "usr/bin/tool", "int priv(void); int main(void) { return priv(); }",
             f"-L{lib}", "-lpriv", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib/tool")
    # A program whose library the image lacks (a broken package: not ours to fix).
    _compile(lib, lib / "libgone.so", "int gone(void) { return 0; }", "-shared", "-fPIC")
    _compile(lib, root / "usr/bin/orphan", "int gone(void); int main(void) { return gone(); }",
             f"-L{lib}", "-lgone")
    # A link out of PATH to a program elsewhere (as /usr/bin/clang → /usr/lib/llvm/...).
    llvm = root / "usr/lib/llvm/17/bin"
    llvm.mkdir(parents=True)
    shutil.copy(root / "usr/bin/cat", llvm / "llvm-cat")
    (root / "usr/bin/llvm-cat").symlink_to("../lib/llvm/17/bin/llvm-cat")
    # Debian's split kernel headers.
    src = root / "usr/src"
    kbuild = root / "usr/lib/linux-kbuild-6.1/scripts"
    _write(kbuild / "Makefile.build", "# kbuild\n")
    shutil.copy(root / "usr/bin/cat", kbuild / "fixdep")  # a host program: ELF, needs libc
    common = src / "linux-headers-6.1.0-test-common"
    _write(common / "Makefile", "# the common tree\n")
    _write(common / "include/linux/a b.h", "/* a name with a space */\n")
    _write(common / "include/linux" / LONG_NAME, "/* far */\n")
    (common / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
    flavour = src / "linux-headers-6.1.0-test-amd64"
    _write(flavour / "Makefile", "include /usr/src/linux-headers-6.1.0-test-common/Makefile\n"
           "-include /usr/src/linux-extra/Makefile.extra\n")
    _write(flavour / ".config", 'CONFIG_CC_VERSION_TEXT="gcc (Gentoo 13.3.1_p20240614 p17) '
           '13.3.1 20240614"\nCONFIG_CC_IS_GCC=y\nCONFIG_GCC_VERSION=130301\n')
    _write(flavour / "include/generated/utsrelease.h", f'#define UTS_RELEASE "{KERNEL}"\n')
    (flavour / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
    (flavour / "include/far.h").symlink_to(
        f"../../../../usr/src/linux-headers-6.1.0-test-common/include/linux/{LONG_NAME}")
    _write(src / "linux-extra/Makefile.extra", "# reached only by the Makefile's include\n")
    modules = root / f"usr/lib/modules/{KERNEL}"
    (modules / "build").symlink_to("../../../src/linux-headers-6.1.0-test-amd64")
    (modules / "source").symlink_to("../../../src/linux-headers-6.1.0-test-common")
    # What no module build reads.
    _write(root / "var/db/repos/gentoo/sys-devel/gcc/gcc-13.3.1.ebuild", "EAPI=8\n" * 1000)
    _write(root / "usr/share/doc/gcc/NEWS", "news\n" * 1000)
    shutil.copy(root / MULTIARCH / "libmpc.so.3.3.1", root / MULTIARCH / "libunused.so.1")
    image = tmp / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), str(image), "64M"],
                   check=True)
    return image, root


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_image(tmp_path_factory.mktemp("image"))


def _entries(root: Path) -> dict[str, str]:
    """path → "link:target" / "dir" / "file:<bytes>" for every entry under root."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = f"file:{path.read_bytes().hex()[:64]}:{path.stat().st_size}"
    return found


@pytest.fixture(scope="module")
def copied(image: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0 and shutil.which("bwrap") is None:
        pytest.skip("needs a sandbox")
    dest = tmp_path_factory.mktemp("copy") / "root"
    log = dest.parent / "prepare.log"
    copy_build_root(image[0], dest, runtime=Runtime.AUTO, engine=EngineOptions(),
                    log_file=log, image_key="test-buildroot")
    return dest


NEEDED = (
    # the kernel tree, both halves, and what its links and its Makefile's include reach
    f"usr/lib/modules/{KERNEL}/build", f"usr/lib/modules/{KERNEL}/source",
    "usr/src/linux-headers-6.1.0-test-amd64/.config",
    "usr/src/linux-headers-6.1.0-test-amd64/include/far.h",
    "usr/src/linux-headers-6.1.0-test-common/include/linux/a b.h",
    f"usr/src/linux-headers-6.1.0-test-common/include/linux/{LONG_NAME}",
    "usr/lib/linux-kbuild-6.1/scripts/Makefile.build", "usr/src/linux-extra/Makefile.extra",
    # PATH, the loader behind its PT_INTERP link, libraries through ld.so.conf and RUNPATH
    "bin", "lib", "lib64", "usr/bin/sh", "usr/bin/cat", "usr/bin/tool", "usr/bin/X11",
    f"usr/lib64/{Path(_elf(Path('/bin/sh'))[0]).name}", f"{MULTIARCH}/libc.so.6",
    "usr/lib/tool/libpriv.so.1", "usr/lib/tool/libpriv.so.1.0",
    "usr/bin/llvm-cat", "usr/lib/llvm/17/bin/llvm-cat", "etc/passwd",
    # the compiler's parts, as it named them, and what those need
    f"{GCC_LIBEXEC}/cc1", f"{MULTIARCH}/libmpc.so.3", f"{MULTIARCH}/libmpc.so.3.3.1",
    f"{GCC_LIB}/libgcc.a", f"{GCC_LIB}/include/stddef.h", "usr/include/stdio.h",
    f"{BINUTILS}/as",
)
SANDBOX_LEFTOVERS = {"lost+found", "etc/mtab", "etc/hostname", "etc/hosts", "etc/resolv.conf",
                     "sys", "run", "run/.containerenv"}
LEFT_BEHIND = ("var/db/repos/gentoo", "usr/share/doc", f"{MULTIARCH}/libunused.so.1",
               "usr/lib/gcc/x86_64-pc-linux-gnu/12")


def test_the_copy_holds_what_a_build_reads_as_the_image_has_it(
        image: tuple[Path, Path], copied: Path) -> None:
    want, got = _entries(image[1]), _entries(copied)
    for path in NEEDED:
        assert path in got, path
    # Everything copied is the image's, byte for byte, links as links; podman's probe (where
    # it runs at all) leaves its mount points and files in a root.
    assert {k: got[k] for k in got.keys() & want.keys()} == {k: want[k] for k in got.keys()
                                                              & want.keys()}
    assert got.keys() - want.keys() <= SANDBOX_LEFTOVERS


def test_what_no_build_reads_stays_behind(copied: Path) -> None:
    for path in LEFT_BEHIND:
        assert not (copied / path).exists(), path
    assert not (copied / ".stage").exists()


def test_the_copied_programs_run_in_the_copy(copied: Path, tmp_path: Path) -> None:
    # The loader, libraries and RUNPATH ($ORIGIN needs /proc) the closure found are the ones
    # ld.so finds, in the sandbox the build runs in. tool exits with priv()'s 1.
    log = tmp_path / "log"
    run_in_sandbox(SandboxSpec(root=copied), ["sh", "-c", "cat /etc/passwd; tool; [ $? = 1 ]"],
                   runtime=Runtime.AUTO, log_file=log, what="running the copied programs",
                   image_key="test-buildroot-run")
    assert "root:x:0:0" in log.read_text()


def test_a_library_the_image_lacks_is_said_not_fatal(
        image: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy_build_root(image[0], tmp_path / "root", runtime=Runtime.AUTO, engine=EngineOptions(),
                    log_file=tmp_path / "log", image_key="test-buildroot")
    err = capsys.readouterr().err
    assert "libgone.so" in err and "/usr/bin/orphan" in err


def test_a_root_with_none_of_the_kernels_compilers_is_one_line(
        image: tuple[Path, Path], tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(image[1], tree, symlinks=True)
    (tree / "usr/bin/gcc").unlink()
    broken = tmp_path / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(broken), "64M"],
                   check=True)
    with pytest.raises(CoreosGpuError) as raised:
        copy_build_root(broken, tmp_path / "root", runtime=Runtime.AUTO,
                        engine=EngineOptions(), log_file=tmp_path / "log", image_key="x")
    assert raised.value.code == ExitCode.IMAGE
    assert "gcc" in str(raised.value) and "\n" not in str(raised.value)


def test_lookups_follow_links_as_the_build_sees_them(image: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    copy = RootCopy(image[0], tmp_path / "root")
    found = copy.resolve_all([f"/lib/modules/{KERNEL}/build/include/far.h", "/lib64/nothing",
                              "/usr/bin/sh/x", "/bin/../etc/passwd"])
    assert found == {
        f"/lib/modules/{KERNEL}/build/include/far.h":
            f"/usr/src/linux-headers-6.1.0-test-common/include/linux/{LONG_NAME}",
        "/lib64/nothing": None, "/usr/bin/sh/x": None,
        # `..` after a link is taken in its target, as the kernel does: /usr/bin/.. is /usr.
        "/bin/../etc/passwd": None}
    # Nothing but the links on the way was copied.
    assert not (tmp_path / "root/usr/src/linux-headers-6.1.0-test-common/include/linux"
                / LONG_NAME).exists()
    assert (tmp_path / "root/lib").is_symlink()
