"""The sync examples (examples/github-actions, gitlab-ci, systemd, sync) against their formats'
schemas and against the CLI: every `coreos-gpu` command they run is run here, by bash, with a
stand-in `coreos-gpu` that records its argv and answers `sync --plan` with a plan made by the
CLI's own `_plan_entry`; each recorded argv must parse and mean that plan entry."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from coreos_gpu.cli import build_parser
from coreos_gpu.cli_build import _plan_entry
from coreos_gpu.config import Channel, KernelModuleType, OsName, Profile, load_config
from coreos_gpu.fetch import _dirs as fetch_dirs
from coreos_gpu.sync import Target

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORKFLOW = EXAMPLES / "github-actions/coreos-gpu-sync.yml"
GITLAB = EXAMPLES / "gitlab-ci/.gitlab-ci.yml"
SERVICE = EXAMPLES / "systemd/coreos-gpu-sync.service"
TIMER = EXAMPLES / "systemd/coreos-gpu-sync.timer"
SYNC_CONFIG = EXAMPLES / "sync/coreos-gpu.toml"

# Two entries that differ in every field a build flag carries.
TARGETS = (
    Target(OsName.FLATCAR, Channel.BETA, "4081.1.0", "535.261.03",
           KernelModuleType.PROPRIETARY, Profile.COMPUTE),
    Target(OsName.FLATCAR, Channel.STABLE, "4081.2.0", "580.82.07",
           KernelModuleType.OPEN, Profile.FULL),
)
ENTRIES = [_plan_entry(t) for t in TARGETS]
EMPTY: list[dict[str, Any]] = []
# The keys of a GitLab pipeline that are not jobs.
GITLAB_GLOBALS = {"default", "include", "stages", "variables", "workflow", "image", "services",
                  "cache", "before_script", "after_script"}

# Records each call's argv (NUL-separated) in a file named for the time; prints the plan
# for --plan.
STAND_IN = """#!/bin/sh
printf '%s\\0' "$@" > "$COREOS_GPU_CALLS/$(date +%s%N)"
case " $* " in *" --plan "*) cat "$COREOS_GPU_PLAN" ;; esac
"""
COREOS_GPU_CALL = re.compile(r"(^|[\s;&|(])coreos-gpu\s", re.MULTILINE)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def check_schema(name: str, path: Path) -> None:
    """check-jsonschema's copy of SchemaStore's schema: no network."""
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", f"vendor.{name}", path],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


class Shell:
    """Runs example scripts with bash in a folder, with the stand-in first on PATH."""

    def __init__(self, root: Path, entries: Sequence[Mapping[str, Any]]) -> None:
        self.cwd = root / "work"
        self.calls = root / "calls"
        for folder in (self.cwd, self.calls, root / "bin"):
            folder.mkdir()
        stand_in = root / "bin/coreos-gpu"
        stand_in.write_text(STAND_IN)
        stand_in.chmod(0o755)
        self.plan = root / "plan.json"
        self.plan.write_text(json.dumps({"include": list(entries)}, indent=2))
        self.env = {"PATH": f"{root / 'bin'}:{os.environ['PATH']}", "HOME": str(root),
                    "COREOS_GPU_CALLS": str(self.calls), "COREOS_GPU_PLAN": str(self.plan)}

    def run(self, script: str, env: Mapping[str, str]) -> None:
        # Stop at the first failing command, as GitHub's and GitLab's shells do, and at an
        # unset variable: the scripts must not use one their job does not set.
        result = subprocess.run(["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c",
                                 script],
                                cwd=self.cwd, env=self.env | dict(env), capture_output=True,
                                text=True, check=False)
        assert result.returncode == 0, f"{script}\n{result.stdout}{result.stderr}"

    def argvs(self) -> list[list[str]]:
        """The calls so far, in order, forgotten."""
        files = sorted(self.calls.iterdir(), key=lambda f: int(f.name))
        calls = [f.read_text().split("\0")[:-1] for f in files]
        for f in files:
            f.unlink()
        return calls


def parse(argv: Sequence[str]) -> Any:
    """The parsed command line, whose setting flags must also hold values the settings take."""
    args = build_parser().parse_args(list(argv))
    load_config(vars(args), None)
    return args


def check_builds(argvs: list[list[str]], entries: Sequence[Mapping[str, Any]]) -> None:
    """One build and one publish per entry, with that entry's settings and archive, the
    archive built before it is published (and `cache list`, which only reports)."""
    argvs = [a for a in argvs if parse(a).verb != "cache" or parse(a).action != "list"]
    builds = [parse(a) for a in argvs if a[:1] == ["build"]]
    publishes = [parse(a) for a in argvs if a[:1] == ["publish"]]
    assert len(builds) == len(publishes) == len(entries) == len(argvs) / 2, argvs
    built: list[str] = []
    for args in map(parse, argvs):
        if args.verb == "build":
            built.append(str(args.output))
        else:
            assert {str(a) for a in args.archives} <= set(built), "published before built"
    meant = sorted((e["os"], e["channel"], [e["release"]], e["driver_version"],
                    e["kernel_module_type"], e["profile"], e["output"]) for e in entries)
    assert sorted((b.os, b.channel, b.releases, b.driver_version, b.kernel_module_type,
                   b.profile, b.output) for b in builds) == meant
    assert sorted([str(a) for a in p.archives] for p in publishes) == sorted(
        [e["output"]] for e in entries)


def downloads_of(cache_dir: Path) -> Path:
    """What a cache keeps between runs: the downloads, the one part worth its size."""
    return fetch_dirs(cache_dir)[0].parent


# --- GitHub Actions -----------------------------------------------------------------------

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def expand_github(text: str, entry: Mapping[str, Any] | None) -> str:
    """${{ matrix.KEY }} from the entry; secrets and variables as stand-ins; nothing else."""

    def value(match: re.Match[str]) -> str:
        context, _, key = match.group(1).partition(".")
        if context == "matrix" and entry is not None:
            return str(entry[key])
        if context in ("secrets", "vars") and re.fullmatch(r"\w+", key):
            return f"{context}-{key}"
        raise AssertionError(f"the test does not know what {match.group(0)} is in a step")

    return EXPRESSION.sub(value, text)


def run_github_job(shell: Shell, job: str, entry: Mapping[str, Any] | None) -> dict[str, str]:
    """Every step of the job that calls coreos-gpu, with its env as GitHub would set it;
    returns the step outputs written to $GITHUB_OUTPUT."""
    workflow = load_yaml(WORKFLOW)
    outputs = shell.cwd.parent / "github_output"
    outputs.write_text("")
    base = {"RUNNER_TEMP": str(shell.cwd.parent), "GITHUB_OUTPUT": str(outputs),
            "GITHUB_STEP_SUMMARY": str(shell.cwd.parent / "summary")}
    steps = [s for s in workflow["jobs"][job]["steps"] if COREOS_GPU_CALL.search(s.get("run", ""))]
    assert steps, f"job {job} calls no coreos-gpu"
    for step in steps:
        env = base | {k: expand_github(str(v), entry) for scope in (
            workflow.get("env", {}), workflow["jobs"][job].get("env", {}), step.get("env", {}))
            for k, v in scope.items()}
        shell.run(expand_github(step["run"], entry), env)
    return dict(line.split("=", 1) for line in outputs.read_text().splitlines())


def test_the_workflow_is_valid() -> None:
    check_schema("github-workflows", WORKFLOW)


@pytest.mark.parametrize("entries", [ENTRIES, EMPTY], ids=["two", "none"])
def test_the_workflow_plan_job_outputs_the_matrix(tmp_path: Path,
                                                  entries: list[dict[str, Any]]) -> None:
    shell = Shell(tmp_path, entries)
    outputs = run_github_job(shell, "plan", None)
    assert [parse(a).plan for a in shell.argvs()] == [True]
    assert json.loads(outputs["matrix"]) == {"include": entries}
    assert outputs["count"] == str(len(entries))
    # The job outputs are those step outputs; the build job takes them as they are.
    jobs = load_yaml(WORKFLOW)["jobs"]
    step = "${{ steps.plan.outputs.%s }}"
    assert jobs["plan"]["outputs"] == {"matrix": step % "matrix", "count": step % "count"}
    build = jobs["build"]
    assert build["needs"] == "plan"
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert build["strategy"]["fail-fast"] is False
    # GitHub refuses an empty matrix: no build job when the count is 0.
    assert build["if"] == "needs.plan.outputs.count != '0'"


def test_the_workflow_build_job_builds_and_publishes_its_entry(tmp_path: Path) -> None:
    shell = Shell(tmp_path, ENTRIES)
    calls = []
    for entry in ENTRIES:
        run_github_job(shell, "build", entry)
        calls += shell.argvs()
    check_builds(calls, ENTRIES)
    key = tmp_path / "repo.key"
    assert not key.exists(), "the key outlives its step"
    assert all(parse(a).key == str(key) for a in calls if a[0] == "publish")


def test_the_workflow_refreshes_the_index_after_every_build(tmp_path: Path) -> None:
    """Nodes refuse an expired index: the refresh job runs after the builds, whether they
    failed or none was needed, with the key in a file that does not outlive its step."""
    job = load_yaml(WORKFLOW)["jobs"]["refresh"]
    assert set(job["needs"]) == {"plan", "build"} and job["if"].startswith("always()")
    shell = Shell(tmp_path, ENTRIES)
    run_github_job(shell, "refresh", None)
    (call,) = shell.argvs()
    assert call[:2] == ["repository", "refresh"]
    assert parse(call).key == str(tmp_path / "repo.key")
    assert not (tmp_path / "repo.key").exists()


def test_the_workflow_uses_only_plan_entry_keys() -> None:
    used = set(re.findall(r"\bmatrix\.([A-Za-z_][\w-]*)", WORKFLOW.read_text()))
    assert used and used <= set(ENTRIES[0]), used - set(ENTRIES[0])


def test_the_workflow_caches_the_downloads_folder(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached path is the downloads folder of the cache_dir the build uses (the default,
    on the runner), restored and saved under the same key."""
    steps = load_yaml(WORKFLOW)["jobs"]["build"]["steps"]
    restore, save = ([s["with"] for s in steps
                      if s.get("uses", "").startswith(f"actions/cache/{verb}@")]
                     for verb in ("restore", "save"))
    assert len(restore) == len(save) == 1 and restore == save
    shell = Shell(tmp_path, ENTRIES)
    run_github_job(shell, "build", ENTRIES[0])
    build = next(parse(a) for a in shell.argvs() if a[0] == "build")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/runner")
    cache_dir = load_config(vars(build), None).cache_dir
    assert Path(restore[0]["path"]).expanduser() == downloads_of(cache_dir)


