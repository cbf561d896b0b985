from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreos_gpu.config import Board, Channel, OsName
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.release import (
    feed_url,
    list_releases,
    mirrored,
    parse_feed,
    parse_version_txt,
    release_folder_url,
    resolve_release,
)

from .conftest import Mirror
from .test_fetch import Statuses, handler_with, served


@pytest.mark.parametrize(
    ("os", "channel", "mirror", "expected"),
    [
        (OsName.FLATCAR, Channel.STABLE, "",
         "https://stable.release.flatcar-linux.net/amd64-usr/3975.2.2/"),
        (OsName.FLATCAR, Channel.LTS, "",
         "https://lts.release.flatcar-linux.net/amd64-usr/3975.2.2/"),
        (OsName.COREOS, Channel.BETA, "",
         "https://beta.release.core-os.net/amd64-usr/3975.2.2/"),
        (OsName.FLATCAR, Channel.ALPHA, "http://10.0.0.1:8080/mirror/",
         "http://10.0.0.1:8080/mirror/alpha.release.flatcar-linux.net/amd64-usr/3975.2.2/"),
        (OsName.COREOS, Channel.STABLE, "file:///srv/mirror",
         "file:///srv/mirror/stable.release.core-os.net/amd64-usr/3975.2.2/"),
    ],
)
def test_release_folder_urls(os: OsName, channel: Channel, mirror: str, expected: str) -> None:
    assert release_folder_url(os, channel, Board.AMD64_USR, "3975.2.2", mirror) == expected


@pytest.mark.parametrize(
    ("os", "mirror", "expected"),
    [
        (OsName.FLATCAR, "", "https://www.flatcar.org/releases-json/releases-beta.json"),
        (OsName.COREOS, "", "https://coreos.com/releases/releases-beta.json"),
        (OsName.FLATCAR, "http://m", "http://m/www.flatcar.org/releases-json/releases-beta.json"),
    ],
)
def test_feed_urls(os: OsName, mirror: str, expected: str) -> None:
    assert feed_url(os, Channel.BETA, mirror) == expected


def test_mirror_maps_host_and_path() -> None:
    url = "https://us.download.nvidia.com/tesla/535.261.03/NVIDIA-Linux-x86_64-535.261.03.run"
    assert mirrored(url, "") == url
    assert mirrored(url, "http://127.0.0.1:9/") == (
        "http://127.0.0.1:9/us.download.nvidia.com/tesla/535.261.03/"
        "NVIDIA-Linux-x86_64-535.261.03.run")


def test_version_txt() -> None:
    text = ('FLATCAR_BUILD=3975\nFLATCAR_BRANCH=2\nFLATCAR_PATCH=2\nFLATCAR_VERSION=3975.2.2\n'
            'FLATCAR_BUILD_ID="2024-10-23-2058"\n# comment\n\nFLATCAR_SDK_VERSION=3975.0.0\n')
    values = parse_version_txt(text)
    assert values["FLATCAR_VERSION"] == "3975.2.2"
    assert values["FLATCAR_BUILD_ID"] == "2024-10-23-2058"
    assert values["FLATCAR_SDK_VERSION"] == "3975.0.0"
    assert parse_version_txt("COREOS_VERSION=2512.3.0\n") == {"COREOS_VERSION": "2512.3.0"}


FEED = {
    "current": {"channel": "stable", "release_date": "2024-10-23",
                "major_software": {"kernel": ["6.6.56"], "docker": ["24.0.9"]}},
    "3975.2.2": {"channel": "stable", "release_date": "2024-10-23",
                 "major_software": {"kernel": ["6.6.56"], "systemd": ["255"]},
                 "release_notes": "..."},
    "3815.2.5": {"channel": "stable", "release_date": "2024-07-01",
                 "major_software": {"kernel": ["6.1.96"]}},
    "4081.2.0": {"channel": "stable", "release_date": "2024-12-10", "major_software": {}},
}


def test_feed() -> None:
    feed = parse_feed(json.dumps(FEED), "feed")
    assert feed["3975.2.2"].kernel == "6.6.56"
    assert feed["4081.2.0"].kernel is None
    with pytest.raises(CoreosGpuError, match="is not JSON"):
        parse_feed("<html>", "feed")


