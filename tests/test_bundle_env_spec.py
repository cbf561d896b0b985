"""node/bundle.env read by both readers, the Python one (node.read_bundle_env and
settings_problem, what `inspect` checks) and the node's (lib.sh's bundle_value and
install_nvidia.sh's check_settings, under bash, dash and busybox sh; and busybox's own awk):
every case of spec/bundle-env.json reads the same values and gets the same verdict from both.
Python had no reader: inspect never read bundle.env (issue 28). And what the build writes
(node.render_bundle_env), both read back, for every character the settings allow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.node import (
    SETTINGS_KEYS,
    NodeSettings,
    read_bundle_env,
    render_bundle_env,
    settings_problem,
)
from coreos_gpu.repository import RepositoryTrust

from .nodetree import AWKS, SHELLS, awk_bin, node_definitions

REPO = Path(__file__).resolve().parent.parent
SPEC: dict[str, Any] = json.loads((REPO / "spec/bundle-env.json").read_text())
CASES: list[dict[str, Any]] = SPEC["cases"]
DRIVER = SPEC["driver_version"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_python_reader(case: dict[str, Any]) -> None:
    values = read_bundle_env(case["text"])
    assert {key: values.get(key) for key in case["values"]} == case["values"]
    problem = settings_problem(values, DRIVER)
    assert ("refused" if problem else "ok") == case["verdict"], problem


def _run_node(shell: str, awk: str, tmp_path: Path, texts: list[str],
              keys: list[list[str]]) -> tuple[list[dict[str, str | None]], list[str]]:
    """For each text, what bundle_value reads for each of its keys (None: nothing, not even
    an empty line), and check_settings' verdict ("" when it passes)."""
    bin_dir = awk_bin(tmp_path / "bin", awk)
    lines = [f'PATH="{bin_dir}:$PATH"\nDRIVER_VERSION={DRIVER}\n',
             node_definitions("BUNDLE_ENV_AWK", "bundle_value", "check_settings")]
    for n, text in enumerate(texts):
        (tmp_path / f"{n}.env").write_bytes(text.encode())
        lines.append(f'check_settings "{tmp_path}/{n}.env" >"{tmp_path}/{n}.check"\n')
        for i, key in enumerate(keys[n]):
            (tmp_path / f"{n}.{i}.key").write_bytes(key.encode())
            lines.append(f'bundle_value "$(cat "{tmp_path}/{n}.{i}.key")" "{tmp_path}/{n}.env"'
                         f' >"{tmp_path}/{n}.{i}.value"\n')
    subprocess.run([*shell.split(), "-c", "".join(lines)], check=True, timeout=120)
    values: list[dict[str, str | None]] = []
    for n in range(len(texts)):
        read = {}
        for i, key in enumerate(keys[n]):
            out = (tmp_path / f"{n}.{i}.value").read_bytes().decode()
            read[key] = out.removesuffix("\n") if out else None  # awk's print ends in \n
        values.append(read)
    return values, [(tmp_path / f"{n}.check").read_bytes().decode() for n in range(len(texts))]


_NODE: dict[tuple[str, str], tuple[list[dict[str, str | None]], list[str]]] = {}


def _node_cases(shell: str, awk: str, tmp: pytest.TempPathFactory
                ) -> tuple[list[dict[str, str | None]], list[str]]:
    """Every case through the node's reader, in one run per shell and awk."""
    if (shell, awk) not in _NODE:
        _NODE[shell, awk] = _run_node(shell, awk, tmp.mktemp("env"),
                                      [c["text"] for c in CASES],
                                      [list(c["values"]) for c in CASES])
    return _NODE[shell, awk]


@pytest.mark.parametrize("number", range(len(CASES)), ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("awk", AWKS)
@pytest.mark.parametrize("shell", SHELLS)
def test_the_node_reader_agrees(shell: str, awk: str, number: int,
                                tmp_path_factory: pytest.TempPathFactory) -> None:
    values, checks = _node_cases(shell, awk, tmp_path_factory)
    case = CASES[number]
    assert values[number] == case["values"]
    said = checks[number]
    assert ("refused" if said else "ok") == case["verdict"], said
    if said:  # in the same words
        assert said == settings_problem(read_bundle_env(case["text"]), DRIVER)


# Values of every character the settings allow (config.UNIT, config._url: anything but white
# space, so ', ", $, \ and `), each value rendered as the build renders it.
ROUND_TRIP = [
    ("https://repo.example/nvidia", ("dcos-mesos-slave.service",)),
    ("https://repo.example/it's", ("a\\x2db.service", "b@c:d.service")),
    ("file:///srv/'quoted'/\"double\"/$(reboot)/`id`/back\\slash", ("x.service",)),
    ("https://repo.example/''''", ("y.service",)),
    ("https://repo.example/'\"'\"'", ("z.service",)),
    ("https://repo.example/a=b;c&d|e<f>g*h?i[j]k{l}m~n#o%p!q", ("w.service",)),
]


def _rendered(url: str, units: tuple[str, ...]) -> str:
    trust = RepositoryTrust(url=url, public_key_pem=b"", fingerprint="sha256:" + "5d" * 32)
    return render_bundle_env(NodeSettings(agent_units=units, repository=trust),
                             driver_version=DRIVER, flavour="open", profile="full",
                             os="coreos", kernel_releases=["6.1.0-50-amd64", "6.6.54-flatcar"],
                             tool_version="0.1.0")


def test_what_the_build_writes_python_reads_back() -> None:
    for url, units in ROUND_TRIP:
        values = read_bundle_env(_rendered(url, units))
        assert (values["REPOSITORY_URL"], values["AGENT_UNITS"]) == (url, " ".join(units))
        assert settings_problem(values, DRIVER) is None
        assert list(values) == list(SETTINGS_KEYS)


@pytest.mark.parametrize("awk", AWKS)
@pytest.mark.parametrize("shell", SHELLS)
def test_what_the_build_writes_the_node_reads_back(shell: str, awk: str,
                                                   tmp_path: Path) -> None:
    texts = [_rendered(url, units) for url, units in ROUND_TRIP]
    values, checks = _run_node(shell, awk, tmp_path, texts, [list(SETTINGS_KEYS)] * len(texts))
    for text, read, check in zip(texts, values, checks, strict=True):
        assert read == read_bundle_env(text)
        assert check == ""
