"""The man pages: committed as scripts/manpages.py makes them now, clean for groff, and found by
man once pip has installed the package into a virtual environment."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from coreos_gpu.cli import build_parser
from scripts import manpages

from .conftest import REPO

PAGES = ("coreos-gpu.1", "coreos-gpu-node.8")


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return manpages.render_pages()


def test_committed_pages_are_the_generated_ones(generated: dict[str, str]) -> None:
    assert sorted(generated) == sorted(PAGES)
    stale = [name for name, text in generated.items()
             if not (REPO / "man" / name).exists()
             or (REPO / "man" / name).read_text(encoding="utf-8") != text]
    assert not stale, (
        f"man/{', man/'.join(stale)}: not what the parser, the node scripts' --help and "
        f"docs/reference/exit-codes.md make now: run `{manpages.REGENERATE}` and commit man/")


def test_generating_again_gives_the_same_bytes(
    generated: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another terminal width (argparse wraps to it) and a build date must change nothing.
    monkeypatch.setenv("COLUMNS", "43")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    assert manpages.render_pages() == generated


def test_every_verb_has_its_subsection(generated: dict[str, str]) -> None:
    def verbs(parser: argparse.ArgumentParser) -> list[str]:
        found = [parser.prog]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += verbs(sub)
        return found

    names = verbs(build_parser())
    assert "coreos-gpu repository list" in names  # nested verbs are walked
    for name in names[1:]:
        assert f".SS \\fB{manpages.escape(name)}\\fR\n" in generated["coreos-gpu.1"], name


@pytest.mark.parametrize("page", PAGES)
def test_groff_finds_nothing_to_warn_about(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.fail("groff is missing: scripts/test installs man-db, which brings it")
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(REPO / "man" / page)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_man_finds_the_pages_pip_installs(tmp_path: Path) -> None:
    """`pip install .` into a venv, then `man` with only the venv's bin on PATH for a hint.
    The wheel is built as pip install . builds it, without build isolation (hatchling is in
    the test extra: no index needed), and installed by the venv's own pip."""
    if shutil.which("man") is None:
        pytest.fail("man is missing: scripts/test installs man-db")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(tmp_path / "dist"), str(REPO)], check=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    wheel, = (tmp_path / "dist").glob("coreos_gpu-*.whl")
    # The one table of exit codes (coreos_gpu.errors reads it at import) and the node's
    # constants made from it are package data.
    packed = zipfile.ZipFile(wheel).namelist()
    assert {"coreos_gpu/resources/exit-codes.toml",
            "coreos_gpu/resources/node/exit-codes.sh"} <= set(packed)
    subprocess.run([*pip, "--python", str(venv / "bin/python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)

    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT", "MANSECT")}
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "100", "LC_ALL": "C.UTF-8"}

    def man(*argv: str) -> str:
        result = subprocess.run(["man", *argv], env=env, capture_output=True, text=True,
                                check=False, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert man("-w", "coreos-gpu").strip() == str(venv / "share/man/man1/coreos-gpu.1")
    assert man("-w", "coreos-gpu-node").strip() == str(
        venv / "share/man/man8/coreos-gpu-node.8")
    page = man("coreos-gpu")
    assert "coreos-gpu publish" in page and "EXIT STATUS" in page
    assert "a signature does not verify" in page  # from docs/reference/exit-codes.md
    node = " ".join(man("8", "coreos-gpu-node").split())  # as words, wherever lines break
    assert "--expect-sha256 HEX" in node  # from install_nvidia.sh --help
    assert "Flatcar has no man" in node
