"""The one way coreos-gpu runs external commands: on the host, or in a sandbox.

sandbox.py says what a sandbox's command line is and how to stop it (`Sandbox`); only this
module starts processes (tests/test_run.py holds it to that).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from coreos_gpu.errors import CoreosGpuError, ExitCode

TAIL_LINES = 30
Progress = Callable[[str], None]


class Sandbox(Protocol):
    """What run() needs of a sandbox (sandbox.Sandbox is the one there is)."""

    @property
    def runtime(self) -> str: ...

    def command(self, argv: Sequence[str], *, terminal: bool) -> list[str]:
        """The backend's command line that runs argv in the sandbox."""

    def stop(self, pid: int) -> bool:
        """Ask the sandbox run as pid to stop; False: it has no way, kill its process group."""

    def advice(self, code: int, output: str) -> str:
        """What to add to the hint of a failure ("" for nothing)."""


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Finished(subprocess.CompletedProcess[str]):
    """How a command ended. Captured: stdout (and stderr) whole; into a log: stdout holds
    the last TAIL_LINES lines. A negative returncode is the signal that killed it."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str | None = None,
                 *, timed_out: bool = False) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.timed_out = timed_out


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    sandbox: Sandbox | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    what: str = "",
    check: bool = True,
    stderr_apart: bool = False,
    log: BinaryIO | None = None,
    progress: Progress | None = None,
    terminal: bool = False,
    feed: Sequence[str] = (),
) -> Finished:
    """Run argv (never through a shell), on the host or in `sandbox`, in one of three ways:

    - captured (the default): the output is returned; stderr_apart keeps stderr out of
      stdout (for tools whose stdout is parsed, and whose buffered stdout would come out of
      order with their unbuffered complaints);
    - into `log` (a file open for writing), line by line, each line also to progress; the
      command runs in its own session, so that a timeout or Ctrl-C stops its whole tree;
    - terminal: with our terminal (a shell, `devcontainer run`).

    feed: a host command whose output is argv's input (not captured).

    On failure (unless check=False) the error names what was being done, the exit code, the
    last lines of output, and a command line the user can paste to reproduce it.
    """
    args = [os.fspath(a) for a in argv]
    if sandbox is not None:
        args = sandbox.command(args, terminal=terminal)
    if log is None and not terminal:
        return _run_captured(args, cwd=cwd, env=env, timeout=timeout, what=what, check=check,
                             stderr_apart=stderr_apart)
    if sandbox is not None and log is not None:
        log.write(f"$ {shlex.join(args)}\n".encode())
    done = _run_streamed(args, log=log, feed=feed, progress=progress, timeout=timeout,
                         sandbox=sandbox, cwd=cwd, env=env, what=what)
    if check and (done.returncode != 0 or done.timed_out):
        status = (f"did not finish within {timeout:.0f} s" if done.timed_out
                  else f"was killed by {signal.Signals(-done.returncode).name}"
                  if done.returncode < 0 else f"failed with exit code {done.returncode}")
        where = f" (sandbox: {sandbox.runtime})" if sandbox else ""
        full = f"\nfull log: {log.name}" if log is not None else ""
        hint = f"to reproduce: {shlex.join(args)}"
        advice = sandbox.advice(done.returncode, done.stdout) if sandbox else ""
        raise CoreosGpuError(f"{what or f'running {args[0]}'} {status}{where}\n{done.stdout}"
                             f"{full}", hint=f"{advice}; {hint}" if advice else hint,
                             code=ExitCode.COMMAND)
    return done


def _start(args: Sequence[str], what: str, **options: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(args, **options)
    except FileNotFoundError as e:
        raise CoreosGpuError(f"{what or f'running {args[0]}'} failed: {args[0]} not found",
                             code=ExitCode.TOOL) from e


def _run_captured(args: list[str], *, cwd: Path | None, env: Mapping[str, str] | None,
                  timeout: float | None, what: str, check: bool,
                  stderr_apart: bool) -> Finished:
    command = shlex.join(args)
    if cwd is not None:
        command = f"cd {shlex.quote(str(cwd))} && {command}"
    label = what or f"running {args[0]}"
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CoreosGpuError(
            f"{label} failed: {args[0]} not found", code=ExitCode.TOOL
        ) from e
    except subprocess.TimeoutExpired as e:
        raise CoreosGpuError(
            f"{label} failed: no answer after {timeout:.0f} s",
            hint=f"to reproduce: {command}",
            code=ExitCode.COMMAND,
        ) from e
    if check and proc.returncode != 0:
        output = tail(proc.stdout + (proc.stderr or ""))
        detail = f"\n{output}" if output else ""
        raise CoreosGpuError(
            f"{label} failed with exit code {proc.returncode}{detail}",
            hint=f"to reproduce: {command}",
            code=ExitCode.COMMAND,
        )
    return Finished(args, proc.returncode, proc.stdout, proc.stderr)


def _run_streamed(args: list[str], *, log: BinaryIO | None, feed: Sequence[str],
                  progress: Progress | None, timeout: float | None, sandbox: Sandbox | None,
                  cwd: Path | None, env: Mapping[str, str] | None, what: str) -> Finished:
    """Run args into log (or with our terminal, without one); stdin from feed's output."""
    batch = log is not None
    producer = _start(feed, what, stdout=subprocess.PIPE, stderr=log,
                      stdin=subprocess.DEVNULL) if feed else None
    proc = _start(
        args, what, cwd=cwd, env=None if env is None else dict(env),
        stdin=producer.stdout if producer else subprocess.DEVNULL if batch else None,
        stdout=subprocess.PIPE if batch else None, stderr=subprocess.STDOUT if batch else None,
        start_new_session=batch)
    if producer and producer.stdout:
        producer.stdout.close()  # the consumer has it now; tar gets SIGPIPE if that dies
    expired = threading.Event()

    def stop() -> None:
        # The sandbox's own stop (its client then needs a moment to clean up) comes first;
        # SIGKILL to the group is the last resort, and all that bwrap and unshare need.
        if sandbox is not None and sandbox.stop(proc.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def expire() -> None:
        expired.set()
        stop()

    timer = threading.Timer(timeout or 0, expire)
    lines: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        if timeout and batch:
            timer.start()
        for raw in proc.stdout or ():
            if log is not None:
                log.write(raw)
                log.flush()  # someone may be following the log of a long build
            lines.append(raw.decode(errors="replace").rstrip("\r\n"))
            if progress:
                progress(lines[-1])
        code = proc.wait()
    except BaseException:
        if batch:
            stop()
        raise
    finally:
        timer.cancel()
    if producer and producer.wait() != 0 and code == 0:
        code = producer.returncode
    return Finished(args, code, "\n".join(lines), timed_out=expired.is_set())


@contextlib.contextmanager
def run_reading(argv: Sequence[str | os.PathLike[str]], *, what: str = "") -> Iterator[IO[bytes]]:
    """Start argv (stderr dropped) and yield its output as a stream; it is killed when the
    block ends, read to the end or not (a decompressor, say)."""
    proc = _start([os.fspath(a) for a in argv], what, stdin=subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        yield proc.stdout
    finally:
        proc.kill()
        proc.wait()


def check_tools(*tools: str, why: str, packages: Mapping[str, str] | None = None) -> None:
    """Preflight: say which tools are missing, and how to get them, before doing any work.

    packages maps a tool to its Debian package where the names differ.
    """
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        names = sorted({(packages or {}).get(t, t) for t in missing})
        raise CoreosGpuError(
            f"{why} needs {', '.join(missing)}, which is not on PATH",
            hint=f"install it with your package manager (Debian: apt-get install "
            f"{' '.join(names)})",
            code=ExitCode.TOOL,
        )