def test_the_workflow_writes_the_key_with_mode_0600(tmp_path: Path) -> None:
    """The publish step with `coreos-gpu` checking its --key file as it runs."""
    shell = Shell(tmp_path, ENTRIES)
    (tmp_path / "bin/coreos-gpu").write_text(
        "#!/bin/sh\nwhile [ $# -gt 1 ]; do [ \"$1\" = --key ] && stat -c %a \"$2\" "
        f"> {tmp_path}/mode; shift; done\n")
    run_github_job(shell, "build", ENTRIES[0])
    assert (tmp_path / "mode").read_text().strip() == "600"


# --- GitLab CI ----------------------------------------------------------------------------


def gitlab_jobs(pipeline: Mapping[str, Any]) -> dict[str, Any]:
    """The jobs, each in a stage the pipeline has (a rule GitLab checks and the schema can't)."""
    jobs = {name: job for name, job in pipeline.items() if name not in GITLAB_GLOBALS}
    for name, job in jobs.items():
        assert job.get("stage", "test") in pipeline.get("stages", ["test"]), name
    return jobs


def render_child(shell: Shell) -> tuple[Path, dict[str, Any]]:
    """The plan job's own commands: the plan, and the transformation into the child pipeline
    that the trigger job runs."""
    pipeline = load_yaml(GITLAB)
    plan_job = pipeline["plan"]
    include = pipeline["build"]["trigger"]["include"]
    assert include == [{"artifact": include[0]["artifact"], "job": "plan"}]
    artifact = include[0]["artifact"]
    assert artifact in plan_job["artifacts"]["paths"]
    env = {k: str(v) for k, v in pipeline.get("variables", {}).items()}
    commands = [c for c in plan_job["script"] if COREOS_GPU_CALL.search(c) or artifact in c]
    assert len(commands) == 2, commands  # the plan, and what turns it into the child
    for command in commands:
        shell.run(command, env)
    assert [parse(a).plan for a in shell.argvs()] == [True]
    child = shell.cwd / artifact
    return child, yaml.safe_load(child.read_text())


