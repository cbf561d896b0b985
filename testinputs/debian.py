"""Debian packages for test inputs, fetched from the mirror this machine's apt already uses.

No mirror host is written here: the mirror is read from /etc/apt (deb822 `*.sources` files and
one-line `sources.list` entries), and apt runs on a private sources file, list dir and cache under
the test-input cache, so the machine's own apt state is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from coreos_gpu.cache import locked
from coreos_gpu.run import run
from testinputs.cache import cache_root

RELEASE = "bookworm"
SUITES = (RELEASE, f"{RELEASE}-updates")
# Security is left out on purpose: every pin is a bookworm version, and its index is the one
# that breaks most often on mirrors mid-sync ("File has unexpected size").
COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")
# i386 for the one 32-bit library a driver package carries (32/libcuda.so).
ARCHITECTURES = "amd64,i386"
ETC_APT = Path("/etc/apt")


@dataclass(frozen=True)
class AptSource:
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Parse a deb822 `.sources` file; stanzas with `Enabled: no` are skipped."""
    sources = []
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        sources.append(
            AptSource(
                types=tuple(stanza.get("types", "").split()),
                uris=tuple(u.rstrip("/") for u in stanza.get("uris", "").split()),
                suites=tuple(stanza.get("suites", "").split()),
                components=tuple(stanza.get("components", "").split()),
                signed_by=stanza.get("signed-by", "").strip() or None,
            )
        )
    return sources


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            # A continuation line (e.g. an inline Signed-By key); " ." stands for an empty line.
            value = line.strip()
            current[key] += "\n" + ("" if value == "." else value)
        else:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Parse one-line entries: `deb [opt=value ...] URI SUITE [COMPONENT ...]`."""
    sources = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 3:
            continue
        options: dict[str, str] = {}
        if words[1].startswith("["):
            end = next((i for i, w in enumerate(words) if w.endswith("]")), None)
            if end is None:
                continue
            for option in " ".join(words[1 : end + 1]).strip("[] ").split():
                name, _, value = option.partition("=")
                options[name] = value
            words = [words[0], *words[end + 1 :]]
        if len(words) < 3:
            continue
        sources.append(
            AptSource(
                types=(words[0],),
                uris=(words[1].rstrip("/"),),
                suites=(words[2],),
                components=tuple(words[3:]),
                signed_by=options.get("signed-by"),
            )
        )
    return sources


def read_apt_sources(etc_apt: Path = ETC_APT) -> list[AptSource]:
    sources = []
    one_line = [etc_apt / "sources.list", *sorted(etc_apt.glob("sources.list.d/*.list"))]
    for path in one_line:
        if path.is_file():
            sources += parse_one_line_sources(path.read_text())
    for path in sorted(etc_apt.glob("sources.list.d/*.sources")):
        sources += parse_deb822_sources(path.read_text())
    return sources


def find_debian_source(etc_apt: Path = ETC_APT) -> AptSource:
    """The first binary source that serves Debian's release suite (not security, not a PPA)."""
    for source in read_apt_sources(etc_apt):
        if "deb" in source.types and RELEASE in source.suites and source.uris:
            return source
    raise RuntimeError(
        f"no apt source for Debian {RELEASE} in {etc_apt}/sources.list or "
        f"{etc_apt}/sources.list.d/: add one (the test inputs are built from Debian packages)"
    )


def debian_mirror(etc_apt: Path = ETC_APT) -> str:
    """The Debian archive URI this machine's apt uses, e.g. for debootstrap."""
    return find_debian_source(etc_apt).uris[0]


def render_private_sources(source: AptSource) -> str:
    """A deb822 sources file for SUITES with every component, on source's mirror and key."""
    fields = {
        "Types": "deb",
        "URIs": source.uris[0],
        "Suites": " ".join(SUITES),
        "Components": " ".join(COMPONENTS),
    }
    if source.signed_by:
        lines = source.signed_by.split("\n")
        fields["Signed-By"] = "\n".join([lines[0], *(f" {x or '.'}" for x in lines[1:])])
    return "".join(f"{key}: {value}\n" for key, value in fields.items())


def apt_dir() -> Path:
    return cache_root() / "debian"


def apt_options(base: Path) -> list[str]:
    settings = {
        "Dir::Etc::SourceList": base / "debian.sources",
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::State::Lists": base / "lists",
        "Dir::Cache": base / "cache",
        "APT::Architectures": ARCHITECTURES,
    }
    return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]


def deb_file_glob(spec: str) -> str:
    """The file name pattern apt gives `NAME[:ARCH]=VERSION` (epoch colons become %3a)."""
    package, _, version = spec.partition("=")
    name, _, arch = package.partition(":")
    # apt writes the escape in lower case; quote() writes %3A, which a glob would not match.
    return f"{name}_{quote(version, safe='~+.-').replace('%3A', '%3a')}_{arch or '*'}.deb"


def find_deb(store: Path, spec: str) -> Path | None:
    arch = spec.partition("=")[0].partition(":")[2]
    for path in sorted(store.glob(deb_file_glob(spec))):
        if arch or path.name.endswith(("_amd64.deb", "_all.deb")):
            return path
    return None


def fetch_debs(specs: Sequence[str], dest: Path) -> list[Path]:
    """Put the packages `NAME[:ARCH]=VERSION` into dest, in the order given.

    Downloads go through apt (which checks them against the signed index) into a shared store,
    so a rebuild needs no network once a package has been fetched.
    """
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"unpinned package {spec!r}: give NAME=VERSION")
    base = apt_dir()
    store = base / "debs"
    store.mkdir(parents=True, exist_ok=True)
    with locked(base / "lock"):
        missing = [spec for spec in specs if find_deb(store, spec) is None]
        if missing:
            download_debs(base, missing, store)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in specs:
        found = find_deb(store, spec)
        if found is None:
            raise RuntimeError(f"apt-get download {spec} produced no matching .deb in {store}")
        paths.append(link_or_copy(found, dest / found.name))
    return paths


def download_debs(base: Path, specs: Sequence[str], store: Path) -> None:
    (base / "debian.sources").write_text(render_private_sources(find_debian_source()))
    for sub in ("lists/partial", "cache/archives/partial"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    options = apt_options(base)
    run(["apt-get", *options, "update"])
    # Download into a temp dir first: only files apt finished and verified enter the store.
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        run(["apt-get", *options, "download", *specs], cwd=Path(tmp))
        for path in Path(tmp).glob("*.deb"):
            os.replace(path, store / path.name)


def link_or_copy(src: Path, dst: Path) -> Path:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files (not its maintainer scripts) into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest])
