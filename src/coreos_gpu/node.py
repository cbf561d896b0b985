"""Node files: the scripts and units a bundle carries, with the build's settings filled in.

Nodes have no Python, so what the node side needs to know about its bundle reaches it as
files the scripts read: `node/bundle.env` (read by lib.sh's bundle_value, never sourced),
`node/module-deps` (each module's kernel dependencies, from its .modinfo at build time: no
modinfo on the node), and the units and agent drop-in rendered from `resources/templates/`.
The scripts themselves (`resources/node/`) are carried as they are, except that a line that
sources a sibling and ends in `# coreos-gpu: inline` is replaced by that file (recursively:
inline_sources): install_nvidia.sh runs from a folder anyone may have written to, so it must
not source anything from it before it has checked it; and so each script can be split into
parts by job, every file small, and still ship as one.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.abc import Traversable
from importlib.resources import files
from typing import TYPE_CHECKING

from coreos_gpu.config import DriverFailurePolicy, Persistence
from coreos_gpu.layout import MACHINE, NODE, NODE_TOP_LEVEL, REPOSITORY_KEY_NAME
from coreos_gpu.modules import ModuleSet

if TYPE_CHECKING:
    from coreos_gpu.repository import RepositoryTrust

_POLICY_TEXT = {
    DriverFailurePolicy.START_WITHOUT_GPUS: "starts anyway, without GPUs",
    DriverFailurePolicy.WAIT: "does not start until nvidia.service succeeds",
}
# Wants= lets the agent start when nvidia.service fails; Requires= keeps it down.
_DEPENDENCY = {DriverFailurePolicy.START_WITHOUT_GPUS: "Wants",
               DriverFailurePolicy.WAIT: "Requires"}


@dataclass(frozen=True)
class NodeSettings:
    """Build-time choices about the node: which agent units wait for the driver, and what
    they do when it fails."""

    agent_units: tuple[str, ...]
    on_driver_failure: DriverFailurePolicy = DriverFailurePolicy.START_WITHOUT_GPUS
    # Where the nodes fetch bundles for other kernels, and the one key whose index they
    # trust (build --repository/--repository-key); None: no repository.
    repository: RepositoryTrust | None = None
    # The build passes the setting (default daemon); off here is a bundle as it was before
    # the setting: no unit, and a package without nvidia-persistenced is fine.
    persistence: Persistence = Persistence.OFF
    # Whether the drop-in sets the agents' PATH to DC/OS's plus the driver's tools (Mesos's
    # GPU isolator finds nvidia-smi with `which`). Off for the other agents (BuildConfig's
    # mesos_path): they get the driver through CDI and need nothing on their PATH, and
    # agent.env would replace their own (Flatcar's containerd.service sets one with /opt/bin).
    mesos_path: bool = True


@dataclass(frozen=True)
class NodeFile:
    path: str  # in the archive
    data: bytes
    mode: int


def default_node_files() -> Traversable:
    return files("coreos_gpu") / "resources" / NODE


def _templates() -> Traversable:
    return files("coreos_gpu") / "resources" / "templates"


def _walk(folder: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    for child in sorted(folder.iterdir(), key=lambda c: c.name):
        if child.name.startswith((".", "__")):  # __init__.py, __pycache__, editor files
            continue
        if child.is_dir():
            yield from _walk(child, f"{prefix}{child.name}/")
        elif child.is_file():
            yield f"{prefix}{child.name}", child


def _archive_path(name: str) -> str:
    # The names the original shell version's users script against stay at the top.
    return name if name in NODE_TOP_LEVEL else f"{NODE}/{name}"


def _file(name: str, data: bytes) -> NodeFile:
    # Package data does not keep modes reliably; a script is what starts with #!.
    return NodeFile(_archive_path(name), data, 0o755 if data.startswith(b"#!") else 0o644)


def render_bundle_env(settings: NodeSettings, *, driver_version: str, flavour: str,
                      profile: str, os: str, kernel_releases: Sequence[str],
                      tool_version: str) -> str:
    values = {
        "DRIVER_VERSION": driver_version,
        "FLAVOUR": flavour,
        # With the OS, what a node matches in the repository's index (fetch.sh).
        "PROFILE": profile,
        "OS": os,
        "ARCH": MACHINE,
        "KERNEL_RELEASES": " ".join(kernel_releases),
        "AGENT_UNITS": " ".join(settings.agent_units),
        "ON_DRIVER_FAILURE": settings.on_driver_failure.value,
        # install_nvidia.sh links node/nvidia-persistenced.service with daemon; startup.sh
        # runs nvidia-smi -pm 1 with legacy; the doctor checks either.
        "PERSISTENCE": settings.persistence.value,
        "REPOSITORY_URL": settings.repository.url if settings.repository else "",
        "REPOSITORY_KEY_FINGERPRINT": (settings.repository.fingerprint
                                       if settings.repository else ""),
    }
    return (f"# Written by coreos-gpu {tool_version}; read, never sourced, by the node "
            "scripts and nvidia-doctor.\n"
            + "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items()))


# --- node/bundle.env as the node reads it ---------------------------------------------------
# lib.sh's BUNDLE_ENV_AWK, which every node script reads bundle.env with (never sourcing it),
# and install_nvidia.sh's check_settings, which refuses a bundle whose values are not in the
# build's grammar: their rules, for inspect (which checks what the node checks) and for
# spec/bundle-env.json, whose vectors run through both. shlex would read more (double quotes,
# backslashes, several quoted pieces): the node reads each value as the writer quotes it, and
# anything else as it stands, which check_settings then refuses for the keys that count.
_SHLEX_ESCAPED_QUOTE = "'\"'\"'"  # shlex.quote's ' inside '…'
# check_settings' keys, in its order: the first bad one is the one it names.
SETTINGS_KEYS = ("DRIVER_VERSION", "FLAVOUR", "PROFILE", "OS", "ARCH", "KERNEL_RELEASES",
                 "AGENT_UNITS", "ON_DRIVER_FAILURE", "PERSISTENCE", "REPOSITORY_URL",
                 "REPOSITORY_KEY_FINGERPRINT")
_CHOICES = {"FLAVOUR": ("proprietary", "open"), "PROFILE": ("compute", "full"),
            "OS": ("flatcar", "coreos"), "ARCH": ("x86_64", "aarch64"),
            "ON_DRIVER_FAILURE": ("start-without-gpus", "wait"),
            "PERSISTENCE": ("daemon", "legacy", "off")}
_KERNEL_RELEASE = re.compile(r"[A-Za-z0-9._+~-]+")
_AGENT_UNIT = re.compile(r"[A-Za-z0-9@_.:\\-]+[.]service")  # config.UNIT
_REPOSITORY_URL = re.compile(r"(https?|file)://[^ \t]+")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_AWK_BLANKS = re.compile(r"[ \t\n]+")  # awk's split(v, w, " "): runs of blanks


def read_bundle_env(text: str) -> dict[str, str]:
    """bundle.env's values by key, as BUNDLE_ENV_AWK reads them: a line's key is all before
    its first "=" (a line without one, or starting with one, is skipped: the comment), the
    first line of a key counts, and a value in '…' loses them and has each '"'"' made a '.
    Lines end at \n only; a last line without a newline is a line."""
    values: dict[str, str] = {}
    lines = text.split("\n")
    for line in lines[:-1] if lines[-1] == "" else lines:
        key, eq, value = line.partition("=")
        if not eq or not key or key in values:
            continue
        if len(value) > 1 and value[0] == value[-1] == "'":
            value = value[1:-1].replace(_SHLEX_ESCAPED_QUOTE, "'")
        values[key] = value
    return values


def _words(value: str, pattern: re.Pattern[str]) -> bool:
    if value == "" or value.startswith(" ") or value.endswith(" ") or "  " in value:
        return False
    return all(pattern.fullmatch(w) for w in _AWK_BLANKS.split(value) if w)


def _valid_setting(key: str, value: str, driver_version: str) -> bool:
    if key == "DRIVER_VERSION":
        return value == driver_version
    if key in _CHOICES:
        return value in _CHOICES[key]
    if key == "KERNEL_RELEASES":
        return _words(value, _KERNEL_RELEASE)
    if key == "AGENT_UNITS":
        return _words(value, _AGENT_UNIT)
    if key == "REPOSITORY_URL":
        return value == "" or _REPOSITORY_URL.fullmatch(value) is not None
    return value == "" or _FINGERPRINT.fullmatch(value) is not None


def settings_problem(values: dict[str, str], driver_version: str) -> str | None:
    """What install_nvidia.sh's check_settings says of bundle.env's values (read_bundle_env)
    in a bundle of driver_version, in its words: the first value outside the build's grammar
    (a missing key is ""); None when it passes."""
    for key in SETTINGS_KEYS:
        value = values.get(key, "")
        if not _valid_setting(key, value, driver_version):
            return f"node/bundle.env: {key}={value} is not a valid value"
    return None


def render_module_deps(module_sets: Sequence[ModuleSet]) -> str:
    """One "<kernel release> <module> <dep,dep|->" line per module."""
    return "".join(f"{s.kernel_release} {m.name} {','.join(m.depends) or '-'}\n"
                   for s in module_sets for m in sorted(s.modules, key=lambda m: m.name))


_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
# The drop-in's end (templates/agent-dropin.conf) with and without the Mesos agent's PATH.
_MESOS_PATH = ("\n[Service]\n"
               "# Read after DC/OS's own environment files, so this PATH wins: DC/OS's agent "
               "PATH plus the\n# driver's bin folder, where the GPU isolator looks for "
               "nvidia-smi and the other tools.\n"
               "EnvironmentFile=-/opt/nvidia/current/node/agent.env")
_NO_PATH = ("# No [Service] section: these units get the driver through CDI and need nothing "
            "on their\n# PATH, so their own PATH stays as their unit sets it.")
_REPOSITORY_UNITS = "repository/"
_PERSISTENCED_UNIT = "nvidia-persistenced.service"
# `. "…/node/lib.sh" # coreos-gpu: inline`
_INLINE = re.compile(r'^\. "[^"]*/(?P<name>[\w.-]+)" # coreos-gpu: inline$', re.MULTILINE)
_INLINE_MARK = "# coreos-gpu: inline"


class InlineError(ValueError):
    """The package's node scripts do not join up: a part that is missing, or that inlines
    itself (directly or through another part). A bug of the package, found at render time."""


def inline_sources(data: bytes, folder: Traversable, *, name: str | None = None) -> bytes:
    """A script with each of its `# coreos-gpu: inline` source lines replaced by the file,
    recursively (a part may inline another). Each part is copied in once per script: a later
    line naming it again is left out, since all it holds (functions, constants) is defined by
    then; the scripts inline a part before the code that needs it. name: the script's own
    name, so that a part inlining it back is a cycle too."""
    if _INLINE_MARK.encode() not in data:
        return data
    copied: set[str] = set()

    def expand(text: str, chain: tuple[str, ...]) -> str:
        def include(m: re.Match[str]) -> str:
            part = m.group("name")
            if part in chain:
                raise InlineError(f"node/{' inlines '.join((*chain, part))}: a cycle")
            if part in copied:
                return f"# node/{part}: copied in above"
            source = folder / part
            if not source.is_file():
                raise InlineError(f"{f'node/{chain[-1]}' if chain else 'a script'} inlines "
                                  f"node/{part}, which is missing")
            copied.add(part)
            body = expand(source.read_text(), (*chain, part)).rstrip()
            return f"# --- node/{part}, copied in by coreos-gpu ---\n{body}\n# ---"
        return _INLINE.sub(include, text)

    return expand(data.decode(), (name,) if name else ()).encode()


def _render(template: str, values: dict[str, str]) -> bytes:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template).encode()


def _carries(settings: NodeSettings, template: str) -> bool:
    """Whether a bundle of these settings carries a template: templates/repository/ (the
    retry timer and its service, the stage watcher) with a repository, the persistence
    daemon's unit with persistence = daemon, the rest always."""
    if template.startswith(_REPOSITORY_UNITS):
        return settings.repository is not None
    if template == _PERSISTENCED_UNIT:
        return settings.persistence is Persistence.DAEMON
    return True


