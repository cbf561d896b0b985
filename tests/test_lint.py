"""Linters as tests: they fail CI like any other test."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, check=False, timeout=300)


def test_ruff() -> None:
    result = _run("ruff", "check", "src", "testinputs", "tests", "scripts", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = _run("mypy")  # files and strictness come from pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr
