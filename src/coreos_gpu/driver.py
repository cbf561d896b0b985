"""Driver stage: an NVIDIA `.run` → `DriverPackage` (version, kernel sources, files by profile).

The `.run` is extracted with its own `-x --target` (NVIDIA's supported way; nvidia-installer
is never used), once per sha256, into the cache. Its `.manifest` says what is in it; the
symlinks it lists are not in it (nvidia-installer makes them from their targets), so they
come from the manifest alone.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from coreos_gpu.cache import content_digest, locked
from coreos_gpu.config import KernelModuleType, Profile
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.fetch import fetch, forget
from coreos_gpu.layout import link_base, link_destination, payload_path
from coreos_gpu.manifest import Arch, Manifest, ManifestEntry, entry_error, parse_manifest
from coreos_gpu.run import run

MANIFEST_NAME = ".manifest"
# NVIDIA's datacenter ("tesla") downloads; mirrored like every other URL.
DRIVER_URL = "https://us.download.nvidia.com/tesla/{v}/NVIDIA-Linux-x86_64-{v}.run"
EXTRACT_TIMEOUT_S = 600

# Where each flavour's kernel module sources live in the extracted package.
FLAVOUR_DIRS = {KernelModuleType.PROPRIETARY: "kernel", KernelModuleType.OPEN: "kernel-open"}
# nvidia-installer's own default turned from proprietary to open in 560 (kernel.c
# valid_kernel_module_types: `default_type = PROPRIETARY` up to 555.58.02, `OPEN` from
# 560.28.03). Blackwell GPUs work with the open modules only; Maxwell to Volta (and Kepler,
# up to 470) with the proprietary ones only.
OPEN_BY_DEFAULT_FROM = 560

# Not userspace: compiled by the modules stage, or only meaningful to nvidia-installer.
_NOT_USERSPACE = frozenset(
    {"KERNEL_MODULE_SRC", "KERNEL_MODULE", "DKMS_CONF", "INSTALLER_BINARY",
     "MODULE_SIGNING_KEY"})
# compute: what CUDA, OpenCL and NVML users need, 64-bit only.
_COMPUTE_LIBS = frozenset({"CUDA_LIB", "OPENCL_LIB", "UTILITY_LIB"})
_COMPUTE_LINKS = frozenset({"CUDA_SYMLINK", "OPENCL_LIB_SYMLINK", "UTILITY_LIB_SYMLINK"})
_COMPUTE_ANY_ARCH = frozenset({"NVIDIA_MODPROBE", "FIRMWARE", "CUDA_ICD"})
# The tools the Mesos GPU isolator looks up with `which` and mounts into containers.
MESOS_TOOLS = frozenset({
    "nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server"})
# UTILITY_LIB also covers nvidia-settings' GUI and Wayland helpers, which no GPU task needs.
_DESKTOP_LIB = re.compile(r"libnvidia-(gtk[23]|wayland-client)\.so")


@dataclass(frozen=True)
class DriverPackage:
    version: str
    description: str
    root: Path  # the extracted package, in the cache
    sha256: str  # of the .run
    source: str  # where the .run came from, as the user gave it
    flavours: tuple[KernelModuleType, ...]
    manifest: Manifest

    @property
    def kernel_modules(self) -> tuple[str, ...]:
        return self.manifest.kernel_modules

    def kernel_source_dir(self, flavour: KernelModuleType) -> Path:
        return self.root / FLAVOUR_DIRS[flavour]

    def files(self, profile: Profile) -> tuple[ManifestEntry, ...]:
        return select_files(self.manifest, profile)

    @property
    def default_flavour(self) -> KernelModuleType:
        return default_flavour(self.version, self.flavours)

    def size_of(self, entry: ManifestEntry) -> int:
        """Bytes of a file; a symlink holds none (and is not in the package)."""
        return 0 if entry.is_symlink else (self.root / entry.file).lstat().st_size


def _in_compute(entry: ManifestEntry) -> bool:
    if entry.type in _COMPUTE_ANY_ARCH:
        return True
    if entry.type == "UTILITY_BINARY":
        return entry.name in MESOS_TOOLS
    return (entry.type in _COMPUTE_LIBS and entry.arch is Arch.NATIVE
            and not _DESKTOP_LIB.match(entry.name))


def _links_to_selected(links: list[ManifestEntry], selected: list[ManifestEntry],
                       version: str) -> list[ManifestEntry]:
    """Links whose chain of targets ends at a selected file (libcuda.so → .so.1 → .so.N),
    followed where nvidia-installer would resolve them (layout.link_destination): a link
    to nothing the bundle holds would dangle on the node."""
    shipped = {payload_path(e, version) for e in selected}
    pending = list(links)
    kept: list[ManifestEntry] = []
    progress = True
    while progress:
        progress = False
        for link in list(pending):
            if link_destination(link, version) in shipped:
                shipped.add(payload_path(link, version))
                kept.append(link)
                pending.remove(link)
                progress = True
    return kept


def select_files(manifest: Manifest, profile: Profile) -> tuple[ManifestEntry, ...]:
    """The manifest entries a profile ships, in manifest order. A link ships only when what
    it points at does: in full, that drops links to what no profile ships (nvidia-uninstall
    → nvidia-installer)."""
    userspace = [e for e in manifest.entries if e.type not in _NOT_USERSPACE]
    if profile is Profile.FULL:
        files = [e for e in userspace if not e.is_symlink]
        links = [e for e in userspace if e.is_symlink]
    else:
        files = [e for e in userspace if _in_compute(e)]
        links = [e for e in userspace
                 if e.type in _COMPUTE_LINKS and e.arch is Arch.NATIVE]
    chosen = {id(e) for e in files + _links_to_selected(links, files, manifest.version)}
    return tuple(e for e in userspace if id(e) in chosen)


def _check_run_file(run_file: Path) -> None:
    try:
        with run_file.open("rb") as f:
            head = f.read(2)
    except OSError as e:
        raise CoreosGpuError(f"cannot read driver package {run_file}: {e.strerror}",
                             code=ExitCode.DRIVER) from e
    if head != b"#!":
        raise CoreosGpuError(
            f"{run_file} is not an NVIDIA .run package (it does not start with a shell header)",
            hint="pass NVIDIA-Linux-x86_64-<version>.run as downloaded from NVIDIA",
            code=ExitCode.DRIVER)


def _check_exists(run_file: Path) -> None:
    if not run_file.is_file():
        raise CoreosGpuError(f"driver package {run_file} does not exist or is not a file",
                             code=ExitCode.DRIVER)


def extract_run(run_file: Path, cache_dir: Path, *, digest: str = "") -> tuple[Path, str]:
    """Extract a .run into the cache (once per sha256); return the folder and the sha256.

    digest is the file's sha256 where the caller has it already."""
    _check_exists(run_file)
    _check_run_file(run_file)
    digest = digest or content_digest(run_file)
    drivers = cache_dir / "drivers"
    final = drivers / digest
    if final.is_dir():
        return final, digest
    with locked(drivers / f"{digest}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final, digest
        # Extract beside the final place, then rename: a crash never leaves half a tree there.
        work = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=drivers))
        try:
            target = work / "package"
            try:
                run(["sh", run_file.resolve(), "-x", "--target", target], cwd=work,
                    timeout=EXTRACT_TIMEOUT_S, what=f"extracting {run_file.name}")
            except CoreosGpuError as e:
                raise CoreosGpuError(e.message, hint=e.hint, code=ExitCode.DRIVER) from e
            if not (target / MANIFEST_NAME).is_file():
                raise CoreosGpuError(
                    f"{run_file.name} extracted without a {MANIFEST_NAME}: not an NVIDIA "
                    "driver package", code=ExitCode.DRIVER)
            target.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final, digest


