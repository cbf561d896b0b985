"""node/contents read by both readers, the Python one (`inspect`, layout.contents_problems)
and the node's (install_nvidia.sh's check_contents, an awk program, under bash, dash and
busybox sh; and busybox's own awk): every case of spec/contents.json gets the same verdict
from both. They used to disagree: inspect never read node/contents, and accepted a payload
link out of the driver folder that every node refused (issue 28)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.layout import contents_problems, parse_contents

from .nodetree import AWKS, SHELLS, awk_bin, node_definitions

REPO = Path(__file__).resolve().parent.parent
SPEC: dict[str, Any] = json.loads((REPO / "spec/contents.json").read_text())
CASES: list[dict[str, Any]] = SPEC["cases"]


def _python_problems(text: str) -> list[str]:
    entries, problems = parse_contents(text)
    return problems + contents_problems(entries, SPEC["driver_version"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_python_reader(case: dict[str, Any]) -> None:
    assert ("refused" if _python_problems(case["text"]) else "ok") == case["verdict"]


@pytest.mark.parametrize("awk", AWKS)
@pytest.mark.parametrize("shell", SHELLS)
def test_the_node_reader_agrees(shell: str, awk: str, tmp_path: Path) -> None:
    bin_dir = awk_bin(tmp_path / "bin", awk)
    for number, case in enumerate(CASES):
        (tmp_path / f"{number}/node").mkdir(parents=True)
        (tmp_path / f"{number}/node/contents").write_bytes(case["text"].encode())
    # Each case: "<number> <OK or the node's first problem>".
    script = (f'PATH="{bin_dir}:$PATH"\nDRIVER_VERSION={SPEC["driver_version"]}\n'
              + node_definitions("TOP_NAMES", "check_contents") + "".join(
                  f'printf "%s %s\\n" {n} "$(cd "{tmp_path}/{n}" && check_contents)"\n'
                  for n in range(len(CASES))))
    out = subprocess.run([*shell.split(), "-c", script], capture_output=True, check=True,
                         timeout=60).stdout.decode()
    # A problem may hold a \r (the CRLF case): lines end at \n only.
    verdicts = dict(line.split(" ", 1) for line in out.split("\n") if " " in line)
    for number, case in enumerate(CASES):
        said = verdicts.get(str(number), "")
        want = case.get("verdict_busybox_awk", case["verdict"]) if awk != "awk" else \
            case["verdict"]
        assert ("ok" if said == "OK" else "refused") == want, (case["name"], said)
        if said != "OK" and want == case["verdict"]:  # and in the same words
            assert said in _python_problems(case["text"]), case["name"]
