"""A Flatcar release server's worth of test inputs, in Flatcar's real formats.

The developer container is a Debian bookworm root (debootstrap minbase + gcc-12, make, kmod ...)
with Debian's prepared 6.1 kernel headers at /usr/lib/modules/<kver>/build and Flatcar's
release files, in an ext4 on partition 9 "ROOT" of a GPT disk laid out like Flatcar's, bzip2ed,
with a Gentoo `.DIGESTS`, a detached `.sig` from a test key shaped like Flatcar's (signing
subkey), `version.txt` and a release feed. server_root is a mirror in the project's layout:
`https://HOST/PATH` is served as `<server_root>/HOST/PATH`. Building needs root (debootstrap).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu.run import run
from testinputs.cache import build_cached
from testinputs.debian import RELEASE, apt_dir, debian_mirror, fetch_debs, find_debian_source
from testinputs.gpg import export_public_key, generate_signing_key, gnupg_home, sign_detached

VERSION = "3975.2.2"
BUILD_ID = "2024-10-23-2058"
SDK_VERSION = "3975.0.0"
CHANNEL = "stable"
BOARD = "amd64-usr"
APPID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"  # Flatcar's Omaha app id
OLD_VERSION = "3815.2.5"  # listed in the feed, never served: a 404 for tests
IMAGE = "flatcar_developer_container.bin.bz2"
RELEASE_HOST = f"{CHANNEL}.release.flatcar-linux.net"
FEED = f"www.flatcar.org/releases-json/releases-{CHANNEL}.json"
KEY = "www.flatcar.org/security/image-signing-key/Flatcar_Image_Signing_Key.asc"
KEY_UID = "Flatcar Buildbot (coreos-gpu test key) <buildbot@flatcar.example.invalid>"
OTHER_KEY_UID = "Someone Else (coreos-gpu test key) <someone@example.invalid>"

KERNEL_ABI = "6.1.0-50"
KERNEL_FLAVOUR = f"{KERNEL_ABI}-amd64"
# Pinned: a Debian point release moves bookworm to a new ABI; fetch_debs keeps these in its store.
KERNEL_PACKAGES = tuple(f"{name}=6.1.176-1" for name in (
    "linux-compiler-gcc-12-x86", "linux-kbuild-6.1", f"linux-headers-{KERNEL_ABI}-common",
    f"linux-headers-{KERNEL_FLAVOUR}"))
# Beyond minbase: the kernel packages' dependencies (gcc-12 for linux-compiler-gcc-12-x86,
# libssl3 and libelf1 for linux-kbuild), what kbuild runs (make, bc), what a module build
# on Flatcar's dev container can expect (kmod, xz-utils), and libc headers (gcc recommends them).
INCLUDE = ("gcc-12", "make", "libelf1", "libssl3", "kmod", "xz-utils", "bc", "libc6-dev")
# Big and not needed to build modules. Flatcar has no apt; the kernel links no sanitizer
# runtime and does LTO only with clang, so gcc's lto1 never runs.
STRIP = ("var/cache/apt/*", "var/lib/apt/lists/*", "usr/share/doc/*", "usr/share/man/*",
         "usr/share/info/*", "usr/share/locale/*", "usr/share/lintian/*", "var/log/*.log",
         "etc/apt/sources.list", "usr/lib/gcc/x86_64-linux-gnu/12/lto1",
         "usr/bin/*lto-dump-12", "usr/lib/x86_64-linux-gnu/lib*san.so*", "dev/*")
SHELL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

SECTOR = 512
ALIGN = 4096  # sectors: Flatcar aligns partitions to 2 MiB
# Flatcar's disk_layout.json in order on disk (5 ROOT-C and 8 have 0 blocks, so no entry);
# all but ROOT are one alignment unit here, since only ROOT's content matters.
PARTITIONS = (  # number, label, type GUID, partition GUID (Flatcar fixes USR-A/B's)
    (1, "EFI-SYSTEM", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", None),
    (2, "BIOS-BOOT", "21686148-6449-6E6F-744E-656564454649", None),
    (3, "USR-A", "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6", "7130C94A-213A-4E5A-8E26-6CCE9662F132"),
    (4, "USR-B", "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6", "E03DD35C-7C2D-4A47-B3FE-27F15780A57C"),
    (6, "OEM", "0FC63DAF-8483-4772-8E79-3D69D8477DE4", None),
    (7, "OEM-CONFIG", "C95DC21A-DF0E-4340-8D7B-26CBFA9A03E0", None),
    (9, "ROOT", "0FC63DAF-8483-4772-8E79-3D69D8477DE4", None),  # Linux data, as in "container"
)
# Which tool comes from which Debian package, for the preflight message.
TOOLS = {"debootstrap": "debootstrap", "chroot": "coreutils", "dpkg-deb": "dpkg",
         "mkfs.ext4": "e2fsprogs", "sgdisk": "gdisk", "gpg": "gpg", "gpgconf": "gpgconf",
         "gpg-agent": "gpg-agent", "bzip2": "bzip2"}
RECIPE_SOURCES = ("flatcar.py", "gpg.py", "debian.py", "cache.py")


@dataclass(frozen=True)
class FlatcarRelease:
    server_root: Path  # serve this folder over HTTP as the mirror
    version: str
    channel: str
    board: str
    kernel_release: str  # `uname -r`, from the image's utsrelease.h
    kernel_version: str  # the upstream version, as the release feed lists it
    key_fingerprint: str  # the signing key's primary key: what a verifier pins
    subkey_fingerprint: str  # the subkey that made the .sig: never to be pinned
    public_key: Path  # armored, the served Flatcar_Image_Signing_Key.asc
    image_sha512: str
    old_version: str  # in the feed, not served
    other_key_fingerprint: str  # an unrelated key, outside server_root
    other_public_key: Path
    other_key_sig: Path  # a .sig of the same image by the unrelated key

    @property
    def release_dir(self) -> Path:
        return self.server_root / RELEASE_HOST / self.board / self.version

    @property
    def image(self) -> Path:
        return self.release_dir / IMAGE


def sbin_tool(name: str) -> str:
    """The tool's path; root's tools live in sbin, which a non-login shell may lack in PATH."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SHELL_PATH}") or name