def _detect_flavours(root: Path, manifest: Manifest) -> tuple[KernelModuleType, ...]:
    sources = {e.file.split("/", 1)[0] for e in manifest.entries
               if e.type == "KERNEL_MODULE_SRC"}
    return tuple(
        flavour for flavour, folder in FLAVOUR_DIRS.items()
        if folder in sources and (root / folder / "Makefile").is_file())


def check_link_target(entry: ManifestEntry, version: str, source: str) -> None:
    """A symlink entry's target must stay in the package, seen from where nvidia-installer
    puts the link and resolves its target (layout.link_destination: GBM backend links sit
    in <libdir>/gbm/ and name a library in <libdir>). A target that stays inside but names
    nothing of the package is no error of the driver's: nvidia-installer would make that link
    dangle, and select_files leaves it out, so no bundle carries it."""
    resolved = link_destination(entry, version)
    if resolved == ".." or resolved.startswith("../"):
        folder = link_base(entry, version)
        seen = (f"its install folder {folder}/"
                if folder == str(PurePosixPath(payload_path(entry, version)).parent)
                else f"{folder}/, where nvidia-installer resolves it")
        raise entry_error(source, entry.line, f"symlink {entry.file}'s target "
                                              f"{entry.target!r} leaves the package (seen from "
                                              f"{seen})")


