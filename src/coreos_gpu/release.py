"""Release stage: (OS, channel, board, version) → `OsRelease` with every URL the build needs.

Flatcar and CoreOS publish the same shapes: `https://<channel>.release.<domain>/<board>/<version>/`
holds the developer container, its `.DIGESTS` and `.sig`, and `version.txt`; a JSON feed per
channel lists releases with their kernel versions.

A mirror replaces every host: `https://HOST/PATH` is fetched as `<mirror>/HOST/PATH`, the layout
`wget --mirror` makes, so one mirror can serve both OSes, every channel, and NVIDIA's files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from coreos_gpu.config import Board, Channel, OsName
from coreos_gpu.errors import CoreosGpuError, DownloadError, ExitCode
from coreos_gpu.fetch import fetch_file


@dataclass(frozen=True)
class OsScheme:
    image_host: str  # with {channel}
    image_prefix: str  # flatcar_ / coreos_
    version_key: str  # the version.txt key that holds the release version
    feed_url: str  # with {channel}
    signing_key_url: str
    # The primary key's fingerprint; signatures come from rotating subkeys, never pin those.
    fingerprint: str
    channels: tuple[Channel, ...]


SCHEMES = {
    OsName.FLATCAR: OsScheme(
        image_host="{channel}.release.flatcar-linux.net",
        image_prefix="flatcar_",
        version_key="FLATCAR_VERSION",
        feed_url="https://www.flatcar.org/releases-json/releases-{channel}.json",
        signing_key_url="https://www.flatcar.org/security/image-signing-key/"
        "Flatcar_Image_Signing_Key.asc",
        fingerprint="F88CFEDEFF29A5B4D9523864E25D9AED0593B34A",
        channels=(Channel.STABLE, Channel.BETA, Channel.ALPHA, Channel.LTS),
    ),
    # Container Linux reached its end of life on 2020-05-26; these hosts are gone, so CoreOS
    # is only reachable through a mirror that keeps their layout.
    OsName.COREOS: OsScheme(
        image_host="{channel}.release.core-os.net",
        image_prefix="coreos_",
        version_key="COREOS_VERSION",
        feed_url="https://coreos.com/releases/releases-{channel}.json",
        signing_key_url="https://coreos.com/security/image-signing-key/"
        "CoreOS_Image_Signing_Key.asc",
        fingerprint="04127D0BFABEC8871FFB2CCE50E0885593D2DCB4",
        channels=(Channel.STABLE, Channel.BETA, Channel.ALPHA),
    ),
}

_VERSION = re.compile(r"\d+\.\d+\.\d+")


def mirrored(url: str, mirror: str) -> str:
    """The URL to fetch: the original, or `<mirror>/HOST/PATH` when a mirror is set."""
    if not mirror:
        return url
    parts = urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


@dataclass(frozen=True)
class OsRelease:
    os: OsName
    channel: Channel
    board: Board
    version: str
    # From the release feed where it lists the release (a version like "6.6.60"); the image's
    # own kernel build tree is what counts, and the developer container stage confirms it.
    feed_kernel: str | None
    base_url: str  # the release folder, mirror applied, ending in "/"

    @property
    def image_name(self) -> str:
        return f"{SCHEMES[self.os].image_prefix}developer_container.bin.bz2"

    @property
    def image_url(self) -> str:
        return self.base_url + self.image_name

    @property
    def canonical_image_url(self) -> str:
        """The image's URL on the OS's own server, whatever mirror served it: what a bundle
        records, so the same image gives the same bundle from any mirror."""
        return release_folder_url(self.os, self.channel, self.board, self.version,
                                  "") + self.image_name

    @property
    def digests_url(self) -> str:
        return self.image_url + ".DIGESTS"

    @property
    def sig_url(self) -> str:
        return self.image_url + ".sig"


@dataclass(frozen=True)
class FeedEntry:
    version: str
    kernel: str | None
    release_date: str


def check_channel(os: OsName, channel: Channel) -> None:
    if channel not in SCHEMES[os].channels:
        allowed = ", ".join(c.value for c in SCHEMES[os].channels)
        raise CoreosGpuError(f"{os.value} has no {channel.value!r} channel (allowed: {allowed})",
                             code=ExitCode.CONFIG)


def release_folder_url(os: OsName, channel: Channel, board: Board, version: str,
                       mirror: str) -> str:
    host = SCHEMES[os].image_host.format(channel=channel.value)
    return mirrored(f"https://{host}/{board.value}/{version}/", mirror)


def feed_url(os: OsName, channel: Channel, mirror: str) -> str:
    return mirrored(SCHEMES[os].feed_url.format(channel=channel.value), mirror)


def parse_version_txt(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines, values optionally quoted, as in Flatcar's and CoreOS's version.txt."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            values[key] = value.strip().strip("\"'")
    return values


def parse_feed(text: str, source: str) -> dict[str, FeedEntry]:
    """A release feed → entries by version (and "current" where the feed has it)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CoreosGpuError(f"release feed {source} is not JSON: {e}",
                             code=ExitCode.DOWNLOAD) from e
    if not isinstance(data, dict):
        raise CoreosGpuError(f"release feed {source} is not a JSON object",
                             code=ExitCode.DOWNLOAD)
    entries: dict[str, FeedEntry] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict):
            continue
        software = entry.get("major_software") or {}
        kernels = software.get("kernel") if isinstance(software, dict) else None
        kernel = kernels[0] if isinstance(kernels, list) and kernels else None
        version = entry.get("version", key) if key == "current" else key
        entries[key] = FeedEntry(str(version), kernel, str(entry.get("release_date", "")))
    return entries


