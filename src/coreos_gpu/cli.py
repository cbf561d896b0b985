"""The `coreos-gpu` command: its parser, and running the verb it names.

Each verb's function (cli_build, cli_cache, cli_render, cli_repository, completion) calls the
stages and returns a results.Result, which _run prints once, as text or as JSON (--json), with
ui.render_result. This module imports none of them: a verb's module, and with it the stages
and third-party packages it needs, is imported only when that verb runs, so
`--help`, completion and a mistyped flag answer at once (tests/test_cli.py holds it to that).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import coreos_gpu
from coreos_gpu import ui
from coreos_gpu.config import SETTINGS_BY_KEY, add_setting_flags
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.render_types import AGENT_SETTINGS, DEFAULT_IMAGE, IGNITION_SPECS, Kind
from coreos_gpu.render_types import SETTINGS as RENDER_SETTINGS

if TYPE_CHECKING:
    from coreos_gpu.results import Result

SHELLS = ("bash", "zsh", "fish")  # what `coreos-gpu completion` writes scripts for
# The settings each verb reads (config.py declares each; tests/test_cli.py finds what each
# verb's code reads and holds this table to it): only their flags are the verb's, so another
# setting's flag is an unknown argument there, and its value comes from the config file.
# The developer container: its release (devcontainer.prepare_devcontainer) and the sandbox
# that unpacks it (engine_options).
DEVCONTAINER_SETTINGS = ("os", "channel", "releases", "board", "mirror", "signing_key",
                         "signing_key_fingerprint", "cache_dir", "offline", "runtime",
                         "podman_options", "podman_run_options")
# build.py: the driver (read_driver), the developer containers, the compile and the bundle.
BUILD_SETTINGS = (*DEVCONTAINER_SETTINGS, "driver_version", "driver_url", "driver_sha256",
                  "kernel_module_type", "profile", "agents", "agent_units",
                  "on_driver_failure", "persistence", "repository", "repository_key",
                  "output", "compression", "jobs")
PUBLISH_SETTINGS = ("publish_to", "publish_key", "index_lifetime", "s3_endpoint_url")
READ_REPOSITORY_SETTINGS = ("cache_dir", "s3_endpoint_url")
# prune.py: its policy, and the repository whose bundles' releases and drivers it keeps.
PRUNE_SETTINGS = ("cache_dir", "cache_keep_releases", "cache_max_age_days", "cache_max_size",
                  "repository", "repository_key", "publish_to", "s3_endpoint_url")
# sync builds each bundle as build does, but for the release and into the file its plan
# names (sync.target_config), so releases and output are no settings of it.
SYNC_SETTINGS = tuple(key for key in dict.fromkeys((
    *BUILD_SETTINGS, *PUBLISH_SETTINGS, *PRUNE_SETTINGS, "sync_channels", "sync_latest",
    "sync_since", "sync_drivers", "sync_flavours", "sync_profiles", "sync_prune"))
    if key not in ("releases", "output"))
VERB_SETTINGS: dict[str, tuple[str, ...]] = {
    # Every setting: it prints each one's value and where it came from, so a flag given to
    # it shows what a build or sync given that flag would take.
    "config show": tuple(SETTINGS_BY_KEY),
    "driver inspect": ("driver_sha256", "cache_dir", "offline"),
    "build": BUILD_SETTINGS,
    "inspect": (),  # the archive alone
    "sync": SYNC_SETTINGS,
    "releases": ("os", "channel", "mirror", "cache_dir", "offline"),
    "keygen": (),
    "publish": PUBLISH_SETTINGS,
    "repository list": READ_REPOSITORY_SETTINGS,
    "repository verify": READ_REPOSITORY_SETTINGS,
    "repository refresh": PUBLISH_SETTINGS,
    # Those that pin the bundle a repository node takes, and its agents (render_types).
    "render": (*RENDER_SETTINGS, *AGENT_SETTINGS),
    "cache list": ("cache_dir",),
    "cache prune": PRUNE_SETTINGS,
    "devcontainer prepare": DEVCONTAINER_SETTINGS,
    "devcontainer shell": DEVCONTAINER_SETTINGS,
    "devcontainer run": DEVCONTAINER_SETTINGS,
    "completion": (),
}
# What each setting means to render (its flag, metavar and check are config.py's).
_RENDER_SETTING_HELP = {
    "driver_version": "the driver nodes take from a repository (default: the setting "
                      "driver_version), or the smoke test expects",
    "kernel_module_type": "proprietary or open: the module flavour nodes take from a repository "
                          "(default: the setting, else the driver's: open from 560)",
    "profile": "compute or full: the profile nodes take from a repository (default: the "
               "setting profile)",
    "agents": "what runs the GPU containers (mesos, kubelet, containerd, docker, crio, nomad, "
              "podman): the provisioning unit runs before their units (default: the bundle "
              "file's, else the setting agents)",
    "agent_units": "more units the provisioning unit runs before (default: the bundle file's, "
                   "else the setting agent_units)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage; one line and a pointer to --help is clearer.
        raise CoreosGpuError(message, hint=f"see {self.prog} --help", code=ExitCode.CONFIG)


class _Version(argparse._VersionAction):
    """--version, whose number (importlib.metadata, slow to import) is looked up only when
    asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        self.version = f"coreos-gpu {coreos_gpu.__version__}"
        super().__call__(parser, namespace, values, option_string)