def check_build_prerequisites() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("building the Flatcar test release needs root (debootstrap, chroot)")
    missing = {tool: package for tool, package in TOOLS.items() if sbin_tool(tool) == tool}
    if missing:
        raise RuntimeError(f"the Flatcar test release needs {', '.join(missing)}: "
                           f"apt-get install {' '.join(sorted(set(missing.values())))}")


def in_root(root: Path, *argv: str) -> str:
    """Run argv chrooted into root, with a clean environment."""
    env = {"PATH": SHELL_PATH, "LC_ALL": "C", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}
    return run([sbin_tool("chroot"), root, *argv], env=env, what=f"running {argv[0]} in {root}"
               ).stdout


def bootstrap_root(root: Path) -> None:
    cache = apt_dir() / "debootstrap"  # keeps the .debs: a recipe change downloads nothing
    cache.mkdir(parents=True, exist_ok=True)
    source = find_debian_source()
    keyring = source.signed_by if source.signed_by and source.signed_by.startswith("/") else None
    run([sbin_tool("debootstrap"), "--variant=minbase", "--arch=amd64",
         f"--include={','.join(INCLUDE)}", f"--cache-dir={cache}",
         *([f"--keyring={keyring}"] if keyring else []),
         RELEASE, root, debian_mirror()], timeout=1800, what="debootstrap of the dev container",
        # debootstrap itself calls chroot and mknod from sbin.
        env={**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{SHELL_PATH}"})


def install_kernel_headers(root: Path) -> str:
    """Install the pinned headers with dpkg (so their dependencies are checked); → uname -r."""
    debs = fetch_debs(KERNEL_PACKAGES, root / "tmp/debs")
    in_root(root, "dpkg", "-i", *(f"/tmp/debs/{deb.name}" for deb in debs))
    shutil.rmtree(root / "tmp/debs")
    modules = root / "usr/lib/modules" / KERNEL_FLAVOUR
    # Debian's links are absolute: resolved from outside the root, they would reach the host's
    # /usr/src. Relative links resolve inside the root from anywhere.
    for link, tree in (("build", KERNEL_FLAVOUR), ("source", f"{KERNEL_ABI}-common")):
        (modules / link).unlink()
        (modules / link).symlink_to(f"../../../src/linux-headers-{tree}")
    uts = (modules / "build/include/generated/utsrelease.h").read_text()
    found = re.search(r'UTS_RELEASE "([^"]+)"', uts)
    if not found or found.group(1) != KERNEL_FLAVOUR:
        raise RuntimeError(f"unexpected utsrelease.h in {KERNEL_FLAVOUR}'s headers: {uts!r}")
    return found.group(1)


def read_kernel_version(root: Path) -> str:
    """The upstream version (e.g. 6.1.176) from the top Makefile's VERSION/PATCHLEVEL/SUBLEVEL."""
    text = (root / f"usr/src/linux-headers-{KERNEL_ABI}-common/Makefile").read_text()
    parts = [re.search(rf"^{key} = (\d+)$", text, re.M) for key in
             ("VERSION", "PATCHLEVEL", "SUBLEVEL")]
    return ".".join(p.group(1) if p else "?" for p in parts)


HELLO_C = """#include <linux/module.h>
static int __init hello_init(void) { return 0; }
static void __exit hello_exit(void) { }
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""


def check_module_build(root: Path, kernel_release: str) -> None:
    """Build a hello-world module in the root (about 1 s): a dev container whose tree cannot
    build modules would make every later test fail far from the cause."""
    hello = root / "tmp/hello"
    hello.mkdir()
    (hello / "hello.c").write_text(HELLO_C)
    (hello / "Kbuild").write_text("obj-m := hello.o\n")
    in_root(root, "make", "-C", f"/usr/lib/modules/{kernel_release}/build", "M=/tmp/hello",
            "modules")
    vermagic = in_root(root, "modinfo", "-F", "vermagic", "/tmp/hello/hello.ko").strip()
    if not vermagic.startswith(f"{kernel_release} "):
        raise RuntimeError(f"hello.ko built in the dev container has vermagic {vermagic!r}")
    shutil.rmtree(hello)


def render_release_files() -> dict[str, str]:
    """Flatcar's identity files, by path in the root."""
    return {
        "usr/share/flatcar/release": f"FLATCAR_RELEASE_VERSION={VERSION}\n"
        f"FLATCAR_RELEASE_BOARD={BOARD}\nFLATCAR_RELEASE_APPID={APPID}\n",
        "usr/lib/os-release": 'NAME="Flatcar Container Linux by Kinvolk"\nID=flatcar\n'
        f"ID_LIKE=coreos\nVERSION={VERSION}\nVERSION_ID={VERSION}\nBUILD_ID={BUILD_ID}\n"
        f'PRETTY_NAME="Flatcar Container Linux by Kinvolk {VERSION} (Oklo)"\n'
        f'HOME_URL="https://flatcar.org/"\nFLATCAR_BOARD="{BOARD}"\n',
    }


def build_root(root: Path) -> tuple[str, str]:
    """The dev container's root; → (kernel release, kernel version)."""
    bootstrap_root(root)
    kernel_release = install_kernel_headers(root)
    check_module_build(root, kernel_release)
    for name, text in render_release_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).unlink(missing_ok=True)  # Debian's os-release may be a link
        (root / name).write_text(text)
    for pattern in STRIP:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return kernel_release, read_kernel_version(root)


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inodes) the tree needs in an ext4."""
    blocks, inodes = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += 1 + len(filenames)
        for name in filenames:
            size = os.lstat(os.path.join(dirpath, name)).st_size
            blocks += -(-size // 4096)
        blocks += 1 + len(dirnames) // 100  # a directory's own blocks
    return blocks * 4096, inodes


def write_disk_image(root: Path, disk: Path) -> None:
    """A GPT disk laid out like Flatcar's, with root as an ext4 in partition 9.

    mkfs.ext4 writes the file system straight at partition 9's offset (-E offset): nothing is
    mounted or copied. Sizes leave ~10% free plus room for the journal.
    """
    used, inodes = disk_usage(root)
    fs_bytes = used * 11 // 10 + (48 << 20)
    fs_sectors = -(-fs_bytes // (ALIGN * SECTOR)) * ALIGN
    layout, start = [], ALIGN
    for number, label, type_guid, guid in PARTITIONS:
        size = fs_sectors if number == 9 else ALIGN
        layout += ["-n", f"{number}:{start}:{start + size - 1}", "-t", f"{number}:{type_guid}",
                   "-c", f"{number}:{label}", *(["-u", f"{number}:{guid}"] if guid else [])]
        root_start, start = start, start + size
    with open(disk, "wb") as f:
        f.truncate((start + ALIGN) * SECTOR)  # the tail holds the backup GPT
    run([sbin_tool("sgdisk"), *layout, disk], what="partitioning the dev container image")
    run([sbin_tool("mkfs.ext4"), "-q", "-F", "-b", "4096", "-N", str(inodes + 2048),
         "-L", "ROOT", "-d", root, "-E", f"offset={root_start * SECTOR}",
         disk, str(fs_sectors * SECTOR // 4096)], what="writing the ROOT file system")


def compress(raw: Path) -> Path:
    """raw → raw.bz2 (lbzip2 if present: same format, every core)."""
    tool = "lbzip2" if shutil.which("lbzip2") else "bzip2"
    run([tool, "-9", "-f", raw], what=f"compressing {raw.name}")
    return raw.with_name(raw.name + ".bz2")


def render_digests(path: Path) -> str:
    """Gentoo's `.DIGESTS`, as Flatcar publishes it: MD5, SHA1 and SHA512 sections."""
    hashes = {name: hashlib.new(name) for name in ("md5", "sha1", "sha512")}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashes.values():
                h.update(chunk)
    return "".join(f"# {name.upper()} HASH\n{h.hexdigest()}  {path.name}\n"
                   for name, h in hashes.items())