def read_feed(os: OsName, channel: Channel, *, mirror: str, cache_dir: Path,
              offline: bool) -> dict[str, FeedEntry]:
    url = feed_url(os, channel, mirror)
    path = fetch_file(url, cache_dir, offline=offline, fresh=True)
    return parse_feed(path.read_text(encoding="utf-8", errors="replace"), url)


def list_releases(os: OsName, channel: Channel, *, mirror: str, cache_dir: Path,
                  offline: bool) -> list[FeedEntry]:
    """The channel's releases, newest first."""
    check_channel(os, channel)
    feed = read_feed(os, channel, mirror=mirror, cache_dir=cache_dir, offline=offline)
    releases = [e for key, e in feed.items() if key != "current" and _VERSION.fullmatch(key)]
    return sorted(releases, key=lambda e: tuple(int(x) for x in e.version.split(".")),
                  reverse=True)


def resolve_release(os: OsName, channel: Channel, board: Board, version: str, *, mirror: str,
                    cache_dir: Path, offline: bool) -> OsRelease:
    """Turn a version (or "current") into an OsRelease, checked against its version.txt.

    version.txt is tiny: fetching it first tells a missing release (HTTP 404) apart from a
    release whose checksum or signature is missing, and says which release "current" is.
    """
    check_channel(os, channel)
    url = release_folder_url(os, channel, board, version, mirror) + "version.txt"
    try:
        text = fetch_file(url, cache_dir, offline=offline,
                          fresh=version == "current").read_text(errors="replace")
    except DownloadError as e:
        if not e.not_found:
            raise
        found = f"gave HTTP {e.status}" if e.status else "does not exist"
        raise CoreosGpuError(
            f"{os.value} {channel.value} has no release {version}: {url} {found}",
            hint=f"coreos-gpu releases --os {os.value} --channel {channel.value} lists them",
            code=ExitCode.DOWNLOAD) from e
    named = parse_version_txt(text).get(SCHEMES[os].version_key, "")
    if not _VERSION.fullmatch(named) or version not in ("current", named):
        raise CoreosGpuError(
            f"{url} names release {named or 'none'} ({SCHEMES[os].version_key}=), "
            f"not {version}", code=ExitCode.DOWNLOAD)
    version = named
    try:
        feed = read_feed(os, channel, mirror=mirror, cache_dir=cache_dir, offline=offline)
    except CoreosGpuError as e:
        if e.code is not ExitCode.DOWNLOAD:
            raise
        feed = {}  # mirrors need not carry the feed; the image itself names its kernel
    entry = feed.get(version)
    return OsRelease(os=os, channel=channel, board=board, version=version,
                     feed_kernel=entry.kernel if entry else None,
                     base_url=release_folder_url(os, channel, board, version, mirror))
