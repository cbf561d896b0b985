"""Modules stage: kernel tree (DevRoot) + driver sources (DriverPackage) → `ModuleSet`.

The NVIDIA kernel modules are compiled with kbuild inside the developer container root,
through the sandbox, with the compiler the kernel was built with, and every .ko is checked
before it is kept: its vermagic must name the target kernel release and its version the
driver version. Results are cached by a hash of what the build depends on — the driver's
sources and the kernel build tree's content (release, .config, Module.symvers, compiler) —
not by the image: an unchanged rebuild compiles nothing, and neither does a release whose
kernel tree equals one already built (a beta promoted to stable, say).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from coreos_gpu import ui
from coreos_gpu.cache import hash_inputs, link_tree, locked, sha256_of, write_atomically
from coreos_gpu.config import KernelModuleType, Runtime
from coreos_gpu.devcontainer import DevRoot, read_kernel_release, resolve_in_root
from coreos_gpu.driver import DriverPackage, check_flavour
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.kconfig import read_kconfig, wanted_compiler
from coreos_gpu.modinfo import identity_problem, read_identity, vermagic_release
from coreos_gpu.run import tail
from coreos_gpu.sandbox import (
    DEFAULT_ENV,
    Bind,
    EngineOptions,
    RuntimeChoice,
    SandboxSpec,
    run_in_sandbox,
)


@dataclass(frozen=True)
class KernelModule:
    name: str  # the file's stem: "nvidia-uvm"
    path: Path  # the .ko, in the module cache
    sha256: str
    size: int
    vermagic: str
    version: str
    depends: tuple[str, ...]  # kernel modules it needs loaded first (modinfo "depends")


@dataclass(frozen=True)
class ModuleSet:
    kernel_release: str
    flavour: KernelModuleType
    driver_version: str
    modules: tuple[KernelModule, ...]
    folder: Path  # the cache entry: the .ko files, build.log, modules.json
    key: str  # sha256 over every input of the build
    compiled: bool = field(default=False, compare=False)  # by this run, not from the cache
    # The sandbox that compiled it (by this run); None: from the cache.
    sandbox: RuntimeChoice | None = field(default=None, compare=False)


# Part of every cache key: bump it when the build commands below change.
BUILD_RECIPE = "4"  # 2: CC (and LD) as the kernel was built with; 3: keyed by the tree;
# 4: by all of the tree's files
# Without these three the driver cannot work; nvidia-drm and nvidia-peermem are optional
# (kernels without DRM or InfiniBand build without them).
REQUIRED = ("nvidia", "nvidia-uvm", "nvidia-modeset")
SOURCES_IN_SANDBOX = "/build/nvidia"
_OBJECT_LINE = re.compile(r"\s*CC \[M\]\s")


def _fail(message: str, log: Path) -> CoreosGpuError:
    return CoreosGpuError(f"{message}\n{tail(log.read_text(errors='replace'))}",
                          hint=f"full build log: {log}", code=ExitCode.MODULES)


def _tree_file_sha256(devroot: DevRoot, name: str) -> str:
    path = resolve_in_root(devroot.root, f"{devroot.build_dir}/{name}")
    try:
        return sha256_of(path)
    except OSError as e:
        raise CoreosGpuError(f"cannot read {devroot.build_dir}/{name} in the developer "
                             f"container of {devroot.release.version}: {e.strerror}",
                             code=ExitCode.IMAGE) from e


def _tree_sha256(devroot: DevRoot) -> str:
    """Every path, link target and file of the kernel build tree and its source: headers
    patched without a new release string, .config or symbol CRCs must not reuse modules.
    Hashed on each build (under a second for a distribution's headers), not recorded: a root
    changed by hand in `devcontainer shell` counts too."""
    digest = hashlib.sha256()
    tops = dict.fromkeys(resolve_in_root(devroot.root, d) for d in (
        devroot.build_dir, _kernel_source(devroot)))
    for n, top in enumerate(tops):
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(dirs + files):
                path = Path(folder, name)
                digest.update(f"{n}:{path.relative_to(top)}\0".encode())
                if path.is_symlink():
                    digest.update(b"link:" + os.fsencode(os.readlink(path)) + b"\0")
                elif path.is_file():
                    digest.update(bytes.fromhex(sha256_of(path)))
    return digest.hexdigest()


def _command_sha256(root: Path, name: str) -> str:
    """The sha256 of the executable `name` runs as in root ("" for no name)."""
    path = find_executable(root, name) if name else None
    return sha256_of(path) if path else ""


def module_set_key(package: DriverPackage, devroot: DevRoot, flavour: KernelModuleType,
                   toolchain: Toolchain) -> str:
    """What a module build depends on: the driver's sources, the flavour and the kernel build
    tree — its release, .config (which also names the compiler's version), Module.symvers
    (the symbol versions the modules link against), every other file of it and of its
    source, and the compiler and linker themselves.
    The image is not part of it: two releases whose images differ only outside the tree
    (their release files, other packages) share one module set. Nor is where the tree lies
    in the image (/usr/lib64/modules on older releases): the stripped modules do not record
    it."""
    inputs = {"recipe": BUILD_RECIPE, "driver_sha256": package.sha256, "flavour": flavour.value,
              "kernel_release": devroot.kernel_release,
              "config_sha256": _tree_file_sha256(devroot, ".config"),
              "symvers_sha256": _tree_file_sha256(devroot, "Module.symvers"),
              "tree_sha256": _tree_sha256(devroot),
              "cc": toolchain.cc, "cc_sha256": _command_sha256(devroot.root, toolchain.cc),
              "ld": toolchain.ld, "ld_sha256": _command_sha256(devroot.root, toolchain.ld)}
    return hash_inputs(inputs)


@dataclass(frozen=True)
class Toolchain:
    """What make is told to compile and link with; empty: kbuild's own default."""

    cc: str = ""
    ld: str = ""

    def make_args(self) -> list[str]:
        return [f"{name}={value}" for name, value in (("CC", self.cc), ("LD", self.ld))
                if value]


def find_executable(root: Path, name: str) -> Path | None:
    """The file `name` runs as on the sandbox's PATH in root, resolved; None if none."""
    for folder in DEFAULT_ENV["PATH"].split(":"):
        path = resolve_in_root(root, f"{folder}/{name}")
        if path.is_file() and path.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP
                                                     | stat.S_IXOTH):
            return path
    return None


def find_command(root: Path, names: tuple[str, ...]) -> str:
    """The first of names that is an executable on the sandbox's PATH in root; "" if none."""
    return next((name for name in names if find_executable(root, name)), "")


def resolve_toolchain(devroot: DevRoot) -> Toolchain:
    """CC (and LD) as the kernel tree was built with, found in the developer container.

    On make's command line they reach kbuild and every NVIDIA Makefile and conftest below
    it. Otherwise NVIDIA's Makefile falls back to `cc` (535's first tries the first word of
    CONFIG_CC_VERSION_TEXT, for itself only), and kbuild to `gcc` unless the tree sets CC
    (Debian's headers do, in .kernelvariables; Flatcar's do not): a root with gcc-12 but
    neither `cc` nor `gcc`, like the test developer container, builds only this way."""
    tree = resolve_in_root(devroot.root, devroot.build_dir)
    try:
        options = read_kconfig((tree / ".config").read_text(errors="replace"))
    except OSError as e:
        raise CoreosGpuError(f"cannot read {devroot.build_dir}/.config: {e.strerror}",
                             code=ExitCode.IMAGE) from e
    wanted = wanted_compiler(options)
    cc = find_command(devroot.root, wanted.cc)
    if wanted.cc and not cc:
        raise _missing_tool(devroot, "compiler", wanted.what, wanted.cc)
    ld = find_command(devroot.root, wanted.ld)
    if wanted.ld_required and not ld:
        raise _missing_tool(devroot, "linker", wanted.what, wanted.ld)
    return Toolchain(cc, ld)


def _missing_tool(devroot: DevRoot, kind: str, what: str,
                  names: tuple[str, ...]) -> CoreosGpuError:
    return CoreosGpuError(
        f"kernel {devroot.kernel_release} was built with {what!r}, but the developer container "
        f"has no such {kind}: none of {', '.join(names)} is on its PATH",
        hint="modules must be built by the kernel's own compiler; use the developer container "
        "of the OS release the kernel comes from", code=ExitCode.IMAGE)


def _in_root_path(root: Path, host_path: Path) -> str:
    return "/" + str(host_path.relative_to(root))


def _kernel_source(devroot: DevRoot) -> str:
    """SYSSRC: the kernel's source tree. Split header packages (Debian's -common and -amd64)
    keep it apart from the build tree, behind modules/<release>/source."""
    source = devroot.build_dir.rstrip("/").rsplit("/", 1)[0] + "/source"
    resolved = resolve_in_root(devroot.root, source)
    return _in_root_path(devroot.root, resolved) if resolved.is_dir() else devroot.build_dir


class _Counter:
    """kbuild progress: one line per 50 objects compiled (kbuild cannot say how many remain)."""

    def __init__(self) -> None:
        self.objects = 0

    def __call__(self, line: str) -> None:
        if _OBJECT_LINE.match(line):
            self.objects += 1
            if self.objects % 50 == 0:
                ui.log(f"    compiled {self.objects} objects")


def _load(entry: Path) -> ModuleSet:
    data = json.loads((entry / "modules.json").read_text())
    return ModuleSet(
        kernel_release=data["kernel_release"], flavour=KernelModuleType(data["flavour"]),
        driver_version=data["driver_version"], folder=entry, key=data["key"],
        modules=tuple(KernelModule(name=m["name"], path=entry / f"{m['name']}.ko",
                                   sha256=m["sha256"], size=m["size"], vermagic=m["vermagic"],
                                   version=m["version"], depends=tuple(m["depends"]))
                      for m in data["modules"]))


def check_modules(paths: list[Path], *, kernel_release: str, driver_version: str,
                  log: Path) -> list[KernelModule]:
    """Each module must be built for the kernel (vermagic) and be this driver's: its declared
    version, or for a module that declares none (470's nvidia-uvm), its link to the set's
    nvidia.ko (modinfo.identity_problem)."""
    identities = {path: read_identity(path) for path in paths}
    core = next((i for p, i in identities.items() if p.name == "nvidia.ko"), None)
    modules = []
    for path, identity in identities.items():
        vermagic = identity.fields.get("vermagic", "")
        problem = "" if vermagic_release(vermagic) == kernel_release else (
            f"{path.name} was built for kernel {vermagic_release(vermagic) or '(none)'}, not "
            f"{kernel_release} (vermagic {vermagic!r})")
        problem = problem or identity_problem(path.name, identity, driver_version=driver_version,
                                              core=core)
        if problem:
            raise CoreosGpuError(problem, hint=f"build log: {log}", code=ExitCode.MODULES)
        depends = tuple(d for d in identity.fields.get("depends", "").split(",") if d)
        modules.append(KernelModule(name=path.stem, path=path, sha256=sha256_of(path),
                                    size=path.stat().st_size, vermagic=vermagic,
                                    version=identity.fields.get("version", ""),
                                    depends=depends))
    return modules


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Each .ko in folder: its inode and mtime, to tell the files kbuild wrote from others."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.ko")}