def render_version_txt() -> str:
    build, branch, patch = VERSION.split(".")
    return (f"FLATCAR_BUILD={build}\nFLATCAR_BRANCH={branch}\nFLATCAR_PATCH={patch}\n"
            f"FLATCAR_VERSION={VERSION}\nFLATCAR_VERSION_ID={VERSION}\n"
            f'FLATCAR_BUILD_ID="{BUILD_ID}"\nFLATCAR_SDK_VERSION={SDK_VERSION}\n')


def render_feed(kernel_version: str) -> str:
    """releases-stable.json: entries keyed by version, plus "current" (a copy of the newest)."""
    def entry(date: str, kernel: str, systemd: str, ignition: str) -> dict[str, object]:
        return {"channel": CHANNEL, "release_date": date,
                "major_software": {"kernel": [kernel], "docker": ["24.0.9"],
                                   "systemd": [systemd], "ignition": [ignition]},
                "release_notes": "A coreos-gpu test release (Debian's kernel and toolchain)."}
    current = entry(f"{BUILD_ID[:10]} 20:58:00 +0000", kernel_version, "255", "2.19.0")
    old = entry("2024-07-02 14:10:00 +0000", "6.1.96", "252", "2.14.0")
    return json.dumps({"current": current, VERSION: current, OLD_VERSION: old}, indent=2) + "\n"


