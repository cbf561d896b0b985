"""A Flatcar release server's worth of test inputs, in Flatcar's real formats.

Three releases across two channels. Stable: 3975.2.2, whose developer container has Debian's
6.1.0-50-amd64 kernel tree, and 4081.2.0, the release a node updates to, with the
6.1.0-50-cloud-amd64 one (another kernel for the same Debian package versions). Beta: 4081.1.0,
the release 4081.2.0 was promoted from, with the very same kernel tree as 4081.2.0 in an image
that differs only in its release files (what `sync` must not compile twice). Each developer
container is a Debian bookworm root (debootstrap minbase + gcc-12, make, kmod ...) with Debian's
prepared 6.1 kernel headers at /usr/lib/modules/<kver>/build and Flatcar's release files, in an
ext4 on partition 9 "ROOT" of a GPT disk laid out like Flatcar's, bzip2ed, with a Gentoo
`.DIGESTS`, a detached `.sig` from a test key shaped like Flatcar's (signing subkey) and
`version.txt` in the release's own folder; each channel's feed lists its releases.
A real-size variant, for benchmarks only, pads 3975.2.2's root to Flatcar's size
(testinputs/padding.py) in a ROOT partition of Flatcar's 6 GiB.
server_root is a mirror in the project's layout: `https://HOST/PATH` is served as
`<server_root>/HOST/PATH`. Building needs root (debootstrap); every root is a copy of one
debootstrap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu.run import run
from coreos_gpu.ui import step
from testinputs.cache import build_cached
from testinputs.debian import fetch_debs
from testinputs.debian_root import (
    DOCS_AND_CACHES,
    KERNEL_ABI,
    KERNEL_DEBIAN_VERSION,
    bootstrap_root,
    check_root_prerequisites,
    disk_usage,
    in_root,
    remove_paths,
    sbin_tool,
    write_ext4,
)
from testinputs.gpg import export_public_key, generate_signing_key, gnupg_home, sign_detached
from testinputs.padding import write_padding

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
BETA_CHANNEL = "beta"
KEY = "www.flatcar.org/security/image-signing-key/Flatcar_Image_Signing_Key.asc"
KEY_UID = "Flatcar Buildbot (coreos-gpu test key) <buildbot@flatcar.example.invalid>"
OTHER_KEY_UID = "Someone Else (coreos-gpu test key) <someone@example.invalid>"

KERNEL_FLAVOUR = f"{KERNEL_ABI}-amd64"
# What both flavours' headers need, installed once in the root the two are copied from.
COMMON_KERNEL_PACKAGES = tuple(f"{name}={KERNEL_DEBIAN_VERSION}" for name in (
    "linux-compiler-gcc-12-x86", "linux-kbuild-6.1", f"linux-headers-{KERNEL_ABI}-common"))


@dataclass(frozen=True)
class ReleaseSpec:
    """What differs between the served releases."""

    version: str
    build_id: str
    sdk_version: str
    kernel_flavour: str  # Debian's headers flavour, which is also `uname -r`
    systemd: str  # the feed's major_software, beside the kernel read from the tree
    ignition: str
    channel: str = CHANNEL

    @property
    def host(self) -> str:
        """The channel's release server (Flatcar's <channel>.release.flatcar-linux.net)."""
        return f"{self.channel}.release.flatcar-linux.net"


FIRST = ReleaseSpec(VERSION, BUILD_ID, SDK_VERSION, KERNEL_FLAVOUR, "255", "2.19.0")
# The release a node on FIRST updates to: another kernel (what the node must follow), the same
# Debian package versions (so the feed's upstream kernel version is the same too).
UPDATE = ReleaseSpec("4081.2.0", "2024-12-09-2231", "4081.1.0", f"{KERNEL_ABI}-cloud-amd64",
                     "255", "2.20.0")
# The beta UPDATE was promoted from: Flatcar numbers a major's beta releases <major>.1.<patch>
# and its stable ones <major>.2.<patch>, and a promotion keeps the kernel, so this image holds
# the same kernel tree as UPDATE's (.config, Module.symvers, compiler) and differs only in its
# release files.
BETA = ReleaseSpec("4081.1.0", "2024-11-19-2047", "4081.0.0", UPDATE.kernel_flavour,
                   "255", "2.20.0", channel=BETA_CHANNEL)
RELEASES = (FIRST, BETA, UPDATE)  # oldest first; a channel feed's "current" is its newest
CHANNELS = (CHANNEL, BETA_CHANNEL)
# Beyond minbase: the kernel packages' dependencies (gcc-12 for linux-compiler-gcc-12-x86,
# libssl3 and libelf1 for linux-kbuild), what kbuild runs (make, bc), what a module build
# on Flatcar's dev container can expect (kmod, xz-utils), and libc headers (gcc recommends them).
INCLUDE = ("gcc-12", "make", "libelf1", "libssl3", "kmod", "xz-utils", "bc", "libc6-dev")
# Big and not needed to build modules. Flatcar has no apt; the kernel links no sanitizer
# runtime and does LTO only with clang, so gcc's lto1 never runs.
STRIP = (*DOCS_AND_CACHES, "usr/lib/gcc/x86_64-linux-gnu/12/lto1", "usr/bin/*lto-dump-12",
         "usr/lib/x86_64-linux-gnu/lib*san.so*")

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
# The real-size variant's ROOT: the "container" layout's 12582912 sectors (6 GiB) in
# flatcar/scripts build_library/disk_layout.json.
REAL_SIZE_ROOT_SECTORS = 12_582_912
# Which tool comes from which Debian package, for the preflight message.
TOOLS = {"debootstrap": "debootstrap", "chroot": "coreutils", "dpkg-deb": "dpkg",
         "mkfs.ext4": "e2fsprogs", "sgdisk": "gdisk", "gpg": "gpg", "gpgconf": "gpgconf",
         "gpg-agent": "gpg-agent", "bzip2": "bzip2"}
RECIPE_SOURCES = ("flatcar.py", "gpg.py", "debian.py", "debian_root.py", "cache.py")
REAL_SIZE_RECIPE_SOURCES = (*RECIPE_SOURCES, "padding.py")


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
    update: ServedRelease  # the newer release (the feed's "current"), on another kernel
    beta: ServedRelease  # the beta release, on the same kernel tree as update

    @property
    def release_dir(self) -> Path:
        return self.server_root / RELEASE_HOST / self.board / self.version

    @property
    def image(self) -> Path:
        return self.release_dir / IMAGE


@dataclass(frozen=True)
class ServedRelease:
    """One more release on the same server, in the same feed, signed by the same key."""

    release_dir: Path
    version: str
    channel: str
    kernel_release: str  # `uname -r`, from the image's utsrelease.h
    kernel_version: str  # the upstream version, as the release feed lists it
    image_sha512: str

    @property
    def image(self) -> Path:
        return self.release_dir / IMAGE


def check_build_prerequisites() -> None:
    check_root_prerequisites(TOOLS, what="the Flatcar test release")


def install_packages(root: Path, specs: tuple[str, ...]) -> None:
    """Install pinned packages with dpkg (so their dependencies are checked)."""
    debs = fetch_debs(specs, root / "tmp/debs")
    in_root(root, "dpkg", "-i", *(f"/tmp/debs/{deb.name}" for deb in debs))
    shutil.rmtree(root / "tmp/debs")


def install_kernel_headers(root: Path, flavour: str) -> str:
    """Install one flavour's headers over COMMON_KERNEL_PACKAGES; → uname -r."""
    install_packages(root, (f"linux-headers-{flavour}={KERNEL_DEBIAN_VERSION}",))
    modules = root / "usr/lib/modules" / flavour
    # Debian's links are absolute: resolved from outside the root, they would reach the host's
    # /usr/src. Relative links resolve inside the root from anywhere.
    for link, tree in (("build", flavour), ("source", f"{KERNEL_ABI}-common")):
        (modules / link).unlink()
        (modules / link).symlink_to(f"../../../src/linux-headers-{tree}")
    uts = (modules / "build/include/generated/utsrelease.h").read_text()
    found = re.search(r'UTS_RELEASE "([^"]+)"', uts)
    if not found or found.group(1) != flavour:
        raise RuntimeError(f"unexpected utsrelease.h in {flavour}'s headers: {uts!r}")
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


