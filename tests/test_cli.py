"""The `coreos-gpu` command as a user runs it: into a pipe that closes early, the exit codes
of missing and failing downloads, what starting it imports, and the setting flags each verb
takes: those it declares (cli.VERB_SETTINGS), which are those its code reads."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreos_gpu import results, ui
from coreos_gpu.cli import VERB_SETTINGS, VerbFunction, build_parser, main, verb_parsers
from coreos_gpu.config import SETTINGS, SETTINGS_BY_KEY, load_config
from coreos_gpu.errors import ExitCode

from .conftest import CliResult
from .setting_reads import PACKAGE, SettingReads
from .test_fetch import Statuses, handler_with, served

FEED_PATH = "www.flatcar.org/releases-json/releases-stable.json"


def _command() -> list[str]:
    """The installed console script, as a user runs it (`python -m` where there is none)."""
    script = Path(sys.executable).with_name("coreos-gpu")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "coreos_gpu"]


def _feed(count: int) -> bytes:
    return json.dumps({f"{3000 + i}.0.0": {"channel": "stable", "release_date": "2024-10-23",
                                           "major_software": {"kernel": ["6.6.56"]}}
                       for i in range(count)}).encode()


def _mirror(tmp_path: Path, count: int) -> str:
    feed = tmp_path / "mirror" / FEED_PATH
    feed.parent.mkdir(parents=True)
    feed.write_bytes(_feed(count))
    return (tmp_path / "mirror").as_uri()


def _start(tmp_path: Path, *argv: str, stdout: int,
           unbuffered: bool = False) -> subprocess.Popen[bytes]:
    # Python buffers stdout into a pipe unless PYTHONUNBUFFERED is set (as CI sometimes does);
    # a closed pipe then shows at a later write or only at exit: both must be quiet.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([*_command(), *argv], cwd=tmp_path, env=env, stdout=stdout,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_pipe_closed_after_one_line(tmp_path: Path, json_flag: list[str],
                                      unbuffered: bool) -> None:
    # `coreos-gpu releases | head -1`: far more output than a pipe holds, so coreos-gpu is
    # still writing when the reader leaves.
    mirror = _mirror(tmp_path, 30_000)
    proc = _start(tmp_path, "releases", "--mirror", mirror, *json_flag, stdout=subprocess.PIPE,
                  unbuffered=unbuffered)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == ExitCode.BROKEN_PIPE == 141
    assert first == (b"[\n" if json_flag else b"flatcar stable releases:\n")
    assert stderr == ""  # no traceback, no "Exception ignored", no error line


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_pipe_closed_before_the_first_write(tmp_path: Path, unbuffered: bool) -> None:
    # `coreos-gpu releases | true`: small output, which buffered stdout writes only at the end.
    mirror = _mirror(tmp_path, 3)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = _start(tmp_path, "releases", "--mirror", mirror, stdout=write_end,
                      unbuffered=unbuffered)
    finally:
        os.close(write_end)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.BROKEN_PIPE
    assert stderr.decode() == ""


def test_output_into_a_pipe_read_to_the_end(tmp_path: Path) -> None:
    mirror = _mirror(tmp_path, 30_000)
    proc = _start(tmp_path, "releases", "--mirror", mirror, stdout=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and stderr == b""
    assert stdout.count(b"\n") == 30_000 + 2  # the title, the header, a line per release
    assert stdout.endswith(b"3000.0.0   6.6.56  2024-10-23\n")


RELEASE = "stable.release.flatcar-linux.net/amd64-usr/3975.2.2"
IMAGE = f"{RELEASE}/flatcar_developer_container.bin.bz2"


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        (f"{RELEASE}/version.txt", 404, ExitCode.DOWNLOAD,
         "flatcar stable has no release 3975.2.2: "),
        (f"{RELEASE}/version.txt", 500, ExitCode.DOWNLOAD, "failed: HTTP 500"),
        (f"{IMAGE}.DIGESTS", 404, ExitCode.UNVERIFIABLE, ".DIGESTS does not exist (HTTP 404)"),
        (f"{IMAGE}.DIGESTS", 410, ExitCode.UNVERIFIABLE, ".DIGESTS does not exist (HTTP 410)"),
        (f"{IMAGE}.DIGESTS", 502, ExitCode.DOWNLOAD, ".DIGESTS failed: HTTP 502"),
        (f"{IMAGE}.sig", 404, ExitCode.UNVERIFIABLE, ".sig does not exist (HTTP 404)"),
        (FEED_PATH, 404, ExitCode.DOWNLOAD, "failed: HTTP 404"),  # `releases` needs the feed
        (FEED_PATH, 0, ExitCode.DOWNLOAD, "does not exist or is not a file"),  # file:// mirror
    ],
)
def test_missing_and_failing_downloads_exit_codes(cli, tmp_path: Path, path: str,  # type: ignore[no-untyped-def]
                                                  status: int, code: ExitCode,
                                                  message: str) -> None:
    files = {f"/{RELEASE}/version.txt": b"FLATCAR_VERSION=3975.2.2\n",
             f"/{FEED_PATH}": _feed(3), f"/{IMAGE}.DIGESTS": b"# SHA512 HASH\n"}
    handler = handler_with(Statuses, requests=[], files=files, statuses={f"/{path}": status})
    with served(handler) as base:
        argv = ["devcontainer", "prepare", "--release", "3975.2.2"]
        if path == FEED_PATH:
            argv = ["releases"]
        mirror = base if status else (tmp_path / "empty mirror").as_uri()
        result: CliResult = cli(*argv, "--mirror", mirror)
    assert result.code == code, result.stderr
    assert "Traceback" not in result.stderr
    [error, *_] = result.error_lines
    assert error.startswith("coreos-gpu: error: ") and message in error, error


# --- start-up: what building the parser imports --------------------------------------------

# What the verbs use and `--help` must not wait for (rich alone takes longer to import than
# all that `--help` needs). importlib.metadata: __version__, resolved for --version only.
HEAVY = ("rich", "httpx", "cryptography", "elftools", "zstandard", "boto3", "botocore", "shtab",
         "importlib.metadata")
# What building the parser needs of coreos_gpu: the settings table, render's kinds and
# defaults, the error type and the output module; no stage.
PARSER_MODULES = {"coreos_gpu", "coreos_gpu.cli", "coreos_gpu.config", "coreos_gpu.errors",
                  "coreos_gpu.render_types", "coreos_gpu.ui"}
_REPORT = """
import json, sys
baseline = set(sys.modules)
{code}
print(json.dumps({{"modules": sorted(set(sys.modules) - baseline),
                   "stdlib": sorted(sys.stdlib_module_names)}}))
