"""A Debian VM image for end-to-end tests: Debian's real kernels, booted with systemd in QEMU.

The root is debootstrapped bookworm (minbase + systemd, dbus, kmod, procps, openssl, curl ...) with
the pinned `linux-image-6.1.0-50-amd64` and `-cloud-amd64` installed by dpkg (full /lib/modules,
depmod run), DC/OS's agent unit as a stand-in that records what the agent would find at each start,
and a test-runner unit that runs /data/scenario.sh from a second disk and powers off (the guest
files are in vm_guest/). It is a sparse raw ext4, written without mounting. Each kernel gets its
vmlinuz (and, where Python can decompress it, the vmlinux inside) and a tiny initrd: a static
busybox and just the modules that mount an ext4 root on virtio-blk, which boots much faster under
TCG than a distribution initrd. Building needs root; about a minute.
"""

from __future__ import annotations

import lzma
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from testinputs.cache import build_cached
from testinputs.debian import extract_deb, fetch_debs
from testinputs.debian_root import (
    DOCS_AND_CACHES,
    KERNEL_ABI,
    KERNEL_DEBIAN_VERSION,
    bootstrap_root,
    check_root_prerequisites,
    disk_usage,
    in_root,
    remove_paths,
    write_ext4,
)

KERNEL_RELEASES = (f"{KERNEL_ABI}-amd64", f"{KERNEL_ABI}-cloud-amd64")
KERNEL_PACKAGES = tuple(f"linux-image-{r}={KERNEL_DEBIAN_VERSION}" for r in KERNEL_RELEASES)
BUSYBOX_PACKAGE = "busybox-static=1:1.35.0-4+deb12u1+b1"
# Beyond minbase: a systemd node (dbus, or logind fails and the system is "degraded"), kmod
# for modprobe/insmod, procps, xz-utils, openssl and curl as on Flatcar (a node checks and
# downloads bundles with them), linux-base for the kernel packages' maintainer scripts, and
# busybox for a test's HTTP server on the guest's loopback (there is no network). No udev:
# nothing here needs it, and its coldplug costs seconds under TCG; node scripts make
# /dev/nvidia* themselves.
INCLUDE = ("systemd", "systemd-sysv", "dbus", "kmod", "procps", "xz-utils", "openssl", "curl",
           "linux-base", "busybox")
# virtio_pci for the disks' transport, virtio_blk, ext4; modprobe adds dependencies and softdeps
# (crc32c for ext4's checksums). The cloud kernel has some built in: modprobe says so.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
ENABLE = ("dcos-mesos-slave.service", "coreos-gpu-test.service")
# The runner's scenario output goes to the console; a login prompt there would only interleave.
MASK = ("serial-getty@ttyS0.service",)
HOSTNAME = "coreos-gpu-vm"
FREE_SPACE = 3 << 30  # room in the root for driver bundles; the image is sparse
GUEST = Path(__file__).parent / "vm_guest"
ROOT_IMAGE = "root.img"
TOOLS = {"debootstrap": "debootstrap", "chroot": "coreutils", "dpkg-deb": "dpkg",
         "mkfs.ext4": "e2fsprogs"}
RECIPE_SOURCES = ("vm.py", "debian.py", "debian_root.py", "cache.py")


@dataclass(frozen=True)
class Kernel:
    release: str  # `uname -r`
    vmlinuz: Path  # Debian's compressed bzImage
    initrd: Path
    # The same kernel uncompressed, an ELF that qemu starts at its PVH entry: under TCG this
    # skips seconds of BIOS real-mode setup and xz decompression. None where Debian's payload
    # is not xz (the cloud flavour's is lz4, which decompresses fast enough anyway).
    vmlinux: Path | None

    @property
    def boot_image(self) -> Path:
        """What to give qemu's -kernel."""
        return self.vmlinux or self.vmlinuz


@dataclass(frozen=True)
class VmImage:
    root_image: Path  # raw ext4 (no partition table), sparse: copy it before booting from it
    kernels: Mapping[str, Kernel]  # by release


def guest_files() -> Iterator[tuple[str, Path]]:
    """(path in the root, file in the repository) for every file under vm_guest/root."""
    base = GUEST / "root"
    for path in sorted(base.rglob("*")):
        if path.is_file():
            yield path.relative_to(base).as_posix(), path


def install_guest_files(root: Path) -> None:
    for name, source in guest_files():
        dest = root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        # Modes are the image's, not the checkout's (git keeps only the executable bit).
        dest.chmod(0o755 if "/bin/" in f"/{name}" or "/sbin/" in f"/{name}" else 0o644)


def install_kernels(root: Path) -> None:
    """dpkg -i the kernels: their maintainer scripts run depmod and make /boot's links.

    Their dependency on an initramfs generator is forced away: the host makes the initrds.
    """
    debs = fetch_debs(KERNEL_PACKAGES, root / "tmp/debs")
    in_root(root, "dpkg", "--force-depends", "-i", *(f"/tmp/debs/{deb.name}" for deb in debs))
    shutil.rmtree(root / "tmp/debs")
    for release in KERNEL_RELEASES:
        if not (root / f"usr/lib/modules/{release}/modules.dep").is_file():
            raise RuntimeError(f"installing linux-image-{release} left no modules.dep")