def render_release_files(spec: ReleaseSpec = FIRST) -> dict[str, str]:
    """Flatcar's identity files, by path in the root."""
    version = spec.version
    return {
        "usr/share/flatcar/release": f"FLATCAR_RELEASE_VERSION={version}\n"
        f"FLATCAR_RELEASE_BOARD={BOARD}\nFLATCAR_RELEASE_APPID={APPID}\n",
        "usr/lib/os-release": 'NAME="Flatcar Container Linux by Kinvolk"\nID=flatcar\n'
        f"ID_LIKE=coreos\nVERSION={version}\nVERSION_ID={version}\nBUILD_ID={spec.build_id}\n"
        f'PRETTY_NAME="Flatcar Container Linux by Kinvolk {version} (Oklo)"\n'
        f'HOME_URL="https://flatcar.org/"\nFLATCAR_BOARD="{BOARD}"\n',
    }


def build_base_root(root: Path) -> None:
    """What every release's dev container shares: debootstrap and the flavour-less kernel
    packages (a minute or more; done once, then copied)."""
    bootstrap_root(root, INCLUDE, what="the dev container")
    install_packages(root, COMMON_KERNEL_PACKAGES)


def finish_root(root: Path, spec: ReleaseSpec) -> tuple[str, str]:
    """Turn a copy of the base root into spec's dev container; → (kernel release, version)."""
    kernel_release = install_kernel_headers(root, spec.kernel_flavour)
    check_module_build(root, kernel_release)
    for name, text in render_release_files(spec).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).unlink(missing_ok=True)  # Debian's os-release may be a link
        (root / name).write_text(text)
    remove_paths(root, STRIP)
    return kernel_release, read_kernel_version(root)