"""


def _imported(code: str) -> tuple[set[str], set[str]]:
    """What a fresh interpreter imports to run code: (every module, the third-party top-level
    packages among them)."""
    done = subprocess.run([sys.executable, "-c", _REPORT.format(code=code)], capture_output=True,
                          text=True, check=True)
    found = json.loads(done.stdout.splitlines()[-1])
    modules = set(found["modules"])
    third_party = {m.split(".")[0] for m in modules} - set(found["stdlib"]) - {"coreos_gpu"}
    return modules, third_party


@pytest.mark.parametrize("code", [
    "from coreos_gpu.cli import build_parser; build_parser()",
    *(f"""
from coreos_gpu.cli import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
""" for argv in (["--help"], ["build", "--help"], ["publish", "--help"],
                 ["repository", "verify", "--help"]))],
    ids=["build_parser", "--help", "build --help", "publish --help", "repository verify --help"])
def test_building_the_parser_imports_no_third_party_package(code: str) -> None:
    modules, third_party = _imported(code)
    assert not [m for m in HEAVY if m in modules]
    assert not third_party
    assert {m for m in modules if m.startswith("coreos_gpu")} <= PARSER_MODULES


def test_version_is_the_installed_distributions() -> None:
    done = subprocess.run([*_command(), "--version"], capture_output=True, text=True,
                          check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"coreos-gpu {importlib.metadata.version('coreos-gpu')}\n"
    import coreos_gpu

    assert coreos_gpu.__version__ == importlib.metadata.version("coreos-gpu")
    with pytest.raises(AttributeError):
        coreos_gpu.no_such_attribute  # noqa: B018


def test_every_verb_names_a_function_that_exists() -> None:
    """The parser names each verb's function as text (it imports none): each must be there."""
    leaves = dict(verb_parsers(build_parser()))
    assert len(leaves) == 18
    for words, parser in leaves.items():
        function = parser.get_default("func")
        assert isinstance(function, VerbFunction), words
        module = importlib.import_module(f"coreos_gpu.{function.module}")
        assert callable(getattr(module, function.name, None)), (words, function)


