"""node/contents read by both readers, the Python one (`inspect`, layout.contents_problems)
and the node's (install_nvidia.sh's check_contents, an awk program, under bash, dash and
busybox sh; and busybox's own awk): every case of spec/contents.json gets the same verdict
from both. They used to disagree: inspect never read node/contents, and accepted a payload
link out of the driver folder that every node refused (issue 28)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.layout import contents_problems, parse_contents

from .nodetree import SHELLS

REPO = Path(__file__).resolve().parent.parent
SPEC: dict[str, Any] = json.loads((REPO / "spec/contents.json").read_text())
CASES: list[dict[str, Any]] = SPEC["cases"]
NODE = REPO / "src/coreos_gpu/resources/node"


def _python_problems(text: str) -> list[str]:
    entries, problems = parse_contents(text)
    return problems + contents_problems(entries, SPEC["driver_version"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_python_reader(case: dict[str, Any]) -> None:
    assert ("refused" if _python_problems(case["text"]) else "ok") == case["verdict"]


def _node_check() -> str:
    """check_contents and the TOP_NAMES it reads, cut out of whichever node scripts hold them
    (sourcing install_nvidia.sh would run it)."""
    texts = [script.read_text() for script in sorted(NODE.glob("*.sh"))]
    function = next((m.group(0) for t in texts if (m := re.search(
        r"^check_contents\(\) \{\n.*?^\}\n", t, re.M | re.S))), None)
    top = next((m.group(0) for t in texts if (m := re.search(r"^TOP_NAMES=.*\n", t, re.M))),
               None)
    assert function and top, f"no node script in {NODE} defines check_contents and TOP_NAMES"
    return top + function


@pytest.mark.parametrize("awk", ["awk", "busybox awk"])
@pytest.mark.parametrize("shell", SHELLS)
def test_the_node_reader_agrees(shell: str, awk: str, tmp_path: Path) -> None:
    if awk != "awk" and shutil.which("busybox") is None:
        pytest.skip("busybox is not installed")
    bin_dir = tmp_path / "bin"  # `awk` is busybox's where asked
    bin_dir.mkdir()
    if awk != "awk":
        (bin_dir / "awk").write_text('#!/bin/sh\nexec busybox awk "$@"\n')
        (bin_dir / "awk").chmod(0o755)
    for number, case in enumerate(CASES):
        (tmp_path / f"{number}/node").mkdir(parents=True)
        (tmp_path / f"{number}/node/contents").write_bytes(case["text"].encode())
    # Each case: "<number> <OK or the node's first problem>".
    script = (f'PATH="{bin_dir}:$PATH"\nDRIVER_VERSION={SPEC["driver_version"]}\n'
              + _node_check() + "".join(
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