@dataclass(frozen=True)
class VerbFunction:
    """A verb's function, by its module (under coreos_gpu) and name, imported when it runs."""

    module: str
    name: str

    def __call__(self, args: argparse.Namespace) -> Result | int:
        function: Callable[[argparse.Namespace], Result | int] = getattr(
            importlib.import_module(f"coreos_gpu.{self.module}"), self.name)
        return function(args)


# build_parser's verb(): (group, name, help, "module.function") → its parser
Verb = Callable[..., argparse.ArgumentParser]


def verb_parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Each verb that runs (("repository", "list"), its parser), in the parser's order: the
    docs' reference and the tests walk the verbs with it."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
        return
    for name, sub in subs[0].choices.items():
        yield from verb_parsers(sub, (*words, name))


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="config file (default: ./coreos-gpu.toml if present)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")

    parser = _Parser(prog="coreos-gpu", parents=[common],
                     description="NVIDIA GPU drivers for Mesos/DC/OS agents on Flatcar and "
                     "CoreOS Container Linux.")
    parser.add_argument("--version", action=_Version)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(group: Any, name: str, helptext: str, function: str) -> argparse.ArgumentParser:
        """A verb that runs function ("module.name"), with the flags of its settings
        (VERB_SETTINGS)."""
        sub: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=helptext, description=helptext)
        sub.add_argument("--json", action="store_true", help="print JSON")
        add_setting_flags(sub, VERB_SETTINGS[sub.prog.removeprefix(f"{parser.prog} ")])
        sub.set_defaults(func=VerbFunction(*function.rsplit(".", 1)))
        return sub

    config = verbs.add_parser("config", help="configuration").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    verb(config, "show", "print the effective configuration and where each value came from",
         "cli_build.cmd_config_show")

    driver = verbs.add_parser("driver", help="NVIDIA driver packages").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    inspect = verb(driver, "inspect", "show what an NVIDIA .run holds and what each profile "
                   "takes", "cli_build.cmd_driver_inspect")
    inspect.add_argument("package", metavar="PATH_OR_URL", help="NVIDIA-Linux-*.run")
    verb(verbs, "build", "compile the NVIDIA modules for each release's kernel and write the "
         "archive nodes install", "cli_build.cmd_build")
    inspect_archive = verb(verbs, "inspect", "show and verify what a coreos-gpu archive holds",
                           "cli_build.cmd_inspect")
    inspect_archive.add_argument("archive", type=Path, metavar="ARCHIVE",
                                 help="nvidia.tar.gz (or .tar.xz, .tar.zst)")
    sync_verb = verb(verbs, "sync", "build and publish the bundles the followed channels have "
                     "and the repository lacks", "cli_build.cmd_sync")
    sync_verb.add_argument("--plan", action="store_true",
                           help="only print what is missing (with --json: a CI job matrix)")
    verb(verbs, "releases", "list an OS channel's releases and their kernels",
         "cli_build.cmd_releases")
    _add_repository_verbs(verbs, verb)  # keygen, publish, repository list|verify|refresh
    _add_render_verb(verbs)  # render ignition|butane|terraform|marathon-app|...
    _add_cache_verbs(verbs, verb)  # cache list|prune

    devcontainer = verbs.add_parser(
        "devcontainer", help="the OS's developer container, the module build's root"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    verb(devcontainer, "prepare", "download, verify and unpack the developer container of "
         "each configured release", "cli_build.cmd_devcontainer_prepare")
    verb(devcontainer, "shell", "open a shell in the developer container (for debugging)",
         "cli_build.cmd_devcontainer_shell")
    run = verb(devcontainer, "run", "run a command in the developer container; its exit code "
               "is coreos-gpu's", "cli_build.cmd_devcontainer_run")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the command and its arguments")
    completion = verbs.add_parser("completion", parents=[common], help="print the shell "
                                  "completion script", description="print the completion script "
                                  "for SHELL, generated from this command's own options")
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help=", ".join(SHELLS))
    completion.set_defaults(func=VerbFunction("completion", "cmd_completion"))
    return parser