# --- the settings each verb takes -----------------------------------------------------------

def _help(*words: str) -> str:
    return dict(verb_parsers(build_parser()))[words].format_help()


@pytest.fixture
def help_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to it


# A verb's own flags that share a setting's name and mean something of their own there.
OWN_FLAGS = {"render": {"--os", "--output", "--repository", "--repository-key"},
             "keygen": {"--output"}}
# What each verb needs besides, so that the unknown flag is the one thing wrong.
POSITIONALS = {"driver inspect": ["NVIDIA-Linux-x86_64-580.82.07.run"],
               "inspect": ["x.tar.gz"], "publish": ["x.tar.gz"],
               "repository list": ["/srv/repo"],
               "repository verify": ["/srv/repo", "--key", "k.pub"],
               "render": ["ignition"], "keygen": ["--output", "k"], "completion": ["bash"]}
VERBS = sorted(" ".join(words) for words, _ in verb_parsers(build_parser()))


# --- results: what a verb returns, and the one renderer that prints it ---------------------

# The verbs whose output is a command's own (an interactive shell): they return its exit code.
_STREAMING_VERBS = {"devcontainer shell", "devcontainer run"}


@pytest.mark.parametrize("verb", VERBS)
def test_a_verb_returns_a_result(verb: str) -> None:
    function = dict(verb_parsers(build_parser()))[tuple(verb.split())].get_default("func")
    module = importlib.import_module(f"coreos_gpu.{function.module}")
    returned = typing.get_type_hints(getattr(module, function.name))["return"]
    if verb in _STREAMING_VERBS:
        assert returned is int
        return
    for result in typing.get_args(returned) or (returned,):
        assert issubclass(result, results.Result), (verb, result)


def _printing(tree: ast.AST) -> list[str]:
    """What in a module's code writes output or picks JSON or text itself: print(), sys.stdout
    or sys.stderr, ui's own writers, args.json."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "print":
            found.append("print")
        elif isinstance(node, ast.Attribute) and (
                node.attr in ("stdout", "stderr", "json", "print_error")
                or node.attr.startswith("_print")):
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


@pytest.mark.parametrize("module", sorted({f.module for f in (
    p.get_default("func") for _, p in verb_parsers(build_parser()))}))
def test_verbs_print_only_through_the_renderer(module: str) -> None:
    """No verb's module prints or branches on --json: cli.py renders what the verb returns
    (ui.render_result), so text, JSON and stderr follow one set of rules."""
    source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    assert _printing(ast.parse(source)) == []


def test_the_guard_finds_a_verb_that_prints() -> None:
    printing = ast.parse("def cmd_x(args):\n    if args.json:\n        sys.stdout.write('')\n"
                         "    ui._print_json({})\n")
    assert sorted(_printing(printing)) == ["args.json (line 2)", "sys.stdout (line 3)",
                                           "ui._print_json (line 4)"]


@dataclass(frozen=True)
class _Shown(results.Result):
    failed: bool

    def to_json(self) -> object:
        return {"b": [1, None], "a": "x"}

    def to_text(self) -> Iterator[results.Block]:
        yield results.Fields([("key", "value"), ("longer key", 2)])
        yield results.Table("things", ("name", "size"), [("one", 1), ("three", 333)])
        yield results.Text("verbatim\nlines\n")

    def messages(self) -> Iterator[results.Log | results.Error]:
        yield results.Log("next: this")
        if self.failed:
            yield results.Error("it failed", "fix it")

    @property
    def code(self) -> int:
        return int(ExitCode.BUNDLE if self.failed else ExitCode.OK)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("failed", [False, True], ids=["ok", "failed"])
def test_the_renderer_prints_a_result(capsys: pytest.CaptureFixture[str], as_json: bool,
                                      failed: bool) -> None:
    """Text on a pipe: aligned fields, a titled table, text as it is; or the JSON, in the
    result's key order. Then the messages on stderr, in either form; the exit code is the
    result's."""
    assert ui.render_result(_Shown(failed), as_json=as_json) == (ExitCode.BUNDLE if failed else 0)
    out, err = capsys.readouterr()
    assert out == ('{\n  "b": [\n    1,\n    null\n  ],\n  "a": "x"\n}\n' if as_json else
                   "key         value\nlonger key  2\n"
                   "things:\nname   size\none    1\nthree  333\n"
                   "verbatim\nlines\n")
    assert err == "next: this\n" + (
        "coreos-gpu: error: it failed\ncoreos-gpu: hint: fix it\n" if failed else "")