def write_disk_image(root: Path, disk: Path, *, root_sectors: int | None = None) -> None:
    """A GPT disk laid out like Flatcar's, with root as an ext4 in partition 9.

    mkfs.ext4 writes the file system straight at partition 9's offset (-E offset): nothing is
    mounted or copied. Unless root_sectors fixes ROOT's size, sizes leave ~10% free plus room
    for the journal.
    """
    used, inodes = disk_usage(root)
    fs_bytes = used * 11 // 10 + (48 << 20)
    fs_sectors = -(-fs_bytes // (ALIGN * SECTOR)) * ALIGN
    if root_sectors is not None:
        if used + (256 << 20) > root_sectors * SECTOR:  # the journal and inode tables
            raise RuntimeError(f"the root needs {used >> 20} MiB: more than a ROOT of "
                               f"{root_sectors * SECTOR >> 20} MiB holds")
        fs_sectors = root_sectors
    layout, start = [], ALIGN
    for number, label, type_guid, guid in PARTITIONS:
        size = fs_sectors if number == 9 else ALIGN
        layout += ["-n", f"{number}:{start}:{start + size - 1}", "-t", f"{number}:{type_guid}",
                   "-c", f"{number}:{label}", *(["-u", f"{number}:{guid}"] if guid else [])]
        root_start, start = start, start + size
    with open(disk, "wb") as f:
        f.truncate((start + ALIGN) * SECTOR)  # the tail holds the backup GPT
    run([sbin_tool("sgdisk"), *layout, disk], what="partitioning the dev container image")
    write_ext4(root, disk, size=fs_sectors * SECTOR, inodes=inodes + 2048, label="ROOT",
               offset=root_start * SECTOR)


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


def render_version_txt(spec: ReleaseSpec = FIRST) -> str:
    version = spec.version
    build, branch, patch = version.split(".")
    return (f"FLATCAR_BUILD={build}\nFLATCAR_BRANCH={branch}\nFLATCAR_PATCH={patch}\n"
            f"FLATCAR_VERSION={version}\nFLATCAR_VERSION_ID={version}\n"
            f'FLATCAR_BUILD_ID="{spec.build_id}"\nFLATCAR_SDK_VERSION={spec.sdk_version}\n')


def render_feed(kernel_versions: dict[str, str], channel: str = CHANNEL) -> str:
    """releases-<channel>.json: the channel's entries keyed by version (newest first), plus
    "current" (a copy of the newest). kernel_versions: the upstream kernel version of each of
    RELEASES, by version. The stable feed also lists OLD_VERSION, which is never served."""
    def entry(date: str, kernel: str, systemd: str, ignition: str) -> dict[str, object]:
        return {"channel": channel, "release_date": date,
                "major_software": {"kernel": [kernel], "docker": ["24.0.9"],
                                   "systemd": [systemd], "ignition": [ignition]},
                "release_notes": "A coreos-gpu test release (Debian's kernel and toolchain)."}
    specs = [spec for spec in reversed(RELEASES) if spec.channel == channel]
    entries = {spec.version: entry(f"{spec.build_id[:10]} 20:58:00 +0000",
                                   kernel_versions[spec.version], spec.systemd, spec.ignition)
               for spec in specs}
    if channel == CHANNEL:
        entries[OLD_VERSION] = entry("2024-07-02 14:10:00 +0000", "6.1.96", "252", "2.14.0")
    return json.dumps({"current": entries[specs[0].version], **entries}, indent=2) + "\n"


def feed_path(channel: str) -> str:
    return f"www.flatcar.org/releases-json/releases-{channel}.json"


def newest(channel: str) -> ReleaseSpec:
    return [spec for spec in RELEASES if spec.channel == channel][-1]


def publish_release(server: Path, spec: ReleaseSpec, image: Path) -> tuple[Path, str]:
    """Put one release's image, DIGESTS and version.txt in its folder; → (folder, SHA512)."""
    release = server / spec.host / BOARD / spec.version
    release.mkdir(parents=True)
    os.rename(image, release / IMAGE)
    digests = render_digests(release / IMAGE)
    (release / f"{IMAGE}.DIGESTS").write_text(digests)
    (release / "version.txt").write_text(render_version_txt(spec))
    return release, digests.split("# SHA512 HASH\n")[1].split()[0]


def publish(out: Path, images: dict[str, Path], kernel_versions: dict[str, str]
            ) -> tuple[dict[str, str], dict[str, str]]:
    """Lay out server/ as the mirror with each of RELEASES (images: by version), sign the
    images; → (the keys' fields of release.json, each image's SHA512 by version)."""
    server = out / "server"
    for folder in ((server / FEED).parent, (server / KEY).parent, out / "other"):
        folder.mkdir(parents=True)
    for channel in CHANNELS:
        (server / feed_path(channel)).write_text(render_feed(kernel_versions, channel))
    folders, sha512s = {}, {}
    for spec in RELEASES:
        folders[spec.version], sha512s[spec.version] = publish_release(
            server, spec, images[spec.version])
    # Flatcar serves a copy of each channel's newest; a link has the same bytes.
    for channel in CHANNELS:
        spec = newest(channel)
        (server / spec.host / BOARD / "current").symlink_to(spec.version)
    first = folders[FIRST.version]
    with gnupg_home() as home, gnupg_home() as other_home:
        key = generate_signing_key(home, KEY_UID)
        other = generate_signing_key(other_home, OTHER_KEY_UID)
        export_public_key(key, server / KEY)
        export_public_key(other, out / "other/Other_Signing_Key.asc")
        for folder in folders.values():
            sign_detached(key, folder / IMAGE, folder / f"{IMAGE}.sig")
        sign_detached(other, first / IMAGE, out / "other" / f"{IMAGE}.sig")
    return ({"key_fingerprint": key.fingerprint, "subkey_fingerprint": key.subkey_fingerprint,
             "other_key_fingerprint": other.fingerprint}, sha512s)


def build_image(base: Path, spec: ReleaseSpec, tmp: Path, *, copy: bool,
                pad: bool = False) -> dict[str, str]:
    """spec's compressed image in tmp, from a copy of base (or base itself, when not copy),
    padded to Flatcar's real size when pad; → its kernel_release, kernel_version and image
    path."""
    with step(f"the Flatcar test release {spec.version} ({spec.kernel_flavour})"):
        root = tmp / f"root-{spec.version}"
        if copy:
            run(["cp", "-a", "--reflink=auto", base, root], what="copying the dev container")
        else:
            base.rename(root)
        kernel_release, kernel_version = finish_root(root, spec)
        if pad:
            with step("padding it to Flatcar's size (~6 GB in ~10^5 files)"):
                write_padding(root)
        raw = tmp / f"{spec.version}-{IMAGE.removesuffix('.bz2')}"
        write_disk_image(root, raw, root_sectors=REAL_SIZE_ROOT_SECTORS if pad else None)
        shutil.rmtree(root)
        return {"kernel_release": kernel_release, "kernel_version": kernel_version,
                "image": str(compress(raw))}


def build_into(out: Path, *, real_size: bool = False) -> None:
    """The releases in out; when real_size, FIRST's image has Flatcar's real size (the others
    stay small: the benchmarks prepare FIRST only, and the feed and keys stay whole)."""
    check_build_prerequisites()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        base = Path(tmp) / "base"
        with step("the Flatcar test releases' shared root (debootstrap, kernel packages)"):
            build_base_root(base)
        built = {spec.version: build_image(base, spec, Path(tmp), copy=spec != RELEASES[-1],
                                           pad=real_size and spec == FIRST)
                 for spec in RELEASES}
        kernel_versions = {version: b["kernel_version"] for version, b in built.items()}
        keys, sha512s = publish(out, {v: Path(b["image"]) for v, b in built.items()},
                                kernel_versions)
    releases = {version: {"kernel_release": b["kernel_release"],
                          "kernel_version": b["kernel_version"], "image_sha512": sha512s[version]}
                for version, b in built.items()}
    (out / "release.json").write_text(json.dumps(
        {**keys, "releases": releases}, indent=2, sort_keys=True) + "\n")


def load_release(out: Path) -> FlatcarRelease:
    fields = json.loads((out / "release.json").read_text())
    releases = fields.pop("releases")
    def served(spec: ReleaseSpec) -> ServedRelease:
        return ServedRelease(release_dir=out / "server" / spec.host / BOARD / spec.version,
                             version=spec.version, channel=spec.channel,
                             **releases[spec.version])

    return FlatcarRelease(
        server_root=out / "server", version=VERSION, channel=CHANNEL, board=BOARD,
        public_key=out / "server" / KEY, old_version=OLD_VERSION,
        other_public_key=out / "other/Other_Signing_Key.asc",
        other_key_sig=out / "other" / f"{IMAGE}.sig",
        update=served(UPDATE), beta=served(BETA),
        **fields, **releases[VERSION])


def recipe(sources: tuple[str, ...] = RECIPE_SOURCES) -> bytes:
    """What the result depends on: the builders' code (which holds every pin and option)."""
    here = Path(__file__).parent
    return b"".join((here / name).read_bytes() for name in sources)


def build_flatcar_release(*, real_size: bool = False) -> FlatcarRelease:
    """The cached Flatcar test release, built on first use (needs root; a few minutes).

    real_size: the variant whose 3975.2.2 image has Flatcar's real size (~480 MB compressed,
    a 6 GiB ROOT holding ~6 GB in ~10^5 files), cached apart, for benchmarks only, never for
    CI's tests: building it takes ~15 min on 2 cores and ~13 GB of free disk on the way.
    """
    if real_size:
        return load_release(build_cached(
            "flatcar-release-real-size", recipe(REAL_SIZE_RECIPE_SOURCES),
            functools.partial(build_into, real_size=True)))
    return load_release(build_cached("flatcar-release", recipe(), build_into))