def _add_repository_verbs(verbs: Any, verb: Verb) -> None:
    # Not through verb(): keygen reads no settings and no config file.
    helptext = "make a key pair that signs a repository's index"
    keygen: argparse.ArgumentParser = verbs.add_parser("keygen", help=helptext,
                                                       description=helptext)
    keygen.set_defaults(func=VerbFunction("cli_repository", "cmd_keygen"))
    keygen.add_argument("--json", action="store_true", help="print JSON")
    keygen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
    keygen.add_argument("--output", type=Path, required=True, metavar="PATH",
                        help="the private key (mode 0600); the public one goes to PATH.pub")
    pub = verb(verbs, "publish", "upload bundles to a repository and sign its new index",
               "cli_repository.cmd_publish")
    pub.add_argument("archives", type=Path, nargs="+", metavar="ARCHIVE",
                     help="nvidia.tar.gz files made by coreos-gpu build")
    pub.add_argument("--to", default="", metavar="DEST",
                     help="a folder, file://PATH or s3://BUCKET[/PREFIX] (default: publish_to)")
    pub.add_argument("--key", default="", metavar="PATH",
                     help="the private key (coreos-gpu keygen; default: publish_key)")

    repository = verbs.add_parser("repository", help="bundle repositories").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    listing = verb(repository, "list", "list what a repository offers",
                   "cli_repository.cmd_repository_list")
    verify = verb(repository, "verify", "check a repository's signature and every bundle's "
                  "size and sha256", "cli_repository.cmd_repository_verify")
    renew = verb(repository, "refresh", "sign the current index again, unchanged, as a new "
                 "generation valid for index_lifetime days",
                 "cli_repository.cmd_repository_refresh")
    renew.add_argument("--to", default="", metavar="DEST",
                       help="a folder, file://PATH or s3://BUCKET[/PREFIX] (default: "
                       "publish_to)")
    renew.add_argument("--key", default="", metavar="PATH",
                       help="the private key (default: publish_key)")
    for sub, required in ((listing, False), (verify, True)):
        # index.current: repository.POINTER, a name every node reads, so it never changes.
        sub.add_argument("url", metavar="URL",
                         help="the folder holding index.current: a path, file://, http(s):// "
                         "or s3://")
        sub.add_argument("--key", type=Path, required=required, metavar="PUB.pem",
                         help="the repository's public key" + (
                             "" if required else " (checks the signature)"))


