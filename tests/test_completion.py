"""`coreos-gpu completion SHELL`: each script parses, and completes what the parser offers."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from coreos_gpu.cli import SHELLS, build_parser

from .conftest import run_cli

PARSE_ONLY = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("completion")
    found = {}
    for shell in SHELLS:
        result = run_cli("completion", shell, cwd=folder)
        assert result.code == 0, result.stderr
        found[shell] = folder / shell
        found[shell].write_text(result.stdout)
    return found


def _needs(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (scripts/test installs it)")


@pytest.mark.parametrize("shell", SHELLS)
def test_script_parses(shell: str, scripts: dict[str, Path]) -> None:
    _needs(shell)
    check = subprocess.run([*PARSE_ONLY[shell], str(scripts[shell])], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    assert "coreos-gpu" in scripts[shell].read_text()


def test_unknown_shell_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("completion", "tcsh", cwd=tmp_path)
    assert result.code == 2 and "invalid choice: 'tcsh'" in result.stderr


# Each case: the words typed so far (the last one being completed), and what must be offered.
TOP = sorted(_verbs(build_parser()))
CASES = [
    ([""], TOP),
    (["devcontainer", ""], sorted(_verbs(_verbs(build_parser())["devcontainer"]))),
    (["build", "--run"], ["--runtime"]),
    (["completion", ""], sorted(SHELLS)),
]


def _bash_complete(script: Path, words: list[str]) -> list[str]:
    driver = (f'source {script}\nfn=$(complete -p coreos-gpu); fn=${{fn#*-F }}; '
              'fn=${fn%% *}\nCOMP_WORDS=(coreos-gpu "$@"); COMP_CWORD=$#; '
              'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}\n'
              '"$fn" coreos-gpu "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"\n'
              'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", driver, "bash", *words], capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.split()


def _fish_complete(script: Path, words: list[str]) -> list[str]:
    line = " ".join(["coreos-gpu", *words])
    out = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C '{line}'"],
                         capture_output=True, text=True, timeout=60, check=True)
    return [row.split("\t")[0] for row in out.stdout.splitlines()]


# zsh completes only at an interactive prompt: drive one through a pseudo-terminal. Its
# output is read, after the setup is done, until every expected word shows (or 10 s pass).
ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1=''; autoload -Uz compinit; compinit -u -D; eval \"\$(<${(q)1})\"; print RE''ADY"
out=""
for i in {1..100}; do
  if zpty -r -t z chunk; then out+=$chunk; else sleep 0.1; fi
  [[ $out == *READY* ]] && break
done
zpty -w -n z "coreos-gpu $2"$'\t'
out=""
for i in {1..100}; do
  if zpty -r -t z chunk; then out+=$chunk; else sleep 0.1; fi
  missing=0
  for word in ${@:3}; do [[ $out == *$word* ]] || missing=1; done
  (( missing )) || break
done
for i in {1..5}; do  # the rest of the listing (an expected word may be in a description)
  if zpty -r -t z chunk; then out+=$chunk; else sleep 0.1; fi
done
zpty -d z
print -r -- "$out"
"""


def _zsh_complete(script: Path, words: list[str], expected: list[str]) -> list[str]:
    out = subprocess.run(["zsh", "-f", "-c", ZSH_DRIVER, "zsh", str(script), " ".join(words),
                          *expected], capture_output=True, text=True, timeout=60, check=True,
                         env={"HOME": str(script.parent), "TERM": "dumb", "PATH": "/usr/bin:/bin"})
    # The listing: "name  -- description" lines, or bare names in columns; no descriptions.
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.stdout).replace("\r", "\n")
    return [word for line in screen.splitlines() for word in line.split(" -- ")[0].split()]


@pytest.mark.parametrize(("words", "expected"), CASES,
                         ids=[" ".join(words) or "-" for words, _ in CASES])
@pytest.mark.parametrize("shell", SHELLS)
def test_script_completes_the_parsers_verbs_and_flags(shell: str, words: list[str],
                                                      expected: list[str],
                                                      scripts: dict[str, Path]) -> None:
    _needs(shell)
    if shell == "bash":
        offered = _bash_complete(scripts[shell], words)
    elif shell == "fish":
        offered = _fish_complete(scripts[shell], words)
    else:
        offered = _zsh_complete(scripts[shell], words, expected)
    assert set(expected) <= set(offered), offered


@pytest.mark.parametrize("shell", ["bash", "fish"])
def test_archive_argument_completes_files(shell: str, scripts: dict[str, Path],
                                          tmp_path: Path) -> None:
    _needs(shell)
    (tmp_path / "nvidia.tar.gz").touch()
    words = ["inspect", f"{tmp_path}/nvi"]
    complete = _bash_complete if shell == "bash" else _fish_complete
    assert complete(scripts[shell], words) == [f"{tmp_path}/nvidia.tar.gz"]