def configure_root(root: Path) -> None:
    install_guest_files(root)
    in_root(root, "systemctl", "enable", *ENABLE)
    in_root(root, "systemctl", "mask", *MASK)
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    # An empty machine-id would make every boot a "first boot" (systemd presets all units).
    if not (root / "etc/machine-id").read_text().strip():
        raise RuntimeError("the VM root has no /etc/machine-id")


def list_initrd_modules(root: Path, release: str) -> list[str]:
    """The .ko paths (in root) to load for INITRD_MODULES, dependencies first, no repeats."""
    paths: list[str] = []
    for module in INITRD_MODULES:
        shown = in_root(root, "modprobe", "--show-depends", "-S", release, module)
        for line in shown.splitlines():
            # "insmod /lib/modules/…/x.ko [params]", or "builtin x" for one built in.
            words = line.split()
            if words[:1] == ["insmod"] and words[1] not in paths:
                paths.append(words[1])
    return paths


def cpio_entry(name: str, mode: int, data: bytes = b"", *, ino: int,
               rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One member of a "newc" cpio archive, the format the kernel unpacks an initramfs from."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08x" % value for value in fields)
    head = header + name.encode() + b"\0"
    return (head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4))


def render_initrd(init: bytes, busybox: bytes, modules: Mapping[str, bytes]) -> bytes:
    """An uncompressed cpio: a few MiB, and nothing for TCG to decompress."""
    members: list[tuple[str, int, bytes, tuple[int, int]]] = [
        *((d, 0o40755, b"", (0, 0)) for d in ("bin", "dev", "lib", "lib/modules", "newroot",
                                             "proc", "sys")),
        # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
        ("dev/console", 0o20600, b"", (5, 1)),
        ("init", 0o100755, init, (0, 0)),
        ("bin/busybox", 0o100755, busybox, (0, 0)),
        ("modules", 0o100644, "".join(f"{name}\n" for name in modules).encode(), (0, 0)),
        *((f"lib/modules/{name}", 0o100644, data, (0, 0)) for name, data in modules.items()),
    ]
    archive = b"".join(cpio_entry(name, mode, data, ino=i + 1, rdev=rdev)
                       for i, (name, mode, data, rdev) in enumerate(members))
    return archive + cpio_entry("TRAILER!!!", 0, ino=0)


def write_initrd(root: Path, release: str, busybox: Path, initrd: Path) -> None:
    modules = {}
    for path in list_initrd_modules(root, release):
        name = Path(path).name
        if name in modules:
            raise RuntimeError(f"two initrd modules named {name} for {release}")
        modules[name] = (root / path.lstrip("/")).read_bytes()
    initrd.write_bytes(render_initrd((GUEST / "init").read_bytes(), busybox.read_bytes(),
                                     modules))


def extract_vmlinux(vmlinuz: Path, vmlinux: Path) -> None:
    """Write the ELF inside an xz-compressed bzImage; nothing when the payload is not xz."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return
    elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise RuntimeError(f"the xz payload of {vmlinuz} is not an ELF")
    vmlinux.write_bytes(elf)


def extract_busybox(tmp: Path) -> Path:
    (deb,) = fetch_debs([BUSYBOX_PACKAGE], tmp / "debs")
    extract_deb(deb, tmp / "busybox")
    return tmp / "busybox/bin/busybox"


def write_root_image(root: Path, image: Path) -> None:
    used, inodes = disk_usage(root)
    size = -(-(used * 11 // 10 + FREE_SPACE) // (1 << 20)) << 20
    with open(image, "wb") as f:
        f.truncate(size)
    # Room for the inodes of a few driver bundles too.
    write_ext4(root, image, size=size, inodes=inodes + 65536, label="vm-root")


def build_into(out: Path) -> None:
    check_root_prerequisites(TOOLS, what="the VM image")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        root = Path(tmp) / "root"
        bootstrap_root(root, INCLUDE, what="the VM root")
        install_kernels(root)
        configure_root(root)
        busybox = extract_busybox(Path(tmp))
        for release in KERNEL_RELEASES:
            folder = out / "kernels" / release
            folder.mkdir(parents=True)
            shutil.copyfile(root / f"boot/vmlinuz-{release}", folder / "vmlinuz")
            extract_vmlinux(folder / "vmlinuz", folder / "vmlinux")
            write_initrd(root, release, busybox, folder / "initrd.img")
        remove_paths(root, DOCS_AND_CACHES)
        write_root_image(root, out / ROOT_IMAGE)


def load_image(out: Path) -> VmImage:
    kernels = {}
    for release in KERNEL_RELEASES:
        folder = out / "kernels" / release
        vmlinux = folder / "vmlinux"
        kernels[release] = Kernel(release, folder / "vmlinuz", folder / "initrd.img",
                                  vmlinux if vmlinux.exists() else None)
    return VmImage(root_image=out / ROOT_IMAGE, kernels=kernels)


def recipe() -> bytes:
    """What the result depends on: the builders' code (with every pin) and the guest files."""
    here = Path(__file__).parent
    parts = [(here / name).read_bytes() for name in RECIPE_SOURCES]
    for name, path in [("initrd/init", GUEST / "init"), *guest_files()]:
        parts += [name.encode(), path.read_bytes()]
    return b"\0".join(parts)


def build_vm_image() -> VmImage:
    """The cached VM image, built on first use (needs root; a few minutes)."""
    return load_image(build_cached("vm-image", recipe(), build_into))
