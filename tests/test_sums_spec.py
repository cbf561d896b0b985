"""SHA256SUMS read by both readers, the Python one (`inspect`, layout.sums_problems) and the
node's (install_nvidia.sh's check_sums, an awk program and openssl or sha256sum, under bash,
dash and busybox sh; and busybox's own awk): every case of spec/sha256sums.json gets the same
verdict from both. They used to disagree: inspect read CRLF lines as the writer meant them,
and the node hashed only the files SHA256SUMS lists, by whatever path a line gives (issue 28).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.layout import sums_problems

from .nodetree import AWKS, SHELLS, awk_bin, node_definitions

REPO = Path(__file__).resolve().parent.parent
SPEC: dict[str, Any] = json.loads((REPO / "spec/sha256sums.json").read_text())
CASES: list[dict[str, Any]] = SPEC["cases"]


def _python_problems(case: dict[str, Any]) -> list[str]:
    files = {path: hashlib.sha256(data.encode()).hexdigest()
             for path, data in case["files"].items() if not path.startswith("../")}
    return sums_problems(case["text"], files)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_python_reader(case: dict[str, Any]) -> None:
    assert ("refused" if _python_problems(case) else "ok") == case["verdict"]


def _write_case(folder: Path, case: dict[str, Any]) -> None:
    """The bundle in folder/bundle; a file named ../x lies in folder."""
    bundle = folder / "bundle"
    bundle.mkdir(parents=True)
    for path, data in case["files"].items():
        (bundle / path).parent.mkdir(parents=True, exist_ok=True)
        (bundle / path).write_bytes(data.encode())
    (bundle / "SHA256SUMS").write_bytes(case["text"].encode())


_VERDICTS: dict[tuple[str, str], dict[str, str]] = {}


def _node_verdicts(shell: str, awk: str, tmp: pytest.TempPathFactory) -> dict[str, str]:
    """Every case's verdict from the node, in one run per shell and awk: "OK" or its problem."""
    if (shell, awk) in _VERDICTS:
        return _VERDICTS[shell, awk]
    tmp_path = tmp.mktemp("sums")
    bin_dir = awk_bin(tmp_path / "bin", awk)
    for number, case in enumerate(CASES):
        _write_case(tmp_path / str(number), case)
    reader = node_definitions("sha256_command", "check_sums")
    script = f'PATH="{bin_dir}:$PATH"\n' + reader + "".join(
        f'printf "%s %s\\n" {n} "$(cd "{tmp_path}/{n}/bundle" && check_sums "")"\n'
        for n in range(len(CASES)))
    out = subprocess.run([*shell.split(), "-c", script], capture_output=True, check=True,
                         timeout=120).stdout.decode()
    # A problem may hold a \r (the CRLF case): lines end at \n only.
    _VERDICTS[shell, awk] = dict(line.split(" ", 1) for line in out.split("\n") if " " in line)
    return _VERDICTS[shell, awk]


@pytest.mark.parametrize("number", range(len(CASES)), ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("awk", AWKS)
@pytest.mark.parametrize("shell", SHELLS)
def test_the_node_reader_agrees(shell: str, awk: str, number: int,
                                tmp_path_factory: pytest.TempPathFactory) -> None:
    said = _node_verdicts(shell, awk, tmp_path_factory).get(str(number), "")
    assert ("ok" if said == "OK" else "refused") == CASES[number]["verdict"], said
