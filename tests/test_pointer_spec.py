"""index.current read by both readers, the Python one (`repository verify`, `publish`, `sync`)
and the node's (node/repository.sh, under bash, dash and busybox sh): every case of
spec/pointer.json gives the same sha256 or the same refusal in both. They used to disagree:
a pointer without its final newline passed `repository verify` and failed every node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.errors import CoreosGpuError
from coreos_gpu.repository import parse_pointer

from .nodetree import SHELLS

REPO = Path(__file__).resolve().parent.parent
CASES: list[dict[str, Any]] = json.loads((REPO / "spec/pointer.json").read_text())["cases"]
REPOSITORY_SH = REPO / "src/coreos_gpu/resources/node/repository.sh"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_python_reader(case: dict[str, Any]) -> None:
    data = case["text"].encode()
    if case["sha256"] is None:
        with pytest.raises(CoreosGpuError):
            parse_pointer(data, "repo")
    else:
        assert parse_pointer(data, "repo") == case["sha256"]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_node_reader_agrees(shell: str, tmp_path: Path) -> None:
    for number, case in enumerate(CASES):
        (tmp_path / f"{number}").write_bytes(case["text"].encode())
    # Each case: "<number> <sha256 or REFUSED>".
    script = f'. "{REPOSITORY_SH}"\n' + "".join(
        f'printf "%s %s\\n" {n} "$(repo_pointer "{tmp_path}/{n}" || echo REFUSED)"\n'
        for n in range(len(CASES)))
    out = subprocess.run([*shell.split(), "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    verdicts = dict(line.split(" ", 1) for line in out.splitlines())
    for number, case in enumerate(CASES):
        assert verdicts[str(number)] == (case["sha256"] or "REFUSED"), case["name"]