def _setting_flags(verb: str) -> set[str]:
    parser = dict(verb_parsers(build_parser()))[tuple(verb.split())]
    return {a.option_strings[0] for a in parser._actions
            if a.option_strings and a.dest in SETTINGS_BY_KEY} - OWN_FLAGS.get(verb, set())


def _declared_flags(verb: str) -> set[str]:
    return {SETTINGS_BY_KEY[key].flag for key in VERB_SETTINGS[verb]}


def test_every_verb_declares_its_settings() -> None:
    assert sorted(VERB_SETTINGS) == VERBS


@pytest.mark.usefixtures("help_width")
@pytest.mark.parametrize("verb", VERBS)
def test_a_verbs_help_shows_exactly_its_settings(verb: str) -> None:
    assert _setting_flags(verb) == _declared_flags(verb)
    text = _help(*verb.split())
    shown = {s.flag for s in SETTINGS if re.search(rf"(?<![\w-]){s.flag}(?![\w-])", text)}
    assert shown - OWN_FLAGS.get(verb, set()) == _declared_flags(verb)


@pytest.mark.usefixtures("help_width")
def test_a_verb_with_few_settings_has_a_short_help() -> None:
    # With every setting, each took 116 to 118 lines (at 100 columns), as config show does.
    assert len(_help("publish").splitlines()) <= 30 < 100 < len(
        _help("config", "show").splitlines())
    assert "settings (also settable" not in _help("inspect")  # no empty section


