"""run.run, the one process primitive: its three ways of running, and that it is the only one."""

from __future__ import annotations

import ast
import contextlib
import shlex
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.run import run

from .conftest import REPO

PACKAGE = REPO / "src" / "coreos_gpu"
# What starts a process without going through run.run.
SPAWNERS = {("os", name) for name in ("system", "popen", "fork", "forkpty", "posix_spawn",
                                      "posix_spawnp", "execv", "execve", "execvp", "execvpe",
                                      "execl", "execle", "execlp", "execlpe", "spawnv",
                                      "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle")}
SPAWNERS |= {("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell"),
             ("pty", "spawn")}


def _starts_processes(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "subprocess"]
        elif isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            found.append("from subprocess import")
        elif isinstance(node, ast.ImportFrom) and node.module in {m for m, _ in SPAWNERS}:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if (node.module, a.name) in SPAWNERS]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and (node.value.id, node.attr) in SPAWNERS):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_only_run_py_starts_processes() -> None:
    # Every external command goes through run.run (a sandboxed one too, given the Sandbox):
    # one place for capture, logs, timeouts, Ctrl-C and the error a failure shows.
    found = {str(path.relative_to(PACKAGE)): starts
             for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "run.py" and (starts := _starts_processes(ast.parse(
                 path.read_text(), str(path))))}
    assert found == {}
    run_py = (PACKAGE / "run.py").read_text()
    # and in run.py, one Popen (run_reading, streamed runs and their feed) and subprocess.run.
    assert run_py.count("subprocess.Popen(") == 1 and run_py.count("subprocess.run(") == 1


def test_the_guard_sees_a_second_popen() -> None:
    for source in ("import subprocess\n", "from subprocess import Popen\n",
                   "import os\nos.execvp('x', ['x'])\n", "from os import system\n"):
        assert _starts_processes(ast.parse(source)), source


# ---------------------------------------------------------------- captured (the default)

def test_captured_output_and_stderr_apart(tmp_path: Path) -> None:
    done = run(["sh", "-c", "echo out; echo err >&2"], cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "out\nerr\n")
    apart = run(["sh", "-c", "echo out; echo err >&2; exit 4"], stderr_apart=True, check=False)
    assert (apart.returncode, apart.stdout, apart.stderr) == (4, "out\n", "err\n")


def test_captured_failure_shows_the_tail_and_how_to_reproduce(tmp_path: Path) -> None:
    argv = ["sh", "-c", "seq 1 100; exit 3"]
    with pytest.raises(CoreosGpuError) as e:
        run(argv, cwd=tmp_path, what="counting")
    assert e.value.code is ExitCode.COMMAND
    assert e.value.message == "counting failed with exit code 3\n" + "\n".join(
        str(n) for n in range(71, 101))
    assert e.value.hint == f"to reproduce: cd {tmp_path} && {shlex.join(argv)}"


def test_captured_refusals() -> None:
    with pytest.raises(CoreosGpuError) as e:
        run(["coreos-gpu-no-such-tool"])
    assert (e.value.code, e.value.message) == (
        ExitCode.TOOL, "running coreos-gpu-no-such-tool failed: coreos-gpu-no-such-tool not "
        "found")
    with pytest.raises(CoreosGpuError) as e:
        run(["sleep", "30"], timeout=0.5, what="waiting")
    assert (e.value.code, e.value.message) == (ExitCode.COMMAND,
                                               "waiting failed: no answer after 0 s")
    assert e.value.hint == "to reproduce: sleep 30"


# ---------------------------------------------------------------- into a log, in a sandbox

class Fake:
    """A sandbox that is `env` with one variable set: what run() asks of a Sandbox."""

    runtime = "fake"

    def __init__(self) -> None:
        self.stopped: list[int] = []

    def command(self, argv: Sequence[str], *, terminal: bool) -> list[str]:
        return ["env", f"IN_SANDBOX={'terminal' if terminal else 'batch'}", *argv]

    def stop(self, pid: int) -> bool:
        self.stopped.append(pid)
        return False

    def advice(self, code: int, output: str) -> str:
        return "set the fake option" if code == 125 else ""


def test_a_sandboxed_command_streams_into_its_log(tmp_path: Path) -> None:
    lines: list[str] = []
    with (tmp_path / "log").open("wb") as log:
        done = run(["sh", "-c", 'echo "$IN_SANDBOX"; echo two >&2'], sandbox=Fake(), log=log,
                   progress=lines.append)
    assert lines == ["batch", "two"] and done.stdout == "batch\ntwo"
    header = "$ " + shlex.join(["env", "IN_SANDBOX=batch", "sh", "-c",
                                'echo "$IN_SANDBOX"; echo two >&2'])
    assert (tmp_path / "log").read_text() == f"{header}\nbatch\ntwo\n"


@pytest.mark.parametrize(("script", "status", "advice"), [
    ("seq 1 100; exit 3", "failed with exit code 3", ""),
    ("seq 1 100; exit 125", "failed with exit code 125", "set the fake option; "),
    ("seq 1 100; kill -TERM $$", "was killed by SIGTERM", ""),
])
def test_a_sandboxed_failure_names_the_sandbox_and_the_log(script: str, status: str,
                                                          advice: str, tmp_path: Path) -> None:
    with pytest.raises(CoreosGpuError) as e, (tmp_path / "log").open("wb") as log:
        run(["sh", "-c", script], sandbox=Fake(), log=log, what="compiling")
    tail = "\n".join(str(n) for n in range(71, 101))
    assert e.value.code is ExitCode.COMMAND
    assert e.value.message == f"compiling {status} (sandbox: fake)\n{tail}\nfull log: " \
        f"{tmp_path / 'log'}"
    assert e.value.hint == f"{advice}to reproduce: env IN_SANDBOX=batch sh -c '{script}'"


def test_a_timeout_stops_the_whole_tree(tmp_path: Path) -> None:
    seconds = str(40000 + uuid.uuid4().int % 9999)  # a sleep no one else runs
    fake = Fake()
    start = time.monotonic()
    with pytest.raises(CoreosGpuError, match="did not finish within 1 s") as e, \
            (tmp_path / "log").open("wb") as log:
        run(["sh", "-c", f"sleep {seconds} & wait"], sandbox=fake, log=log, timeout=1,
            what="x")
    assert time.monotonic() - start < 10 and len(fake.stopped) == 1
    assert e.value.message.startswith("x did not finish within 1 s (sandbox: fake)\n")
    for _ in range(50):
        if not processes_with(f"sleep\0{seconds}"):
            break
        time.sleep(0.1)
    assert processes_with(f"sleep\0{seconds}") == []


def processes_with(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(cmdline.parent.name)
    return found


def test_a_feed_is_the_input_and_its_failure_counts(tmp_path: Path) -> None:
    with (tmp_path / "log").open("wb") as log:
        done = run(["wc", "-l"], log=log, feed=["seq", "1", "7"])
        failed = run(["cat"], log=log, feed=["sh", "-c", "echo half; exit 2"], check=False)
    assert done.stdout.strip() == "7" and (failed.returncode, failed.stdout) == (2, "half")
    assert "$ " not in (tmp_path / "log").read_text()  # only a sandbox's command is headed