def check_written(built: list[Path], before: dict[str, tuple[int, int]], log: Path) -> None:
    """Refuse a .ko that was in the sources before make and that make left as it was: a
    module of another build (another driver, say) that kbuild did not rebuild. The work
    folder is new for each build, so a .ko there is this build's or came with the sources."""
    for path in built:
        if before.get(path.name) == (path.stat().st_ino, path.stat().st_mtime_ns):
            raise CoreosGpuError(
                f"{path.name} was already in the driver's kernel sources and this build did "
                "not write it: a module left there by another build, not one of this driver's",
                hint=f"remove it from the package (build log: {log})", code=ExitCode.MODULES)


def build_modules(package: DriverPackage, devroot: DevRoot, flavour: KernelModuleType, *,
                  runtime: Runtime, engine: EngineOptions, jobs: int,
                  cache_dir: Path) -> ModuleSet:
    """Compile (or find in the cache) the driver's kernel modules for the DevRoot's kernel."""
    check_flavour(package, flavour)
    # Compiling against an unprepared tree "works" and makes modules the kernel refuses.
    read_kernel_release(resolve_in_root(devroot.root, devroot.build_dir), devroot.build_dir,
                        devroot.kernel_release)
    toolchain = resolve_toolchain(devroot)
    key = module_set_key(package, devroot, flavour, toolchain)
    folder = cache_dir / "modules"
    entry = folder / key
    if (entry / "modules.json").is_file():
        return _load(entry)
    with locked(folder / f"{key}.lock"):
        if (entry / "modules.json").is_file():
            return _load(entry)
        log = folder / f"{key}.build.log"  # beside the work folder: it outlives a failure
        work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=folder))
        try:
            sources = work / "src"
            # kbuild only adds files beside the sources, so hard links are safe and cheap.
            link_tree(package.kernel_source_dir(flavour), sources)
            spec = SandboxSpec(root=devroot.root, mounts=(Bind(sources, SOURCES_IN_SANDBOX),),
                               workdir=SOURCES_IN_SANDBOX)
            what = (f"compiling the {flavour.value} NVIDIA {package.version} modules for "
                    f"{devroot.kernel_release}")
            before = _stamps(sources)
            with ui.step(what):
                if toolchain.cc:
                    ui.log(f"    with {' '.join(toolchain.make_args())}, as the kernel was built")
                sandbox = run_in_sandbox(
                    spec, ["make", "-C", SOURCES_IN_SANDBOX, *toolchain.make_args(),
                           f"SYSSRC={_kernel_source(devroot)}", f"SYSOUT={devroot.build_dir}",
                           f"-j{jobs}", "modules"],
                    runtime=runtime, log_file=log, what=what, engine_options=engine,
                    image_key=devroot.image_sha256, progress=_Counter())
            built = sorted(sources.glob("*.ko"))
            if not built:
                raise _fail(f"{what} produced no kernel modules (.ko)", log)
            missing = [name for name in REQUIRED if not (sources / f"{name}.ko").is_file()]
            if missing:
                raise _fail(f"{what} did not produce {', '.join(m + '.ko' for m in missing)}",
                            log)
            check_written(built, before, log)
            # Debug info is 90% of each .ko and no node needs it (nvidia-uvm: 52 MB → 3 MB).
            run_in_sandbox(spec, ["strip", "--strip-debug", *(p.name for p in built)],
                           runtime=runtime, log_file=work / "strip.log",
                           what="stripping debug info from the modules", engine_options=engine,
                           image_key=devroot.image_sha256)
            out = work / "out"
            out.mkdir()
            for ko in built:
                shutil.copy2(ko, out / ko.name)
            modules = check_modules([out / ko.name for ko in built],
                                    kernel_release=devroot.kernel_release,
                                    driver_version=package.version, log=log)
            write_atomically(out / "modules.json", json.dumps({
                "key": key, "kernel_release": devroot.kernel_release, "flavour": flavour.value,
                "driver_version": package.version,
                "modules": [{"name": m.name, "sha256": m.sha256, "size": m.size,
                             "vermagic": m.vermagic, "version": m.version,
                             "depends": list(m.depends)} for m in modules],
            }, indent=2).encode())
            shutil.move(log, out / "build.log")
            out.rename(entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return replace(_load(entry), compiled=True, sandbox=sandbox)
