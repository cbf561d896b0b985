"""The repository's two index forms against their golden vectors: every case of
spec/index-text.json through the Python reader (repository.parse_text, what `repository
verify`, `publish` and `sync` read) and through the node's (node/repository.sh: repo_fresh,
repo_check and repo_pick, sourced under bash, dash and busybox sh, with the system's awk and
busybox's); every case of spec/index-json.json through repository.parse_json (nodes do not read
the JSON index). Where the readers disagreed, the case's `why` says which rule won."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.errors import CoreosGpuError
from coreos_gpu.publish import now_utc
from coreos_gpu.repository import (
    Index,
    TextIndex,
    bundle_lines_of,
    expiry_problem,
    parse_json,
    parse_text,
    render_text,
)

from .nodetree import AWKS, SHELLS, awk_bin

REPO = Path(__file__).resolve().parent.parent
TEXT: list[dict[str, Any]] = json.loads((REPO / "spec/index-text.json").read_text())["cases"]
JSON: list[dict[str, Any]] = json.loads((REPO / "spec/index-json.json").read_text())["cases"]
REPOSITORY_SH = REPO / "src/coreos_gpu/resources/node/repository.sh"


def as_data(value: Any) -> Any:
    """A parsed value as the vectors write it: tuples as lists."""
    return json.loads(json.dumps(asdict(value)))


def text_index(parsed: TextIndex) -> dict[str, Any]:
    return {"generation": parsed.generation, "created": parsed.created,
            "expires": parsed.expires, "key": parsed.key, "json": parsed.json_sha256,
            "bundles": [as_data(b) for b in parsed.bundles]}


def is_expired(index: Index) -> bool:
    return bool(expiry_problem(index, now_utc()))


@pytest.mark.parametrize("case", TEXT, ids=[c["name"] for c in TEXT])
def test_the_python_text_reader(case: dict[str, Any]) -> None:
    data = case["text"].encode()
    if case["index"] is None:
        with pytest.raises(CoreosGpuError):
            parse_text(data, "repo")
        return
    parsed = parse_text(data, "repo")
    assert text_index(parsed) == case["index"]
    # Parse and render are each other's inverse: every bundle line read is written back as is.
    assert [b.render() for b in parsed.bundles] == [
        f"{line}\n" for line in case["text"].split("\n") if line.startswith("bundle ")]
    header = Index(parsed.generation, parsed.created, parsed.key, (), parsed.expires)
    assert is_expired(header) == case.get("expired", False)


@pytest.fixture(params=AWKS)
def awk_first(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """An environment whose awk is the system's or busybox's (a node may have either)."""
    bin_dir = awk_bin(tmp_path / "bin", request.param)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("shell", SHELLS)
def test_the_node_text_reader_agrees(shell: str, tmp_path: Path,
                                     awk_first: dict[str, str]) -> None:
    """repo_fresh refuses what parse_text refuses (23), and an expired index (29), and
    otherwise reads the generation, key and expiry parse_text reads; repo_pick takes only
    bundles parse_text read, and the case's."""
    # Each case: "<n>\t<GENERATION KEY EXPIRES, or REFUSED code>", each pick "<n>.<j>\t<line>".
    # The codes it dies with come from exit-codes.sh, as fetch.sh and provision.sh have them.
    script = [f'. "{REPOSITORY_SH.parent / "exit-codes.sh"}"', f'. "{REPOSITORY_SH}"',
              "say() { :; }", 'die() { echo "REFUSED $1"; exit 0; }',
              f'ROOT="{tmp_path}/root" REPO_CHECK_ONLY=1']
    for n, case in enumerate(TEXT):
        (tmp_path / f"{n}").write_bytes(case["text"].encode())
        index = f'"{tmp_path}/{n}"'
        script.append(f'printf "{n}\\t%s\\n" "$( (repo_fresh url {index} && '
                      f'repo_check {index}) | tail -n 1)"')
        script += [f'printf "{n}.{j}\\t%s\\n" "$(repo_pick {index} {shlex.join(query)})"'
                   for j, (query, _) in enumerate(case.get("picks", []))]
    out = subprocess.run([*shell.split(), "-c", "\n".join(script)], capture_output=True,
                         text=True, check=True, timeout=300, env=awk_first).stdout
    said = dict(line.split("\t", 1) for line in out.splitlines())
    for n, case in enumerate(TEXT):
        index = case["index"]
        if index is None:
            expected = "REFUSED 23"
        elif case.get("expired"):
            expected = "REFUSED 29"
        else:
            expected = f"{index['generation']} {index['key'][7:]} {index['expires'] or '-'}"
        assert said[str(n)] == expected, case["name"]
        read = {f"{b['path']} {b['sha256']} {b['size']} {b['kernel_release']}"
                for b in (index or {"bundles": []})["bundles"]}
        for j, (query, taken) in enumerate(case.get("picks", [])):
            got = said[f"{n}.{j}"] or None
            assert got == taken, (case["name"], query)
            assert got is None or got in read, (case["name"], query)


@pytest.mark.parametrize("case", JSON, ids=[c["name"] for c in JSON])
def test_the_json_reader(case: dict[str, Any]) -> None:
    data = case["text"].encode()
    if case["index"] is None:
        with pytest.raises(CoreosGpuError):
            parse_json(data, "repo")
        return
    parsed = parse_json(data, "repo")
    assert as_data(parsed) == case["index"]
    assert is_expired(parsed) == case.get("expired", False)
    # What the JSON holds, the text index can say: it renders to one the text reader reads
    # back, line for line.
    again = parse_text(render_text(parsed, "e" * 64), "repo")
    assert again.bundles == bundle_lines_of(parsed.entries)
    assert (again.generation, again.created, again.key, again.expires) == (
        parsed.generation, parsed.created, parsed.key, parsed.expires)


def test_every_vector_has_a_name_of_its_own() -> None:
    for cases in (TEXT, JSON):
        names = [c["name"] for c in cases]
        assert len(names) == len(set(names))
