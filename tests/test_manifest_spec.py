"""MANIFEST.json against its golden vectors: every case of spec/manifest.json through
inspection.read_manifest, what `inspect` reads. Python only: nodes read no JSON (no node
script opens MANIFEST.json; they read node/contents and SHA256SUMS, spec/contents.json and
spec/sha256sums.json). Where inspect used to read a case otherwise, its `why` says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.inspection import read_manifest

REPO = Path(__file__).resolve().parent.parent
CASES: list[dict[str, Any]] = json.loads((REPO / "spec/manifest.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_python_reader(case: dict[str, Any]) -> None:
    manifest, problems = read_manifest(case["text"].encode(case.get("encoding", "utf-8")))
    assert ("refused" if problems else "ok") == case["verdict"], problems
    if problems:
        assert case["problem"] in problems[0]
    else:
        assert manifest["driver_version"] == "535.261.03"