def read_package(root: Path, *, sha256: str, source: str) -> DriverPackage:
    """Parse the extracted package's .manifest; every file it lists must be there, as a file,
    and every symlink must point at something of the package (check_link_target)."""
    manifest_path = root / MANIFEST_NAME
    try:
        text = manifest_path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise CoreosGpuError(f"cannot read {manifest_path}: {e}", code=ExitCode.DRIVER) from e
    where = f"{Path(source).name}: {MANIFEST_NAME}"
    manifest = parse_manifest(text, source=where)
    for entry in manifest.entries:
        path = root / entry.file
        if entry.is_symlink:
            check_link_target(entry, manifest.version, where)
        elif path.is_symlink():
            # A bundle copies files by following their path: a link would copy what it names.
            raise CoreosGpuError(
                f"{source}: {MANIFEST_NAME} line {entry.line} lists {entry.file} as a file, "
                "but the package has a symlink there", code=ExitCode.DRIVER)
        elif not path.is_file():
            raise CoreosGpuError(
                f"{source}: {MANIFEST_NAME} line {entry.line} lists {entry.file}, "
                "which the package lacks", code=ExitCode.DRIVER)
    return DriverPackage(
        version=manifest.version,
        description=manifest.description,
        root=root,
        sha256=sha256,
        source=source,
        flavours=_detect_flavours(root, manifest),
        manifest=manifest,
    )


def load_driver(run_file: Path, cache_dir: Path, *, source: str = "",
                digest: str = "") -> DriverPackage:
    root, digest = extract_run(run_file, cache_dir, digest=digest)
    return read_package(root, sha256=digest, source=source or str(run_file))


def verify_driver_sha256(run_file: Path, source: str, expected: str, cache_dir: Path) -> str:
    """The .run's sha256, which must be the pinned one; a mismatching download is dropped
    from the cache, so the next run fetches it again instead of failing on the same bytes."""
    _check_exists(run_file)
    actual = content_digest(run_file)
    if actual != expected.lower():
        downloaded = urlsplit(source).scheme in ("http", "https")
        if downloaded:
            forget(source, cache_dir)
        raise CoreosGpuError(
            f"{Path(urlsplit(source).path).name or source} has sha256 {actual}, not the "
            f"pinned driver_sha256 {expected.lower()}",
            hint="the download was damaged or is not the pinned driver; it was removed from "
            "the cache" if downloaded else "check the file, or the pin in driver_sha256",
            code=ExitCode.DIGEST)
    return actual


def fetch_driver(source: str, cache_dir: Path, *, offline: bool,
                 sha256: str = "") -> DriverPackage:
    """Fetch a .run (URL or path), check it against a pinned sha256 where one is given,
    before anything in it runs, and read it."""
    run_file = fetch(source, cache_dir, offline=offline)
    digest = verify_driver_sha256(run_file, source, sha256, cache_dir) if sha256 else ""
    return load_driver(run_file, cache_dir, source=source, digest=digest)


def default_flavour(version: str,
                    flavours: tuple[KernelModuleType, ...] = tuple(KernelModuleType),
                    ) -> KernelModuleType:
    """The kernel module type NVIDIA's installer picks for a driver with these sources: open
    from 560 on, proprietary before; a package with one kind of sources has no choice (one
    without kernel-open/ never defaults to open). Without the package (sync's plan), its
    version alone says it: every package since 515 has both."""
    wanted = (KernelModuleType.OPEN if int(version.split(".")[0]) >= OPEN_BY_DEFAULT_FROM
              else KernelModuleType.PROPRIETARY)
    if wanted in flavours or not flavours:
        return wanted
    return flavours[0]


def resolve_flavour(package: DriverPackage, chosen: KernelModuleType | None) -> KernelModuleType:
    """The flavour to build: the one configured (which the package must have), else the
    package's default."""
    if chosen is None:
        return package.default_flavour
    check_flavour(package, chosen)
    return chosen


def check_flavour(package: DriverPackage, flavour: KernelModuleType) -> None:
    """Refuse a kernel module flavour the package lacks: called right after the driver is
    read, before gigabytes of developer containers are fetched for nothing."""
    if flavour not in package.flavours:
        have = [f.value for f in package.flavours]
        raise CoreosGpuError(
            f"driver {package.version} has no {flavour.value} kernel modules "
            f"({FLAVOUR_DIRS[flavour]}/)",
            hint=f"use --kernel-module-type {have[0]}" if have else "this package has no "
            "kernel module sources at all", code=ExitCode.CONFIG)