def render_node_files(settings: NodeSettings, *, driver_version: str, flavour: str,
                      profile: str, os: str, module_sets: Sequence[ModuleSet],
                      tool_version: str, scripts: Traversable | None = None) -> list[NodeFile]:
    """Every node file of a bundle. scripts: the folder of node scripts carried as they are
    (the package's resources/node by default)."""
    folder = default_node_files() if scripts is None else scripts
    carried = ([_file(name, inline_sources(r.read_bytes(), folder, name=name))
                for name, r in _walk(folder)]
               if folder.is_dir() else [])
    values = {"DRIVER_VERSION": driver_version,
              "AGENT_UNITS": " ".join(settings.agent_units),
              "POLICY": settings.on_driver_failure.value,
              "POLICY_TEXT": _POLICY_TEXT[settings.on_driver_failure],
              "DEPENDENCY": _DEPENDENCY[settings.on_driver_failure],
              "AGENTS_TEXT": "Mesos agent unit" if settings.mesos_path else "agent unit",
              "AGENT_PATH": _MESOS_PATH if settings.mesos_path else _NO_PATH}
    if settings.repository is not None:
        # The boot may fetch a bundle: it needs the network, and the download's time.
        values |= {"NETWORK": "Wants=network-online.target\nAfter=network-online.target",
                   "FETCH_TIME": ", and a bundle fetched from the repository (NVIDIA_FETCH_"
                                 "TIMEOUT) before them",
                   "START_TIMEOUT": "600"}
    else:
        values |= {"NETWORK": "# No network: this bundle has no repository to fetch from.",
                   "FETCH_TIME": "", "START_TIMEOUT": "300"}
    rendered = [_file(name.removeprefix(_REPOSITORY_UNITS), _render(r.read_text(), values))
                for name, r in _walk(_templates()) if _carries(settings, name)]
    generated = [
        _file("bundle.env", render_bundle_env(
            settings, driver_version=driver_version, flavour=flavour, profile=profile, os=os,
            kernel_releases=[s.kernel_release for s in module_sets],
            tool_version=tool_version).encode()),
        _file("module-deps", render_module_deps(module_sets).encode()),
    ]
    if settings.repository is not None:
        generated.append(_file(REPOSITORY_KEY_NAME.removeprefix(f"{NODE}/"),
                               settings.repository.public_key_pem))
    return carried + rendered + generated
