"""The `agents` presets: which units a bundle orders after nvidia.service and what their
drop-in says, how presets and agent_units combine, and render for a Kubernetes node
(provisioning ordered before kubelet and containerd, and the smoke-test Pod)."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from coreos_gpu.config import (
    AGENT_PRESET_UNITS,
    DEFAULT_AGENT_UNITS,
    Agent,
    DriverFailurePolicy,
    load_config,
)
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.node import NodeSettings, render_node_files
from coreos_gpu.provision import UNIT

from .conftest import CliResult
from .nodetree import make_bundle
from .render_tools import schema_problems, unit_setting

Cli = Callable[..., CliResult]
K8S = ("kubelet.service", "containerd.service")
URL = "https://gpu.example.com/bundles/nvidia.tar.gz"
BY_URL = ("--bundle-url", URL, "--bundle-sha256", "ab" * 32)
PRESET_UNITS = {"mesos": DEFAULT_AGENT_UNITS, "kubelet": ("kubelet.service",),
                "containerd": ("containerd.service",), "docker": ("docker.service",),
                "crio": ("crio.service",), "nomad": ("nomad.service",), "podman": ()}


# --- config --------------------------------------------------------------------------------

def test_the_default_is_dcos_as_before() -> None:
    config = load_config({}, None)
    assert config.agents == (Agent.MESOS,)
    assert config.agent_units == DEFAULT_AGENT_UNITS
    assert config.mesos_path
    assert config.sources["agents"] == config.sources["agent_units"] == "default"


def test_every_preset_has_its_units() -> None:
    assert {a.value: AGENT_PRESET_UNITS[a] for a in Agent} == PRESET_UNITS


@pytest.mark.parametrize("preset", [p for p, units in PRESET_UNITS.items() if units])
def test_each_preset_alone(preset: str) -> None:
    config = load_config({"agents": [preset]}, None)
    assert config.agents == (Agent(preset),)
    assert config.agent_units == PRESET_UNITS[preset]
    assert config.mesos_path is (preset == "mesos")
    assert config.sources["agent_units"] == "agents (--agent)"


@pytest.mark.parametrize(("flags", "agents", "units", "mesos_path"), [
    # agent_units alone: those units alone, as before presets (earlier configs build the same).
    ({"agent_units": ["my-agent.service"]}, (), ("my-agent.service",), True),
    # with presets: added to theirs, in order, each once.
    ({"agents": ["kubelet", "containerd"], "agent_units": ["gpu-job.service"]},
     (Agent.KUBELET, Agent.CONTAINERD), (*K8S, "gpu-job.service"), False),
    ({"agents": ["kubelet", "containerd"], "agent_units": ["containerd.service"]},
     (Agent.KUBELET, Agent.CONTAINERD), K8S, False),
    ({"agents": ["podman"], "agent_units": ["gpu-job.service"]},
     (Agent.PODMAN,), ("gpu-job.service",), False),
    ({"agents": ["mesos", "docker"]}, (Agent.MESOS, Agent.DOCKER),
     (*DEFAULT_AGENT_UNITS, "docker.service"), True),
    ({"agents": ["docker", "docker"]}, (Agent.DOCKER, Agent.DOCKER), ("docker.service",), False),
])
def test_presets_and_agent_units_combine(flags: dict[str, Any], agents: tuple[Agent, ...],
                                         units: tuple[str, ...], mesos_path: bool) -> None:
    config = load_config(flags, None)
    assert (config.agents, config.agent_units, config.mesos_path) == (agents, units, mesos_path)


def test_the_config_file_takes_presets(tmp_path: Path) -> None:
    file = tmp_path / "coreos-gpu.toml"
    file.write_text('agents = ["kubelet", "containerd"]\n')
    config = load_config({}, file)
    assert config.agent_units == K8S
    # A flag wins over the file, as for every setting.
    assert load_config({"agents": ["crio"]}, file).agent_units == ("crio.service",)


@pytest.mark.parametrize(("toml", "flags", "message"), [
    ('agents = ["k8s"]', [],
     r"invalid agents in .*coreos-gpu.toml: 'k8s' \(allowed: mesos, kubelet, containerd, "
     r"docker, crio, nomad, podman\)$"),
    ("", ["--agent", "Kubelet"], r"invalid --agent: 'Kubelet' \(allowed: mesos, kubelet, "),
    ("agents = []", [], r"invalid agents in .*: \[\] \(expected a non-empty list\)$"),
    ('agents = ["podman"]', [],
     r"agents = podman orders no unit after the driver, and a bundle needs at least one$"),
])
def test_bad_agents_are_one_line_with_exit_code_2(cli: Cli, tmp_path: Path, toml: str,
                                                  flags: list[str], message: str) -> None:
    (tmp_path / "coreos-gpu.toml").write_text(toml + "\n")
    result = cli("config", "show", *flags)
    assert result.code == ExitCode.CONFIG, result.stderr
    assert re.search(message, result.error_lines[0]), result.stderr
    assert "Traceback" not in result.stderr


def test_podman_alone_says_where_its_units_go() -> None:
    with pytest.raises(CoreosGpuError) as error:
        load_config({"agents": ["podman"]}, None)
    assert "agent_units" in error.value.hint


def test_config_show_says_where_the_units_came_from(cli: Cli) -> None:
    result = cli("config", "show", "--json", "--agent", "kubelet", "--agent", "containerd")
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)
    rows = shown if isinstance(shown, list) else shown.get("settings", shown)
    text = json.dumps(rows)
    assert '"kubelet.service", "containerd.service"' in text
    assert "agents (--agent)" in text


# --- the bundle's node files ---------------------------------------------------------------

def _node_files(settings: NodeSettings) -> dict[str, str]:
    return {f.path: f.data.decode() for f in render_node_files(
        settings, driver_version="535.261.03", flavour="proprietary", profile="compute",
        os="flatcar", module_sets=[], tool_version="t")}


def _as_build_passes(flags: dict[str, Any],
                     policy: DriverFailurePolicy = DriverFailurePolicy.START_WITHOUT_GPUS
                     ) -> dict[str, str]:
    """The node files of a bundle built with these settings (build.py's NodeSettings)."""
    config = load_config({**flags, "on_driver_failure": policy.value}, None)
    return _node_files(NodeSettings(config.agent_units, config.on_driver_failure,
                                    mesos_path=config.mesos_path))


def _bundle_env(files: dict[str, str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in files["node/bundle.env"].splitlines()
                if not line.startswith("#"))


def test_the_default_bundle_is_dcos_byte_for_byte() -> None:
    files = _as_build_passes({})
    assert _bundle_env(files)["AGENT_UNITS"] == "'" + " ".join(DEFAULT_AGENT_UNITS) + "'"
    assert "\nBefore=dcos-mesos-slave.service dcos-mesos-slave-public.service\n" in (
        files["nvidia.service"])
    # The drop-in as it was before presets existed, for a default build.
    assert files["node/agent-dropin.conf"] == (
        "# Written by coreos-gpu; install_nvidia.sh links it in as a drop-in of each Mesos "
        "agent unit.\n"
        "# When the driver fails, the agent starts anyway, without GPUs (on_driver_failure = "
        "start-without-gpus).\n"
        "[Unit]\nWants=nvidia.service\nAfter=nvidia.service\n\n[Service]\n"
        "# Read after DC/OS's own environment files, so this PATH wins: DC/OS's agent PATH "
        "plus the\n# driver's bin folder, where the GPU isolator looks for nvidia-smi and the "
        "other tools.\nEnvironmentFile=-/opt/nvidia/current/node/agent.env\n")
    # What tests/nodetree.py's bundles (NodeSettings' defaults) get: the same.
    assert _node_files(NodeSettings(DEFAULT_AGENT_UNITS)) == files


@pytest.mark.parametrize("policy", list(DriverFailurePolicy))
def test_a_kubernetes_bundle_orders_kubelet_and_containerd(policy: DriverFailurePolicy) -> None:
    files = _as_build_passes({"agents": ["kubelet", "containerd"]}, policy)
    assert _bundle_env(files)["AGENT_UNITS"] == "'kubelet.service containerd.service'"
    assert unit_setting(files["nvidia.service"], "Before") == [" ".join(K8S)]
    dropin = files["node/agent-dropin.conf"]
    dependency = "Requires" if policy is DriverFailurePolicy.WAIT else "Wants"
    assert unit_setting(dropin, dependency) == ["nvidia.service"]
    assert unit_setting(dropin, "After") == ["nvidia.service"]
    # No PATH: CDI needs none, and agent.env would replace containerd.service's own.
    assert "\n[Service]\n" not in dropin and "EnvironmentFile" not in dropin
    assert "Mesos" not in dropin


def test_the_drop_in_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = subprocess.run(["sh", "-c", "command -v systemd-analyze"], capture_output=True,
                             text=True, check=False).stdout.strip()
    if not analyze:
        pytest.skip("no systemd-analyze")
    files = _as_build_passes({"agents": ["containerd"]})
    unit = tmp_path / "containerd.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / "containerd.service.d").mkdir()
    (tmp_path / "containerd.service.d/coreos-gpu.conf").write_text(
        files["node/agent-dropin.conf"])
    (tmp_path / "nvidia.service").write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, check=False, env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert not [line for line in result.stderr.splitlines()
                if "coreos-gpu.conf" in line], result.stderr


# --- render for a Kubernetes node ----------------------------------------------------------

@pytest.fixture(scope="module")
def k8s_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle whose agent units are kubelet's and containerd's."""
    folder = tmp_path_factory.mktemp("k8s")
    (folder / "ko").mkdir()
    make_bundle(folder / "b", folder / "ko", agent_units=K8S)
    return folder / "b" / "nvidia.tar.gz"


def _provision_unit(config: dict[str, Any]) -> str:
    [unit] = [u for u in config["systemd"]["units"] if u["name"] == UNIT]
    return str(unit["contents"])


@pytest.mark.parametrize("spec_flags", [(), ("--ignition-version", "2.2.0",
                                             "--bundle-sha512", "cd" * 64)])
def test_ignition_for_kubernetes_runs_before_kubelet_and_containerd(
        cli: Cli, spec_flags: tuple[str, ...]) -> None:
    result = cli("render", "ignition", *BY_URL, "--agent", "kubelet", "--agent", "containerd",
                 *spec_flags)
    assert result.code == 0, result.stderr
    config = json.loads(result.stdout)
    spec = config["ignition"]["version"]
    assert schema_problems(config, f"ignition {spec}") == []
    assert unit_setting(_provision_unit(config), "Before") == [" ".join(K8S)]


def test_render_takes_the_agents_from_the_config_file(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "coreos-gpu.toml").write_text('agents = ["kubelet", "containerd"]\n'
                                              'agent_units = ["gpu-job.service"]\n')
    result = cli("render", "butane", *BY_URL)
    assert result.code == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    [unit] = [u for u in doc["systemd"]["units"] if u["name"] == UNIT]
    assert unit_setting(unit["contents"], "Before") == [" ".join((*K8S, "gpu-job.service"))]
    terraform = cli("render", "terraform", *BY_URL)
    assert terraform.code == 0, terraform.stderr  # no unit there: the install orders them


def test_a_repository_node_for_kubernetes(cli: Cli, tmp_path: Path) -> None:
    from coreos_gpu.keys import write_key_pair

    pub = write_key_pair(tmp_path / "repo.key").public
    result = cli("render", "ignition", "--repository", "https://gpu.example.com/repo",
                 "--repository-key", pub, "--agent", "kubelet", "--agent", "containerd")
    assert result.code == 0, result.stderr
    config = json.loads(result.stdout)
    assert schema_problems(config, "ignition 3.3.0") == []
    assert unit_setting(_provision_unit(config), "Before") == [" ".join(K8S)]
    # Without agents, DC/OS's as before.
    dcos = json.loads(cli("render", "ignition", "--repository", "https://gpu.example.com/repo",
                          "--repository-key", pub).stdout)
    assert unit_setting(_provision_unit(dcos), "Before") == [" ".join(DEFAULT_AGENT_UNITS)]


def test_a_bundle_file_says_its_own_agents(cli: Cli, k8s_archive: Path) -> None:
    result = cli("render", "ignition", "--bundle", k8s_archive, "--bundle-url", URL)
    assert result.code == 0, result.stderr
    assert unit_setting(_provision_unit(json.loads(result.stdout)), "Before") == [" ".join(K8S)]
    same = cli("render", "ignition", "--bundle", k8s_archive, "--bundle-url", URL,
               "--agent", "containerd", "--agent", "kubelet")
    assert same.code == 0, same.stderr
    other = cli("render", "ignition", "--bundle", k8s_archive, "--bundle-url", URL,
                "--agent", "docker")
    assert other.code == ExitCode.CONFIG
    assert other.error_lines[0] == (
        "coreos-gpu: error: the settings name the agent units docker.service, but the bundle "
        "was built for kubelet.service containerd.service"), other.stderr
    assert other.stdout == ""
    with tarfile.open(k8s_archive) as tar:
        stream = tar.extractfile("MANIFEST.json")
        assert stream is not None
        assert json.loads(stream.read())["agent_units"] == list(K8S)


# --- the smoke-test Pod --------------------------------------------------------------------

def _pod(cli: Cli, *flags: str | Path) -> dict[str, Any]:
    result = cli("render", "k8s-smoke-pod", *flags)
    assert result.code == 0, result.stderr
    pod = yaml.safe_load(result.stdout)
    assert isinstance(pod, dict)
    return pod


def _check_pod(pod: dict[str, Any]) -> None:
    """What the API server requires of a Pod, and what the smoke test needs."""
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    name = pod["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                        name) and len(name) <= 253
    for key, value in pod["metadata"].get("labels", {}).items():
        assert re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]?", value), key
    assert all(isinstance(v, str) for v in pod["metadata"].get("annotations", {}).values())
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"  # runs once, ends Succeeded or Failed
    [container] = spec["containers"]
    assert set(container) <= {"name", "image", "command", "args", "resources"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", container["name"])
    assert container["image"]
    # An extended resource is asked for as a limit (a request, if any, must equal it).
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert all(isinstance(a, str) for a in container["command"])


def test_the_smoke_pod_asks_for_one_gpu_and_lists_it(cli: Cli) -> None:
    pod = _pod(cli)
    _check_pod(pod)
    assert pod["metadata"]["name"] == "coreos-gpu-smoke-test"
    [container] = pod["spec"]["containers"]
    assert container["image"] == "nvidia/cuda:12.2.2-base-ubuntu22.04"
    sh, flag, script = container["command"]
    assert (sh, flag) == ("sh", "-c")
    lines = script.splitlines()
    assert lines[0] == "set -eu"
    assert "ls -l /dev/nvidiactl /dev/nvidia[0-9]*" in lines
    assert "  nvidia-smi -L" in lines
    assert lines[-1] == "echo 'coreos-gpu smoke test: OK'"
    assert "driver_version" not in script  # nothing known to check against
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["spec"]["tolerations"])


def test_the_smoke_pod_checks_the_driver_and_takes_image_and_name(cli: Cli) -> None:
    pod = _pod(cli, "--driver-version", "580.82.07", "--image", "nvcr.io/nvidia/cuda:12.4.1-base",
               "--id", "gpu-check.team-a")
    _check_pod(pod)
    assert pod["metadata"]["name"] == "gpu-check.team-a"
    assert pod["metadata"]["annotations"]["coreos-gpu/driver-version"] == "580.82.07"
    [container] = pod["spec"]["containers"]
    assert container["image"] == "nvcr.io/nvidia/cuda:12.4.1-base"
    assert ('  test "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"'
            " = 580.82.07") in container["command"][2].splitlines()


@pytest.mark.parametrize("shell", ["sh", "bash", "dash", "busybox sh"])
def test_the_smoke_pods_script_fails_without_a_gpu_and_passes_with_one(
        cli: Cli, tmp_path: Path, shell: str) -> None:
    argv = shell.split()
    if subprocess.run(["sh", "-c", f"command -v {argv[0]}"], capture_output=True,
                      check=False).returncode:
        pytest.skip(f"no {argv[0]}")
    script = _pod(cli, "--driver-version", "580.82.07")["spec"]["containers"][0]["command"][2]
    # The script's /dev paths, moved into a folder of ours; nvidia-smi a stand-in on PATH.
    dev = tmp_path / "dev"
    dev.mkdir()
    local = script.replace("/dev/", f"{dev}/")
    bare = subprocess.run([*argv, "-c", local], capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin"})
    assert bare.returncode != 0 and "smoke test: OK" not in bare.stdout
    (dev / "nvidiactl").touch()
    (dev / "nvidia0").touch()
    tools = tmp_path / "bin"
    tools.mkdir()
    smi = tools / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in -L) echo "GPU 0: NVIDIA H100 (UUID: GPU-1)";;\n'
                   "*) echo 580.82.07;; esac\n")
    smi.chmod(0o755)
    ok = subprocess.run([*argv, "-c", local], capture_output=True, text=True, check=False,
                        env={"PATH": f"{tools}:/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stderr
    assert "GPU 0: NVIDIA H100" in ok.stdout and ok.stdout.endswith("smoke test: OK\n")
    smi.write_text('#!/bin/sh\ncase "$*" in -L) echo GPU 0;; *) echo 535.261.03;; esac\n')
    other = subprocess.run([*argv, "-c", local], capture_output=True, text=True, check=False,
                           env={"PATH": f"{tools}:/usr/bin:/bin"})
    assert other.returncode != 0  # another driver than the one expected


@pytest.mark.parametrize(("flags", "message"), [
    (("--id", "Coreos_GPU"), r"--id 'Coreos_GPU' is not a k8s-smoke-pod id"),
    (("--image", "Not An Image"), r"--image 'Not An Image' is not a Docker image reference"),
])
def test_the_smoke_pod_refuses_bad_names(cli: Cli, flags: tuple[str, ...],
                                         message: str) -> None:
    result = cli("render", "k8s-smoke-pod", *flags)
    assert result.code == ExitCode.CONFIG
    assert re.search(message, result.error_lines[0]), result.stderr
    assert result.stdout == ""