@pytest.mark.parametrize("verb", [v for v in VERBS if v != "config show"])  # takes them all
def test_each_verb_refuses_a_setting_it_does_not_take(verb: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    setting = next(s for s in SETTINGS if s.flag not in _declared_flags(verb)
                   and s.flag not in OWN_FLAGS.get(verb, set()))
    given = [setting.flag] if setting.boolean else [setting.flag, "1"]
    argv = [*verb.split(), *POSITIONALS.get(verb, []), *given]
    assert main(argv) == ExitCode.CONFIG, argv
    # devcontainer run's command takes what follows (argparse.REMAINDER): the value too.
    unknown = setting.flag if verb == "devcontainer run" else " ".join(given)
    assert capsys.readouterr().err == (f"coreos-gpu: error: unrecognized arguments: {unknown}\n"
                                       "coreos-gpu: hint: see coreos-gpu --help\n")


@pytest.mark.parametrize(("argv", "unknown"), [
    (["inspect", "x.tar.gz", "--jobs", "4"], "--jobs 4"),  # issue 28's acceptance
    (["inspect", "--jobs", "4"], "--jobs"),  # "4" is then the archive
    (["publish", "x.tar.gz", "--jobs", "4"], "--jobs 4"),
    (["publish", "x.tar.gz", "--driver-version", "535.261.03"], "--driver-version 535.261.03"),
    (["repository", "refresh", "--output", "x"], "--output x"),
    (["repository", "list", "/srv/repo", "--offline"], "--offline"),
    (["repository", "verify", "/srv/repo", "--key", "k.pub", "--repository", "http://x"],
     "--repository http://x"),
    # sync builds the releases its plan names, each into a file of its own
    (["sync", "--release", "3975.2.2"], "--release 3975.2.2"),
    (["sync", "--output", "x.tar.gz"], "--output x.tar.gz"),
    (["build", "--sync-latest", "3"], "--sync-latest 3"),
    (["cache", "list", "--cache-keep-releases", "1"], "--cache-keep-releases 1"),
    (["releases", "--release", "3975.2.2"], "--release 3975.2.2"),
])
def test_another_verbs_setting_is_an_unknown_flag(argv: list[str], unknown: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """As any unknown flag: the error line and the hint, exit 2, before anything is read."""
    assert main(argv) == ExitCode.CONFIG == 2
    captured = capsys.readouterr()
    assert captured.err == (f"coreos-gpu: error: unrecognized arguments: {unknown}\n"
                            "coreos-gpu: hint: see coreos-gpu --help\n")
    assert captured.out == ""


def test_inspect_refuses_jobs_as_a_user_runs_it(tmp_path: Path) -> None:
    done = subprocess.run([*_command(), "inspect", "x.tar.gz", "--jobs", "4"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("coreos-gpu: error: unrecognized arguments: --jobs 4\n"
                           "coreos-gpu: hint: see coreos-gpu --help\n")


@pytest.fixture(scope="module")
def setting_reads() -> SettingReads:
    return SettingReads()


@pytest.mark.parametrize("verb", VERBS)
def test_a_verb_declares_the_settings_its_code_reads(verb: str,
                                                     setting_reads: SettingReads) -> None:
    """What the verb's function reads of its config, followed into every stage it passes the
    config to (tests/setting_reads.py), is what it declares: a setting read but not declared
    would take no flag, and one declared but never read a flag that does nothing."""
    function = dict(verb_parsers(build_parser()))[tuple(verb.split())].get_default("func")
    assert setting_reads.verb_reads(function.module, function.name) == set(VERB_SETTINGS[verb])


_DEVCONTAINER_VERBS = ("build", "devcontainer prepare", "devcontainer shell", "devcontainer run")


@pytest.mark.parametrize(("file", "old", "new", "found"), [
    # A read deep in a stage, reached by the config passed down: every verb that calls it
    # (sync declares sync_since).
    ("devcontainer.py", "run_args=config.podman_run_options",
     "run_args=config.podman_run_options + (config.sync_since,)",
     dict.fromkeys(_DEVCONTAINER_VERBS, "sync_since")),
    # A read through a classmethod (prune's Policy.of); sync, which prunes, declares jobs.
    ("prune.py", "return cls(config.cache_keep_releases,",
     "return cls(config.jobs + config.cache_keep_releases,", {"cache prune": "jobs"}),
    # sync's builds take the plan's release: without that, the user's releases are read.
    ("sync.py", "releases=(target.release,),", "", {"sync": "releases"}),
    # A config passed where the analysis cannot follow is an error, not a guess.
    ("cli_cache.py", "scan_cache(config.cache_dir)", "scan_cache(config.cache_dir, config)",
     {"cache list": "passed to coreos_gpu.inventory.scan_cache"}),
    ("build.py", "    trust = load_trust(", "    ui.log(str(config))\n    trust = load_trust(",
     {"build": "passed to builtins.str", "sync": "passed to builtins.str"}),
    ("cli_build.py", "devroot, config = _devroot_sandbox(args, holds)\n        ui.log(",
     "pair = _devroot_sandbox(args, holds)\n        devroot, config = pair\n        ui.log(",
     {"devcontainer shell": "a tuple not unpacked"}),
])
def test_the_guard_finds_a_setting_read_but_not_declared(tmp_path: Path, file: str, old: str,
                                                         new: str, found: dict[str, str]) -> None:
    """The guard above, on a copy of the package with one line changed."""
    package = tmp_path / "coreos_gpu"
    shutil.copytree(PACKAGE, package)
    source = package / file
    assert old in source.read_text()
    source.write_text(source.read_text().replace(old, new, 1))
    changed = SettingReads(package)
    failing = {}
    for words, parser in verb_parsers(build_parser()):
        verb, function = " ".join(words), parser.get_default("func")
        try:
            extra = changed.verb_reads(function.module, function.name) - set(VERB_SETTINGS[verb])
        except AssertionError as e:
            extra = {str(e)}
        if extra:
            failing[verb] = " ".join(sorted(extra))
    assert failing.keys() == found.keys()
    for verb, what in found.items():
        assert what in failing[verb], verb


def test_a_verbs_own_settings_come_from_flags_the_rest_from_the_file(tmp_path: Path) -> None:
    """load_config takes a parsed verb without the other settings' keys: their values come
    from the config file (shared by every verb) or the defaults."""
    config_file = tmp_path / "coreos-gpu.toml"
    config_file.write_text('jobs = 3\npublish_key = "file.key"\n')
    args = build_parser().parse_args(["publish", "a.tar.gz", "--index-lifetime", "5",
                                      "--publish-to", "/srv/repo"])
    assert "jobs" not in vars(args)
    config = load_config(vars(args), config_file)
    assert (config.index_lifetime, config.publish_to, config.publish_key, config.jobs) == (
        5, "/srv/repo", "file.key", 3)
    assert (config.sources["index_lifetime"], config.sources["publish_key"],
            config.sources["offline"]) == ("--index-lifetime", str(config_file), "default")