def test_list_and_resolve_over_http(http_dir: Mirror, tmp_path: Path) -> None:
    site = http_dir.root / "www.flatcar.org" / "releases-json"
    site.mkdir(parents=True)
    (site / "releases-stable.json").write_text(json.dumps(FEED))
    current = http_dir.root / "stable.release.flatcar-linux.net" / "amd64-usr" / "current"
    current.mkdir(parents=True)
    (current / "version.txt").write_text("FLATCAR_VERSION=3975.2.2\n")
    (current.parent / "3975.2.2").symlink_to("current")
    kwargs = {"mirror": http_dir.url, "cache_dir": tmp_path, "offline": False}
    releases = list_releases(OsName.FLATCAR, Channel.STABLE, **kwargs)  # type: ignore[arg-type]
    assert [r.version for r in releases] == ["4081.2.0", "3975.2.2", "3815.2.5"]
    release = resolve_release(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "current",
                              **kwargs)  # type: ignore[arg-type]
    assert (release.version, release.feed_kernel) == ("3975.2.2", "6.6.56")
    assert release.image_url == (f"{http_dir.url}/stable.release.flatcar-linux.net/amd64-usr/"
                                 "3975.2.2/flatcar_developer_container.bin.bz2")
    assert release.sig_url == release.image_url + ".sig"
    assert release.canonical_image_url == ("https://stable.release.flatcar-linux.net/amd64-usr/"
                                           "3975.2.2/flatcar_developer_container.bin.bz2")
    assert resolve_release(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "3975.2.2",
                           **kwargs).feed_kernel == "6.6.56"  # type: ignore[arg-type]
    with pytest.raises(CoreosGpuError) as info:
        resolve_release(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "3815.2.5",
                        **kwargs)  # type: ignore[arg-type]
    assert info.value.code is ExitCode.DOWNLOAD
    assert info.value.message.startswith("flatcar stable has no release 3815.2.5: ")
    assert release.digests_url == release.image_url + ".DIGESTS"


def test_coreos_has_no_lts(tmp_path: Path) -> None:
    with pytest.raises(CoreosGpuError) as info:
        list_releases(OsName.COREOS, Channel.LTS, mirror="", cache_dir=tmp_path, offline=True)
    assert info.value.code is ExitCode.CONFIG
    assert info.value.message == "coreos has no 'lts' channel (allowed: stable, beta, alpha)"


VERSION_TXT = "/stable.release.flatcar-linux.net/amd64-usr/3975.2.2/version.txt"


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (404, f"flatcar stable has no release 3975.2.2: http://{{host}}{VERSION_TXT} gave "
         "HTTP 404"),
        (410, "flatcar stable has no release 3975.2.2: "),  # gone is as missing as not found
        (500, f"download of http://{{host}}{VERSION_TXT} failed: HTTP 500"),
        (403, f"download of http://{{host}}{VERSION_TXT} failed: HTTP 403"),
    ],
)
def test_a_missing_release_is_told_by_the_status(tmp_path: Path, status: int,
                                                 message: str) -> None:
    handler = handler_with(Statuses, requests=[], statuses={VERSION_TXT: status}, files={
        "/www.flatcar.org/releases-json/releases-stable.json": json.dumps(FEED).encode()})
    with served(handler) as base, pytest.raises(CoreosGpuError) as info:
        resolve_release(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "3975.2.2",
                        mirror=base, cache_dir=tmp_path, offline=False)
    assert info.value.code is ExitCode.DOWNLOAD
    assert info.value.message.startswith(message.format(host=base.removeprefix("http://")))


def test_a_file_mirror_without_the_release(tmp_path: Path) -> None:
    # An air-gapped site's file:// mirror: a file it lacks is what a 404 is over HTTP.
    feed = tmp_path / "mirror" / "www.flatcar.org/releases-json/releases-stable.json"
    feed.parent.mkdir(parents=True)
    kwargs = {"mirror": (tmp_path / "mirror").as_uri(), "cache_dir": tmp_path / "cache",
              "offline": False}
    with pytest.raises(CoreosGpuError) as info:
        list_releases(OsName.FLATCAR, Channel.STABLE, **kwargs)  # type: ignore[arg-type]
    assert info.value.code is ExitCode.DOWNLOAD
    assert info.value.message.endswith("releases-stable.json does not exist or is not a file")
    feed.write_text(json.dumps(FEED))
    with pytest.raises(CoreosGpuError) as info:
        resolve_release(OsName.FLATCAR, Channel.STABLE, Board.AMD64_USR, "3975.2.2",
                        **kwargs)  # type: ignore[arg-type]
    assert info.value.code is ExitCode.DOWNLOAD
    assert info.value.message.startswith("flatcar stable has no release 3975.2.2: file://")
    assert info.value.message.endswith("/version.txt does not exist")