def publish(out: Path, image: Path, kernel_version: str) -> dict[str, str]:
    """Lay out server/ as the mirror, sign the image; → the FlatcarRelease's text fields."""
    server = out / "server"
    release = server / RELEASE_HOST / BOARD / VERSION
    for folder in (release, (server / FEED).parent, (server / KEY).parent, out / "other"):
        folder.mkdir(parents=True)
    os.rename(image, release / IMAGE)
    digests = render_digests(release / IMAGE)
    (release / f"{IMAGE}.DIGESTS").write_text(digests)
    (release / "version.txt").write_text(render_version_txt())
    (release.parent / "current").symlink_to(VERSION)  # Flatcar serves a copy; same bytes
    (server / FEED).write_text(render_feed(kernel_version))
    with gnupg_home() as home, gnupg_home() as other_home:
        key = generate_signing_key(home, KEY_UID)
        other = generate_signing_key(other_home, OTHER_KEY_UID)
        export_public_key(key, server / KEY)
        export_public_key(other, out / "other/Other_Signing_Key.asc")
        sign_detached(key, release / IMAGE, release / f"{IMAGE}.sig")
        sign_detached(other, release / IMAGE, out / "other" / f"{IMAGE}.sig")
    return {"key_fingerprint": key.fingerprint, "subkey_fingerprint": key.subkey_fingerprint,
            "other_key_fingerprint": other.fingerprint,
            "image_sha512": digests.split("# SHA512 HASH\n")[1].split()[0]}


def build_into(out: Path) -> None:
    check_build_prerequisites()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        root = Path(tmp) / "root"
        kernel_release, kernel_version = build_root(root)
        raw = Path(tmp) / IMAGE.removesuffix(".bz2")
        write_disk_image(root, raw)
        shutil.rmtree(root)
        fields = publish(out, compress(raw), kernel_version)
    fields |= {"kernel_release": kernel_release, "kernel_version": kernel_version}
    (out / "release.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def load_release(out: Path) -> FlatcarRelease:
    fields = json.loads((out / "release.json").read_text())
    return FlatcarRelease(
        server_root=out / "server", version=VERSION, channel=CHANNEL, board=BOARD,
        public_key=out / "server" / KEY, old_version=OLD_VERSION,
        other_public_key=out / "other/Other_Signing_Key.asc",
        other_key_sig=out / "other" / f"{IMAGE}.sig", **fields)


def recipe() -> bytes:
    """What the result depends on: the builders' code (which holds every pin and option)."""
    here = Path(__file__).parent
    return b"".join((here / name).read_bytes() for name in RECIPE_SOURCES)


def build_flatcar_release() -> FlatcarRelease:
    """The cached Flatcar test release, built on first use (needs root; a few minutes)."""
    return load_release(build_cached("flatcar-release", recipe(), build_into))