def test_the_gitlab_pipeline_is_valid() -> None:
    check_schema("gitlab-ci", GITLAB)
    assert set(gitlab_jobs(load_yaml(GITLAB))) == {"plan", "build", "refresh"}


def test_the_gitlab_refresh_job_runs_after_every_build(tmp_path: Path) -> None:
    """Nodes refuse an expired index: refresh signs it whether builds failed or none ran."""
    pipeline = load_yaml(GITLAB)
    job = pipeline["refresh"]
    assert job["when"] == "always"
    assert pipeline["stages"].index(job["stage"]) > pipeline["stages"].index("build")
    shell = Shell(tmp_path, ENTRIES)
    for command in job["script"]:
        shell.run(command, {"REPO_KEY": str(tmp_path / "repo.key")})
    (call,) = shell.argvs()
    assert call[:2] == ["repository", "refresh"]
    assert parse(call).key == str(tmp_path / "repo.key")


@pytest.mark.parametrize("entries", [ENTRIES, EMPTY], ids=["two", "none"])
def test_the_gitlab_child_pipeline_is_valid(tmp_path: Path,
                                           entries: list[dict[str, Any]]) -> None:
    child, pipeline = render_child(Shell(tmp_path, entries))
    check_schema("gitlab-ci", child)
    # jq's $ENV.NAME of a variable the plan job lacks is null, which the schema lets by.
    assert "null" not in child.read_text()
    jobs = gitlab_jobs(pipeline)
    if entries:
        assert set(jobs) == {e["id"] for e in entries}
        for entry in entries:
            script = "\n".join(jobs[entry["id"]]["script"])
            assert entry["build_flags"] in script and entry["output"] in script
    else:
        # A pipeline needs a job: one that calls nothing.
        assert len(jobs) == 1
        assert not any(COREOS_GPU_CALL.search(s) for job in jobs.values() for s in job["script"])