def _add_render_verb(verbs: Any) -> None:
    # Not through verb(): its setting flags are build's (--os, --output, --repository mean
    # other things there).
    helptext = ("write an Ignition config, Butane config or Terraform provisioner that "
                "installs a bundle, or a DC/OS or Kubernetes GPU smoke test")
    sub: argparse.ArgumentParser = verbs.add_parser("render", help=helptext,
                                                    description=helptext)
    sub.set_defaults(func=VerbFunction("cli_render", "cmd_render"))
    sub.add_argument("kind", choices=[k.value for k in Kind], metavar="KIND",
                     help=", ".join(k.value for k in Kind))
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show tracebacks")
    sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                     help="config file (default: ./coreos-gpu.toml if present)")
    sub.add_argument("--os", default=None, metavar="OS",
                     help="flatcar or coreos (default: the bundle's, else flatcar)")
    sub.add_argument("--bundle", type=Path, default=None, metavar="FILE",
                     help="the nvidia.tar.gz nodes will install: its hashes and manifest")
    sub.add_argument("--bundle-url", default="", metavar="URL",
                     help="where nodes download the bundle from (http or https)")
    sub.add_argument("--bundle-sha256", default="", metavar="HEX",
                     help="the bundle's sha256, when --bundle is not given")
    sub.add_argument("--bundle-sha512", default="", metavar="HEX",
                     help="its sha512 (Ignition spec 2.x checks sha512 only)")
    sub.add_argument("--repository", default="", metavar="URL",
                     help="a repository nodes fetch the bundle for their kernel from")
    sub.add_argument("--repository-key", type=Path, default=None, metavar="PUB.pem",
                     help="the repository's public key (coreos-gpu keygen)")
    for key in VERB_SETTINGS["render"]:
        setting = SETTINGS_BY_KEY[key]
        sub.add_argument(setting.flag, dest=key, metavar=setting.metavar, default=None,
                         action="append" if setting.multiple else "store",
                         help=_RENDER_SETTING_HELP[key])
    sub.add_argument("--ignition-version", default=None, choices=IGNITION_SPECS,
                     help="Ignition spec (default: 2.2.0 for coreos, 3.3.0 for flatcar)")
    sub.add_argument("--image", default=DEFAULT_IMAGE, metavar="IMAGE",
                     help=f"the smoke test's Docker image (default: {DEFAULT_IMAGE})")
    sub.add_argument("--id", default="", metavar="ID",
                     help="the smoke test's app, job or pod id")
    sub.add_argument("--output", default="", metavar="FILE",
                     help="write there (atomically) instead of to stdout")


def _add_cache_verbs(verbs: Any, verb: Verb) -> None:
    cache = verbs.add_parser("cache", help="what the build cache holds, and pruning it"
                             ).add_subparsers(dest="action", metavar="ACTION", required=True)
    verb(cache, "list", "show what the cache holds: each OS release's image and developer "
         "container, drivers, module sets, bundles, with sizes and when each was last used",
         "cli_cache.cmd_cache_list")
    prune = verb(cache, "prune", "remove from the cache what cache_keep_releases, "
                 "cache_max_age_days and cache_max_size let go, never what a build holds or "
                 "the repository lists", "cli_cache.cmd_cache_prune")
    prune.add_argument("--dry-run", action="store_true",
                       help="only say what would be removed")


# --- running -------------------------------------------------------------------------------


def _run(argv: Sequence[str] | None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.config = getattr(args, "config", None)
        result = args.func(args)
        if isinstance(result, int):  # an interactive command's own exit code (devcontainer shell)
            return result
        return ui.render_result(result, as_json=getattr(args, "json", False))
    except CoreosGpuError as e:
        if debug:
            traceback.print_exc()
        ui.print_error(e.message, e.hint)
        return int(e.code)
    except KeyboardInterrupt:
        ui.print_error("interrupted")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # stdout is the one pipe coreos-gpu writes to itself: its reader stopped reading.
        return int(ExitCode.BROKEN_PIPE)
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        ui.print_error(f"internal error: {type(e).__name__}: {e}",
                       "rerun with --debug for the traceback, and report it")
        return int(ExitCode.INTERNAL)


def _flush_stdout() -> bool:
    """Write out what stdout still holds; False when its reader has gone (`| head -1`)."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        # Python flushes stdout once more at exit and would print "Exception ignored" for
        # that; what is left can go nowhere, so let it go to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def main(argv: Sequence[str] | None = None) -> int:
    code = _run(argv)
    # A reader that stops early (`coreos-gpu releases | head -1`) is no error to report:
    # exit quietly with 141, as a tool killed by SIGPIPE does (a pipeline without pipefail
    # shows head's 0), unless the verb failed on its own: its code says more.
    if not _flush_stdout() and code == ExitCode.OK:
        return int(ExitCode.BROKEN_PIPE)
    return code
