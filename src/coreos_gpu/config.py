"""Settings: declared once, read from defaults, a TOML file and flags, frozen into BuildConfig.

Each setting is one `Setting` row; its TOML key, CLI flag, default and validation come from
that row. Precedence is explicit: flag > config file > default.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any

from coreos_gpu.errors import CoreosGpuError, ExitCode

DEFAULT_CONFIG_FILE = "coreos-gpu.toml"


class OsName(StrEnum):
    FLATCAR = "flatcar"
    COREOS = "coreos"


class Channel(StrEnum):
    STABLE = "stable"
    BETA = "beta"
    ALPHA = "alpha"
    LTS = "lts"


class Board(StrEnum):
    # NVIDIA's x86_64 .run is what we build from; arm64 boards would need the aarch64 .run.
    AMD64_USR = "amd64-usr"


class Profile(StrEnum):
    COMPUTE = "compute"
    FULL = "full"


class KernelModuleType(StrEnum):
    PROPRIETARY = "proprietary"
    OPEN = "open"


class Compression(StrEnum):
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"


class DriverFailurePolicy(StrEnum):
    """What the Mesos agent does when nvidia.service fails."""

    START_WITHOUT_GPUS = "start-without-gpus"
    WAIT = "wait"


class Persistence(StrEnum):
    """How a node keeps its GPUs initialised while no process holds them open."""

    DAEMON = "daemon"  # nvidia-persistenced.service: NVIDIA's way
    LEGACY = "legacy"  # nvidia-smi -pm 1 at boot, the kernel's persistence mode (deprecated)
    OFF = "off"


class Agent(StrEnum):
    """What starts the GPU containers on a node: a preset of the units that must start after
    the driver (AGENT_PRESET_UNITS)."""

    MESOS = "mesos"
    KUBELET = "kubelet"
    CONTAINERD = "containerd"
    DOCKER = "docker"
    CRIO = "crio"
    NOMAD = "nomad"
    PODMAN = "podman"


class Runtime(StrEnum):
    AUTO = "auto"
    PODMAN = "podman"
    DOCKER = "docker"
    NSPAWN = "nspawn"
    BWRAP = "bwrap"
    CHROOT = "chroot"


# A current NVIDIA datacenter (Tesla) driver of the R580 long-term branch.
DEFAULT_DRIVER_VERSION = "580.82.07"
DEFAULT_AGENT_UNITS = ("dcos-mesos-slave.service", "dcos-mesos-slave-public.service")
# The units each preset orders after nvidia.service, by the names their packages install:
# DC/OS's two agents; kubelet.service (Kubernetes' own packages; on Flatcar the operator
# installs it under that name); containerd.service and docker.service (Flatcar's own units);
# crio.service (CRI-O's); nomad.service (HashiCorp's packages). Podman has no daemon: nothing
# to order, so its containers' units (Quadlets) go into agent_units.
AGENT_PRESET_UNITS: Mapping[Agent, tuple[str, ...]] = {
    Agent.MESOS: DEFAULT_AGENT_UNITS,
    Agent.KUBELET: ("kubelet.service",),
    Agent.CONTAINERD: ("containerd.service",),
    Agent.DOCKER: ("docker.service",),
    Agent.CRIO: ("crio.service",),
    Agent.NOMAD: ("nomad.service",),
    Agent.PODMAN: (),
}

Parser = Callable[[Any], Any]


class BadValue(ValueError):
    """A raw value a setting rejects; `value` is the offending item (one element of a list)."""

    def __init__(self, value: Any, allowed: str) -> None:
        super().__init__(allowed)
        self.value = value
        self.allowed = allowed


def _choice(enum: type[StrEnum]) -> Parser:
    def parse(raw: Any) -> StrEnum:
        if isinstance(raw, str) and raw in enum._value2member_map_:
            return enum(raw)
        raise BadValue(raw, f"allowed: {', '.join(m.value for m in enum)}")

    return parse


def _matching(pattern: str, expected: str) -> Parser:
    regex = re.compile(pattern)

    def parse(raw: Any) -> str:
        if isinstance(raw, str) and regex.fullmatch(raw):
            return raw
        raise BadValue(raw, f"expected {expected}")

    return parse


def _text(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    raise BadValue(raw, "expected a string")


def _sha256(raw: Any) -> str:
    if isinstance(raw, str) and re.fullmatch(r"|[0-9A-Fa-f]{64}", raw):
        return raw.lower()
    raise BadValue(raw, "expected a sha256: 64 hex digits")


def _url(raw: Any) -> str:
    if isinstance(raw, str) and (raw == "" or re.match(r"(https?|file)://[^\s]+$", raw)):
        return raw.rstrip("/")
    raise BadValue(raw, "expected an http://, https:// or file:// URL")


def _path(raw: Any) -> Path:
    if isinstance(raw, str) and raw:
        return Path(raw).expanduser()
    raise BadValue(raw, "expected a path")


def _positive(raw: Any) -> int:
    number = int(raw) if isinstance(raw, str) and raw.isdigit() else raw
    if isinstance(number, int) and not isinstance(number, bool) and number >= 1:
        return number
    raise BadValue(raw, "expected a whole number of at least 1")


def _count(raw: Any) -> int:
    number = int(raw) if isinstance(raw, str) and raw.isdigit() else raw
    if isinstance(number, int) and not isinstance(number, bool) and number >= 0:
        return number
    raise BadValue(raw, "expected a whole number, 0 or more (0: no limit)")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)


def _size(raw: Any) -> int:
    """Bytes, from a number of bytes or "20G", "512MiB", "1.5T" (powers of 1024)."""
    found = _SIZE.fullmatch(raw.strip()) if isinstance(raw, str) else None
    if found:
        return int(float(found.group(1)) * 1024 ** " KMGT".index((found.group(2) or " ").upper()))
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    raise BadValue(raw, "expected a size like 20G, 512M or a number of bytes (0: no limit)")


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    raise BadValue(raw, "expected true or false")


def _list_of(item: Parser, *, empty: bool = False) -> Parser:
    def parse(raw: Any) -> tuple[Any, ...]:
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list | tuple) or not (raw or empty):
            raise BadValue(raw, "expected a non-empty list")
        return tuple(item(x) for x in raw)

    return parse


def _date(raw: Any) -> str:
    # TOML has dates of its own: `sync_since = 2025-01-31` reads as a datetime.date.
    text = raw.isoformat() if isinstance(raw, date) else raw
    if isinstance(text, str) and (text == "" or re.fullmatch(r"\d{4}-\d\d-\d\d", text)):
        return text
    raise BadValue(raw, "expected a date like 2025-01-31")


RELEASE = _matching(r"current|\d+\.\d+\.\d+", "'current' or a release like 3975.2.2")
DRIVER_VERSION = _matching(r"\d{3}\.\d{2,3}(\.\d{2})?", "an NVIDIA driver version like 535.261.03")
FINGERPRINT = _matching(r"|[0-9A-Fa-f]{40}", "a 40-digit hex key fingerprint")
UNIT = _matching(r"[A-Za-z0-9@_.:\\-]+\.service",
                 "a systemd unit name like dcos-mesos-slave.service")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "coreos-gpu"


@dataclass(frozen=True)
class Setting:
    key: str  # the TOML key and the BuildConfig field
    help: str
    parse: Parser
    default: Callable[[], Any]
    metavar: str = ""
    flag_name: str = ""  # only where the flag differs from the key (a list's singular)
    multiple: bool = False
    boolean: bool = False

    @property
    def flag(self) -> str:
        return "--" + (self.flag_name or self.key).replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("os", "target OS (CoreOS's servers are gone: use it with --mirror)",
            _choice(OsName), lambda: OsName.FLATCAR, "OS"),
    Setting("channel", "release channel", _choice(Channel), lambda: Channel.STABLE, "CHANNEL"),
    Setting("releases", "OS release(s) to build for; repeat for several kernels",
            _list_of(RELEASE), lambda: ("current",), "VERSION", flag_name="release",
            multiple=True),
    Setting("board", "OS board", _choice(Board), lambda: Board.AMD64_USR, "BOARD"),
    Setting("mirror", "base URL that replaces every download host (air-gapped sites, CoreOS)",
            _url, lambda: "", "URL"),
    Setting("signing_key", "armored key that signs the OS images (URL or path; default: the "
            "OS's published key)", _text, lambda: "", "URL|PATH"),
    Setting("signing_key_fingerprint", "primary key fingerprint the signing key must have "
            "(default: the one pinned for the OS)", FINGERPRINT, lambda: "", "FPR"),
    Setting("driver_version", "NVIDIA driver version", DRIVER_VERSION,
            lambda: DEFAULT_DRIVER_VERSION, "VERSION"),
    Setting("driver_url", "NVIDIA .run to use instead of NVIDIA's download URL (URL or path)",
            _text, lambda: "", "URL|PATH"),
    Setting("driver_sha256", "sha256 the .run must have, 64 hex digits (default: not "
            "checked)", _sha256, lambda: "", "SHA256"),
    Setting("profile", "which userspace files go into the bundle", _choice(Profile),
            lambda: Profile.COMPUTE, "PROFILE"),
    Setting("kernel_module_type", "which kernel module sources to build (default: the "
            "driver's, as NVIDIA's installer picks it: open from 560 on, proprietary before)",
            _choice(KernelModuleType), lambda: None, "TYPE"),
    Setting("agents", "what runs the GPU containers: presets of the units that start after "
            "the driver (mesos: DC/OS's two agents, kubelet, containerd, docker, crio, nomad; "
            "podman: none) (default: mesos, unless agent_units is set)",
            _list_of(_choice(Agent)), lambda: (Agent.MESOS,), "AGENT", flag_name="agent",
            multiple=True),
    Setting("agent_units", "more units that must start after the driver, added to the "
            "agents' (given without agents, these units alone, as before presets)",
            _list_of(UNIT), lambda: DEFAULT_AGENT_UNITS, "UNIT", flag_name="agent_unit",
            multiple=True),
    Setting("on_driver_failure", "what the agent units do when the driver fails to load: "
            "start-without-gpus (the node still runs CPU tasks) or wait (they stay down "
            "until nvidia.service succeeds)", _choice(DriverFailurePolicy),
            lambda: DriverFailurePolicy.START_WITHOUT_GPUS, "POLICY"),
    Setting("persistence", "how the nodes keep their GPUs initialised between jobs: daemon "
            "(nvidia-persistenced.service, NVIDIA's way; needs the profile's "
            "nvidia-persistenced), legacy (nvidia-smi -pm 1 at boot) or off",
            _choice(Persistence), lambda: Persistence.DAEMON, "MODE"),
    Setting("repository", "bundle repository the nodes trust (http://, https:// or file://; "
            "see coreos-gpu publish); needs repository_key", _url, lambda: "", "URL"),
    Setting("repository_key", "public key (PEM) the repository's index must be signed with "
            "(the .pub of coreos-gpu keygen)", _text, lambda: "", "PUB.pem"),
    Setting("publish_to", "where publish and sync write the repository: a folder, file://PATH "
            "or s3://BUCKET[/PREFIX] (default for sync: repository, when it is a file:// URL)",
            _text, lambda: "", "DEST"),
    Setting("publish_key", "private key that signs the repository's index (coreos-gpu keygen)",
            _text, lambda: "", "PATH"),
    Setting("index_lifetime", "days a signed index stays valid: nodes refuse it after that, so "
            "a mirror replaying an old copy is refused within them (publish, sync and "
            "repository refresh sign a new one)", _positive, lambda: 21, "DAYS"),
    Setting("s3_endpoint_url", "an S3-compatible server instead of AWS for s3:// repositories "
            "(region and credentials come from the usual AWS settings)", _url, lambda: "",
            "URL"),
    Setting("sync_channels", "channels sync follows (default: channel)",
            _list_of(_choice(Channel), empty=True), tuple, "CHANNEL", flag_name="sync_channel",
            multiple=True),
    Setting("sync_latest", "how many of each channel's newest releases sync keeps built",
            _positive, lambda: 2, "N"),
    Setting("sync_since", "sync every release of the channels from this date on, instead of "
            "the newest sync_latest", _date, lambda: "", "DATE"),
    Setting("sync_drivers", "driver versions sync keeps built (default: driver_version)",
            _list_of(DRIVER_VERSION, empty=True), tuple, "VERSION", flag_name="sync_driver",
            multiple=True),
    Setting("sync_flavours", "kernel module types sync keeps built (default: "
            "kernel_module_type)", _list_of(_choice(KernelModuleType), empty=True), tuple, "TYPE",
            flag_name="sync_flavour", multiple=True),
    Setting("sync_profiles", "profiles sync keeps built (default: profile)",
            _list_of(_choice(Profile), empty=True), tuple, "PROFILE", flag_name="sync_profile",
            multiple=True),
    Setting("sync_prune", "after each run, sync prunes the cache by cache_keep_releases, "
            "cache_max_age_days and cache_max_size, keeping what the repository lists and sync "
            "wants", _boolean, lambda: False, boolean=True),
    Setting("output", "archive to write", _path, lambda: Path("nvidia.tar.gz"), "PATH"),
    Setting("compression", "archive compression", _choice(Compression),
            lambda: Compression.GZIP, "ALGO"),
    Setting("cache_dir", "where downloads, extractions and builds are cached", _path,
            _default_cache_dir, "DIR"),
    Setting("cache_keep_releases", "cache prune keeps the newest N releases of each OS channel "
            "(image and developer container; 0: no limit by count)", _count, lambda: 2, "N"),
    Setting("cache_max_age_days", "cache prune removes what was not used for this many days "
            "(0: no limit by age)", _count, lambda: 0, "DAYS"),
    Setting("cache_max_size", "cache prune removes the least recently used until the cache is "
            "under this size, like 20G (0: no limit by size)", _size, lambda: 0, "SIZE"),
    Setting("runtime", "sandbox that runs the module build", _choice(Runtime),
            lambda: Runtime.AUTO, "RUNTIME"),
    Setting("podman_options", "extra global podman (or docker) options, e.g. "
            "--storage-driver=vfs",
            _list_of(_text, empty=True), tuple, "OPTION", flag_name="podman_option",
            multiple=True),
    Setting("podman_run_options", "extra `podman run` (or `docker run`) options, e.g. "
            "--ulimit=nofile=4096:4096",
            _list_of(_text, empty=True), tuple, "OPTION", flag_name="podman_run_option",
            multiple=True),
    Setting("jobs", "parallel compile jobs", _positive, lambda: os.cpu_count() or 1, "N"),
    Setting("offline", "use only what is already in the cache", _boolean, lambda: False,
            boolean=True),
)
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class BuildConfig:
    os: OsName
    channel: Channel
    releases: tuple[str, ...]
    board: Board
    mirror: str
    signing_key: str
    signing_key_fingerprint: str
    driver_version: str
    driver_url: str
    driver_sha256: str
    profile: Profile
    kernel_module_type: KernelModuleType | None  # None: the driver's default
    agents: tuple[Agent, ...]  # () when agent_units alone was given
    agent_units: tuple[str, ...]  # every unit the bundle orders: the agents' and agent_units
    on_driver_failure: DriverFailurePolicy
    persistence: Persistence
    repository: str
    repository_key: str
    publish_to: str
    publish_key: str
    index_lifetime: int
    s3_endpoint_url: str
    sync_channels: tuple[Channel, ...]
    sync_latest: int
    sync_since: str
    sync_drivers: tuple[str, ...]
    sync_flavours: tuple[KernelModuleType, ...]
    sync_profiles: tuple[Profile, ...]
    sync_prune: bool
    output: Path
    compression: Compression
    cache_dir: Path
    cache_keep_releases: int
    cache_max_age_days: int
    cache_max_size: int  # bytes
    runtime: Runtime
    podman_options: tuple[str, ...]
    podman_run_options: tuple[str, ...]
    jobs: int
    offline: bool
    # Where each value came from: "default", the config file's path, or the flag.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def mesos_path(self) -> bool:
        """Whether the agent units' drop-in gives them the Mesos agent's PATH (node/agent.env):
        with the mesos preset, or with agent_units alone (Mesos agents, as before presets)."""
        return Agent.MESOS in self.agents or not self.agents


def add_setting_flags(parser: argparse.ArgumentParser, keys: Sequence[str] | None = None
                      ) -> None:
    """The flags of the settings a verb takes: keys (in the table's order), or every one.
    Another setting's flag is then an unknown argument to that verb, and its value comes
    from the config file or the default (load_config reads only the flags given)."""
    unknown = set(keys or ()) - SETTINGS_BY_KEY.keys()
    if unknown:
        raise ValueError(f"no such setting: {', '.join(sorted(unknown))}")
    group = parser.add_argument_group("settings (also settable in the config file)")
    for s in SETTINGS:
        if keys is not None and s.key not in keys:
            continue
        if s.boolean:
            group.add_argument(s.flag, dest=s.key, action=argparse.BooleanOptionalAction,
                               default=None, help=s.help)
        else:
            group.add_argument(s.flag, dest=s.key, metavar=s.metavar, default=None,
                               action="append" if s.multiple else "store", help=s.help)


def _bad_value(s: Setting, source: str, error: BadValue) -> CoreosGpuError:
    where = s.flag if source == s.flag else f"{s.key} in {source}"
    return CoreosGpuError(
        f"invalid {where}: {error.value!r} ({error.allowed})", code=ExitCode.CONFIG
    )


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CoreosGpuError(f"config file {path} does not exist", code=ExitCode.CONFIG) from e
    except (OSError, UnicodeDecodeError) as e:
        raise CoreosGpuError(f"cannot read config file {path}: {e}", code=ExitCode.CONFIG) from e
    except tomllib.TOMLDecodeError as e:
        raise CoreosGpuError(f"{path}: invalid TOML: {e}", code=ExitCode.CONFIG) from e
    for key in data:
        if key not in SETTINGS_BY_KEY:
            close = difflib.get_close_matches(key, SETTINGS_BY_KEY, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(
                SETTINGS_BY_KEY)
            raise CoreosGpuError(f"{path}: unknown key {key!r}", hint=hint, code=ExitCode.CONFIG)
    return data


def find_config_file(explicit: Path | None, cwd: Path) -> Path | None:
    if explicit is not None:
        return explicit
    candidate = cwd / DEFAULT_CONFIG_FILE
    return candidate if candidate.is_file() else None


def config_of(args: argparse.Namespace) -> BuildConfig:
    """A verb's settings: its flags over ./coreos-gpu.toml (or --config FILE) over defaults."""
    return load_config(vars(args), find_config_file(args.config, Path.cwd()))


def load_config(flags: Mapping[str, Any], config_file: Path | None) -> BuildConfig:
    """Merge defaults, the config file and flags (in rising precedence) into a BuildConfig."""
    file_values = read_config_file(config_file) if config_file is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        if flags.get(s.key) is not None:
            raw, source = flags[s.key], s.flag
        elif s.key in file_values:
            raw, source = file_values[s.key], str(config_file)
        else:
            values[s.key], sources[s.key] = s.default(), "default"
            continue
        try:
            values[s.key] = s.parse(raw)
        except BadValue as e:
            raise _bad_value(s, source, e) from e
        if config_file is not None and source == str(config_file) and s.parse is _path:
            # A path in a config file means the same wherever the command is run from.
            values[s.key] = config_file.parent / values[s.key]
        sources[s.key] = source
    combine_agents(values, sources)
    return BuildConfig(**values, sources=sources)


def combine_agents(values: dict[str, Any], sources: dict[str, str]) -> None:
    """agent_units becomes every unit the bundle orders: the presets' units, then agent_units
    when it was given. agent_units given without agents replaces the default preset, as it
    replaced DC/OS's units before presets existed, so every earlier config builds the same
    bundle; given with agents, it adds to them (a preset never has to be spelled out again)."""
    given = sources["agent_units"] != "default"
    if given and sources["agents"] == "default":
        values["agents"] = ()
    presets = tuple(unit for agent in values["agents"] for unit in AGENT_PRESET_UNITS[agent])
    units = tuple(dict.fromkeys(presets + (values["agent_units"] if given else ())))
    if not units:
        # The node orders nvidia.service Before= these, and refuses a bundle without any.
        raise CoreosGpuError(
            f"agents = {', '.join(values['agents'])} orders no unit after the driver, and a "
            "bundle needs at least one", hint="add the units that start your GPU containers "
            "to agent_units (a Podman Quadlet's NAME.service), or another agent",
            code=ExitCode.CONFIG)
    if not given and sources["agents"] != "default":
        sources["agent_units"] = f"agents ({sources['agents']})"
    values["agent_units"] = units


def render_value(value: Any) -> Any:
    """A value as TOML/JSON would show it."""
    if isinstance(value, tuple):
        return [render_value(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_rows(config: BuildConfig) -> list[tuple[str, Any, str]]:
    return [
        (f.name, render_value(getattr(config, f.name)), config.sources.get(f.name, "default"))
        for f in fields(config)
        if f.name != "sources"
    ]