def test_the_gitlab_child_jobs_build_and_publish_their_entry(tmp_path: Path) -> None:
    shell = Shell(tmp_path, ENTRIES)
    _, pipeline = render_child(shell)
    # Project variables (REPO_KEY is a File variable: its value is a path) and the child's own.
    env = {"REPO_KEY": str(tmp_path / "repo.key")} | {
        k: str(v) for k, v in pipeline.get("variables", {}).items()}
    for entry in ENTRIES:
        for command in pipeline[entry["id"]]["script"]:
            shell.run(command, env)
    calls = shell.argvs()
    check_builds(calls, ENTRIES)
    assert all(parse(a).key == str(tmp_path / "repo.key") for a in calls if a[0] == "publish")
    # The setup the scripts run after uses the child's own variables only.
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", json.dumps(pipeline["default"])))
    assert used <= set(pipeline.get("variables", {})), used
    # Each job caches the downloads folder of the cache_dir it builds with.
    jobs = {e["output"]: pipeline[e["id"]] for e in ENTRIES}
    for build in (parse(a) for a in calls if a[0] == "build"):
        cache_dir = load_config(vars(build), None).cache_dir
        assert jobs[str(build.output)]["cache"]["paths"] == [str(downloads_of(cache_dir))]


# --- systemd ------------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    # systemd joins a line that ends in a backslash to the next, with a space.
    unit.read_string(re.sub(r"\\\n\s*", " ", path.read_text()))
    return unit


def test_the_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` warns on stderr about unknown keys and bad values, so any
    output fails. It also wants ExecStart='s program: a stand-in, in copies of the units."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: scripts/test installs systemd-container")
    program = shlex.split(read_unit(SERVICE)["Service"]["ExecStart"])[0]
    stand_in = tmp_path / "coreos-gpu"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    (units / SERVICE.name).write_text(SERVICE.read_text().replace(program, str(stand_in)))
    shutil.copy(TIMER, units)
    result = subprocess.run(
        ["systemd-analyze", "verify", units / SERVICE.name, units / TIMER.name],
        env=os.environ | {"SYSTEMD_UNIT_PATH": f"{units}:"}, capture_output=True, text=True,
        check=False)
    assert result.returncode == 0 and not result.stdout + result.stderr, (
        result.stdout + result.stderr)


def test_the_timer_starts_the_service() -> None:
    timer = read_unit(TIMER)
    assert timer["Timer"]["Unit"] == SERVICE.name
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_the_service_runs_sync_with_its_cache_and_config() -> None:
    service = read_unit(SERVICE)["Service"]
    argv = shlex.split(service["ExecStart"])[1:]
    # %C is systemd's cache root for system units, where CacheDirectory= makes its folder.
    assert not re.search(r"%[^C]", " ".join(argv)), "a specifier the test does not expand"
    args = parse([a.replace("%C", "/var/cache") for a in argv])
    assert args.verb == "sync" and not args.plan
    assert str(args.cache_dir) == f"/var/cache/{service['CacheDirectory']}"
    assert args.config.name == SYNC_CONFIG.name
    assert service["Type"] == "oneshot"


# --- the config they share ----------------------------------------------------------------


def test_the_sync_config_loads() -> None:
    config = load_config({}, SYNC_CONFIG)
    for key in ("repository", "repository_key", "publish_to", "publish_key", "sync_channels",
                "sync_prune"):
        assert config.sources[key] == str(SYNC_CONFIG), f"{key} is not set"
    # The build host's cache is bounded: sync prunes it after every run.
    assert config.sync_prune and config.cache_keep_releases >= config.sync_latest
    assert config.repository.startswith("https://")
    assert config.sync_channels
