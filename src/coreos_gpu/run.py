"""The one way coreos-gpu runs external commands."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from coreos_gpu.errors import CoreosGpuError, ExitCode

TAIL_LINES = 30


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    what: str = "",
    check: bool = True,
    stderr_apart: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run argv (never through a shell) and return its captured output.

    stderr_apart keeps stderr out of stdout (for tools whose stdout is parsed, and whose
    buffered stdout would come out of order with their unbuffered complaints).

    On failure (unless check=False) the error names what was being done, the exit code, the
    last lines of output, and a command line the user can paste to reproduce it.
    """
    args = [os.fspath(a) for a in argv]
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
    return proc


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
