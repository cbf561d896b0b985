"""`coreos-gpu render`: each KIND checked by its format's own rules (the JSON schemas in
tests/data/schemas, Butane's translation, an HCL parser, shellcheck), and every bad input
refused in one line with its exit code before anything is written. What the files do on a
node is test_render_node.py's."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from coreos_gpu.config import (
    DEFAULT_AGENT_UNITS,
    DEFAULT_DRIVER_VERSION,
    DriverFailurePolicy,
    KernelModuleType,
    OsName,
    Profile,
)
from coreos_gpu.driver import default_flavour
from coreos_gpu.errors import ExitCode
from coreos_gpu.keys import write_key_pair
from coreos_gpu.node import default_node_files
from coreos_gpu.provision import DIR, UNIT, render_script, terraform_commands
from coreos_gpu.render_types import DEFAULT_IMAGE, BundleSource, RepositorySource

from .bundletools import KERNEL, VERSION
from .conftest import CliResult
from .nodetree import AWKS, SHELLS, NodeBundles, awk_bin
from .render_tools import (
    butane_to_ignition,
    decode_data_url,
    normalise,
    remote_exec_inline,
    schema_problems,
    unit_setting,
)

Cli = Callable[..., CliResult]
URL = "https://gpu.example.com/bundles/nvidia.tar.gz"
SHA256 = "ab" * 32
SHA512 = "cd" * 64
BY_URL = ("--bundle-url", URL, "--bundle-sha256", SHA256, "--bundle-sha512", SHA512)
REPO_URL = "https://gpu.example.com/repo"


@pytest.fixture(scope="module")
def archive(node_bundles: NodeBundles) -> Path:
    """A real bundle (real node scripts), for agent units "my-agent.service"."""
    extracted = node_bundles.make("b", agent_units=("my-agent.service",),
                                  policy=DriverFailurePolicy.WAIT)
    return extracted.parent / "nvidia.tar.gz"


@pytest.fixture(scope="module")
def pub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_key_pair(tmp_path_factory.mktemp("key") / "repo.key").public


def contents_sha256(archive: Path) -> str:
    """Of the SHA256SUMS the archive holds (make_bundle extracted it beside the archive)."""
    return hashlib.sha256((archive.parent / "bundle/SHA256SUMS").read_bytes()).hexdigest()


def ok(result: CliResult) -> str:
    assert result.code == 0, result.stderr
    return result.stdout


def by_repository(pub: Path) -> tuple[str, ...]:
    return ("--repository", REPO_URL, "--repository-key", str(pub))


# --- Ignition ------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "spec"), [((), "3.3.0"), (("--os", "coreos"), "2.2.0"),
                                            (("--ignition-version", "2.2.0"), "2.2.0")])
@pytest.mark.parametrize("mode", ["bundle", "repository"])
def test_ignition_is_valid_by_its_spec_schema(cli: Cli, pub: Path, flags: tuple[str, ...],
                                              spec: str, mode: str) -> None:
    source = BY_URL if mode == "bundle" else by_repository(pub)
    config = json.loads(ok(cli("render", "ignition", *source, *flags)))
    assert config["ignition"]["version"] == spec
    assert schema_problems(config, f"ignition {spec}") == []
    # What the schema leaves to Ignition's own validation: absolute paths, no special mode
    # bits, data URLs that decode, a unit name with a suffix and an [Install] to enable.
    files = config["storage"]["files"]
    for entry in [*files, *config["storage"]["directories"]]:
        assert entry["path"].startswith(DIR + "/") or entry["path"] == DIR
        assert 0 < entry["mode"] <= 0o777
        if spec.startswith("2."):
            assert entry["filesystem"] == "root"
    [unit, *masked] = config["systemd"]["units"]
    assert unit["name"] == UNIT and unit["enabled"] is True
    # Flatcar's own nvidia.service (setup-nvidia) masked until the install shadows it; CoreOS
    # has none.
    flatcar = "coreos" not in flags
    assert masked == ([{"name": "nvidia.service", "mask": True}] if flatcar else []), masked
    assert "\n[Install]\nWantedBy=multi-user.target\n" in unit["contents"]
    by_path = {f["path"]: f for f in files}
    script = decode_data_url(by_path[f"{DIR}/provision.sh"]["contents"]["source"]).decode()
    assert script.startswith("#!/bin/sh\n") and by_path[f"{DIR}/provision.sh"]["mode"] == 0o700
    if mode == "bundle":
        bundle = by_path[f"{DIR}/nvidia.tar.gz"]
        assert bundle["contents"] == {"source": URL,
                                      "verification": {"hash": f"sha512-{SHA512}"}}
        assert bundle["mode"] == 0o600
        assert f"BUNDLE_SHA256={SHA256}\n" in script
        assert "CONTENTS_SHA256=''\n" in script  # known from a bundle file only
        assert unit_setting(unit["contents"], "After") == []  # no network needed
    else:
        key = decode_data_url(by_path[f"{DIR}/repository.pub"]["contents"]["source"])
        assert key == pub.read_bytes()
        assert f"REPOSITORY_URL={REPO_URL}\n" in script
        assert "CONTENTS_SHA256=''\n" in script
        assert unit_setting(unit["contents"], "After") == ["network-online.target"]
        assert unit_setting(unit["contents"], "Wants") == ["network-online.target"]


def test_the_schema_check_refuses_what_ignition_would_ignore(cli: Cli) -> None:
    """Ignition only warns about an unknown key: a misspelt verification would go unused.
    The strict check catches it, and the schema a wrong type."""
    config = json.loads(ok(cli("render", "ignition", *BY_URL)))
    typo = copy.deepcopy(config)
    contents = typo["storage"]["files"][0]["contents"]
    contents["verfication"] = contents.pop("verification")
    assert schema_problems(typo, "ignition 3.3.0") == [
        "/storage/files/0/contents/verfication: not in the schema"]
    wrong = copy.deepcopy(config)
    wrong["storage"]["files"][0]["mode"] = "0600"
    assert schema_problems(wrong, "ignition 3.3.0")


def test_sha256_alone_is_ignitions_hash_from_spec_3_1(cli: Cli) -> None:
    config = json.loads(ok(cli("render", "ignition", "--bundle-url", URL,
                               "--bundle-sha256", SHA256)))
    assert config["storage"]["files"][0]["contents"]["verification"] == {
        "hash": f"sha256-{SHA256}"}


def test_the_unit_orders_the_install_before_the_agents(cli: Cli, archive: Path) -> None:
    config = json.loads(ok(cli("render", "ignition", "--bundle", archive, "--bundle-url", URL)))
    unit = config["systemd"]["units"][0]["contents"]
    assert unit_setting(unit, "Type") == ["oneshot"]  # Before= then waits for the end
    assert unit_setting(unit, "RemainAfterExit") == ["yes"]
    assert unit_setting(unit, "Before") == ["my-agent.service"]  # the bundle's agent units
    # Never before nvidia.service: the install starts it, which would wait on this unit.
    assert not [v for key in ("Before", "Requires", "After") for v in unit_setting(unit, key)
                if "nvidia.service" in v]
    assert unit_setting(unit, "ConditionPathExists") == [f"!{DIR}/provisioned"]
    assert unit_setting(unit, "ExecStart") == [f"{DIR}/provision.sh"]


def test_a_bundle_file_gives_its_own_hashes(cli: Cli, archive: Path) -> None:
    data = archive.read_bytes()
    config = json.loads(ok(cli("render", "ignition", "--bundle", archive, "--bundle-url", URL,
                               "--ignition-version", "2.2.0")))
    [bundle, script] = config["storage"]["files"]
    assert bundle["contents"]["verification"]["hash"] == (
        f"sha512-{hashlib.sha512(data).hexdigest()}")
    text = decode_data_url(script["contents"]["source"]).decode()
    assert f"BUNDLE_SHA256={hashlib.sha256(data).hexdigest()}\n" in text
    # And of its SHA256SUMS, for install_nvidia.sh --expect-sha256.
    assert f"CONTENTS_SHA256={contents_sha256(archive)}\n" in text
    assert '--expect-sha256 "$CONTENTS_SHA256"' in text


# --- Butane --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bundle", "repository"])
def test_butane_translates_to_the_ignition_rendering(cli: Cli, pub: Path, archive: Path,
                                                     mode: str) -> None:
    """Parsed back and translated as Butane translates these fields, the YAML is the
    Ignition rendering: same files, modes, hashes, contents and units."""
    source = (("--bundle", str(archive), "--bundle-url", URL) if mode == "bundle"
              else by_repository(pub))
    text = ok(cli("render", "butane", *source))
    doc = yaml.safe_load(text)
    assert (doc["variant"], doc["version"]) == ("flatcar", "1.0.0")
    translated = butane_to_ignition(doc)
    ignition = json.loads(ok(cli("render", "ignition", *source)))
    assert normalise(translated) == normalise(ignition)
    assert schema_problems(translated, "ignition 3.3.0") == []
    # Scripts and units are readable text in the YAML, not data URLs.
    assert "inline: |\n" in text and "data:" not in text
    assert "      mode: 0700\n" in text


def test_butane_is_for_flatcar(cli: Cli) -> None:
    result = cli("render", "butane", *BY_URL, "--os", "coreos")
    assert result.code == ExitCode.CONFIG
    assert "render ignition --os coreos" in result.stderr


# --- Terraform -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bundle", "repository"])
def test_terraform_parses_as_hcl_and_says_exactly_the_commands(
        cli: Cli, pub: Path, archive: Path, mode: str) -> None:
    source = (("--bundle", str(archive), "--bundle-url", URL) if mode == "bundle"
              else by_repository(pub))
    text = ok(cli("render", "terraform", *source))
    inline = remote_exec_inline(text)  # no ${ or %{ left that Terraform would evaluate
    assert inline[:2] == ["#!/bin/sh", "set -eu"]
    assert inline[-1] == "systemctl is-enabled --quiet nvidia.service"
    if mode == "repository":
        assert f"sudo {DIR}/provision.sh" in inline
        script = next(c for c in inline if c.startswith(f"sudo tee {DIR}/provision.sh"))
        assert pub.read_text().strip() in next(c for c in inline if "repository.pub" in c)
        assert "REPOSITORY_URL=https://gpu.example.com/repo\n" in script
        return
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    check = inline.index(f"printf '%s  %s\\n' {sha} \"$work/nvidia.tar.gz\" | "
                         "sudo sha256sum -c -")
    download = next(i for i, c in enumerate(inline) if c.startswith("sudo curl "))
    extract = next(i for i, c in enumerate(inline) if c.startswith("sudo tar -xf"))
    install = inline.index('sudo "$work/bundle/install_nvidia.sh" --expect-sha256 '
                           f"{contents_sha256(archive)}")
    assert download < check < extract < install  # checked before anything in it runs
    assert inline[extract - 1] == 'sudo mkdir "$work/bundle"'  # into an empty folder
    assert URL in inline[download]


def test_provision_never_imports_render() -> None:
    """render.py calls provision.py, not the other way: the sources both take are
    render_types'."""
    code = ("import sys, coreos_gpu.provision; "
            "print('coreos_gpu.render' in sys.modules, 'coreos_gpu.render_types' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout == "False True\n"


def test_hcl_escapes_every_template_and_quote() -> None:
    """A URL with ${...} and %{...} and quotes stays literal text in the HCL."""
    from coreos_gpu.provision import render_terraform

    url = "https://h.example/a/${b}/%{c}/'d'"
    source = BundleSource(url=url, sha256=SHA256)
    text = render_terraform(source, os=OsName.FLATCAR, tool_version="t")
    assert remote_exec_inline(text) == terraform_commands(source, os=OsName.FLATCAR,
                                                          tool_version="t")
    assert any("'https://h.example/a/${b}/%{c}/'\"'\"'d'\"'\"''" in c
               for c in remote_exec_inline(text))
    # Without the bundle file, nothing to pin the contents to: the download's sha256 only.
    assert 'sudo "$work/bundle/install_nvidia.sh"' in remote_exec_inline(text)


# --- the smoke tests -------------------------------------------------------------------------

def test_marathon_app_is_valid_and_asks_for_one_gpu_in_ucr(cli: Cli, archive: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "app.json"
    result = cli("render", "marathon-app", "--bundle", archive, "--output", out)
    assert ok(result).splitlines()[1] == f"next   dcos marathon app add {out}"
    app = json.loads(out.read_text())
    assert schema_problems(app, "marathon") == []
    assert app["gpus"] == 1
    assert app["container"] == {"type": "MESOS", "docker": {"image": DEFAULT_IMAGE}}
    assert app["id"] == "/coreos-gpu-smoke-test"
    assert "nvidia-smi -L" in app["cmd"] and f" = {VERSION} " in app["cmd"]


def test_metronome_job_is_valid_and_asks_for_one_gpu_in_ucr(cli: Cli) -> None:
    result = cli("render", "metronome-job", "--driver-version", "580.82.07",
                 "--image", "registry.example:5000/cuda/base:12.4", "--id", "gpu.smoke-test")
    job = json.loads(ok(result))
    assert schema_problems(job, "metronome") == []
    assert job["id"] == "gpu.smoke-test"
    assert job["run"]["gpus"] == 1
    assert job["run"]["ucr"] == {"image": {"id": "registry.example:5000/cuda/base:12.4",
                                           "kind": "docker"}}
    assert " = 580.82.07 " in job["run"]["cmd"] and "sleep" not in job["run"]["cmd"]
    assert "next: dcos job add FILE" in result.stderr


def test_the_smoke_tests_fail_their_schema_when_broken(cli: Cli) -> None:
    app = json.loads(ok(cli("render", "marathon-app")))
    assert schema_problems({**app, "gpu": 1}, "marathon")  # additionalProperties: false
    assert schema_problems({**app, "gpus": -1}, "marathon")
    job = json.loads(ok(cli("render", "metronome-job")))
    assert schema_problems({**job, "run": {**job["run"], "ucr": {"image": {}}}}, "metronome")


# --- provision.sh ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    BundleSource(url=URL, sha256=SHA256),
    RepositorySource(url=REPO_URL, public_key_pem=b"KEY", fingerprint="f",
                     driver_version="535.261.03", flavour=KernelModuleType.PROPRIETARY,
                     profile=Profile.COMPUTE, agent_units=DEFAULT_AGENT_UNITS)],
    ids=["bundle", "repository"])
def test_provision_script_passes_shellcheck_and_every_shell(source: Any,
                                                            tmp_path: Path) -> None:
    script = tmp_path / "provision.sh"
    script.write_text(render_script(source, os=OsName.FLATCAR, tool_version="t"))
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: scripts/test installs it")
    result = subprocess.run(["shellcheck", "--shell=sh", script], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout
    for shell in ("bash", "dash", "busybox sh"):
        parsed = subprocess.run([*shell.split(), "-n", script], capture_output=True,
                                text=True, check=False)
        assert parsed.returncode == 0 and not parsed.stderr, (shell, parsed.stderr)
    assert not re.search(r"@[A-Z0-9_]+@", script.read_text())  # every setting filled in


FILE_SETTINGS = 'driver_version = "535.261.03"\nkernel_module_type = "open"\nprofile = "full"\n'


@pytest.mark.parametrize(("flags", "config", "pinned"), [
    ((), "", (DEFAULT_DRIVER_VERSION, default_flavour(DEFAULT_DRIVER_VERSION).value,
              "compute")),
    (("--driver-version", "535.261.03"), "", ("535.261.03", "proprietary", "compute")),
    ((), FILE_SETTINGS, ("535.261.03", "open", "full")),
    (("--driver-version", "580.82.07", "--profile", "compute"), FILE_SETTINGS,
     ("580.82.07", "open", "compute")),
    (("--config", "conf/gpu.toml", "--kernel-module-type", "proprietary"), FILE_SETTINGS,
     ("535.261.03", "proprietary", "full")),
], ids=["defaults", "the driver's flavour", "config file", "flags over the file", "--config"])
def test_a_repository_pins_driver_flavour_and_profile(cli: Cli, pub: Path, tmp_path: Path,
                                                      flags: tuple[str, ...], config: str,
                                                      pinned: tuple[str, str, str]) -> None:
    """provision.sh takes the bundle of one driver, flavour and profile: flag > config file
    > default (the flavour's: the driver's own, as build picks it)."""
    config_file = tmp_path / ("conf/gpu.toml" if "--config" in flags else "coreos-gpu.toml")
    config_file.parent.mkdir(exist_ok=True)
    config_file.write_text(config)
    result = cli("render", "ignition", *by_repository(pub), *flags)
    files = {f["path"]: f for f in json.loads(ok(result))["storage"]["files"]}
    script = decode_data_url(files[f"{DIR}/provision.sh"]["contents"]["source"]).decode()
    driver, flavour, profile = pinned
    assert f"\nDRIVER_VERSION={driver}\nFLAVOUR={flavour}\nPROFILE={profile}\n" in script
    assert ('repo_pick "$tmp/index.txt" kernel "$kernel" "$DRIVER_VERSION" "$FLAVOUR" '
            '"$PROFILE" "$OS"') in script
    assert f"nodes take: driver {driver}, {flavour} modules, {profile} profile" in result.stderr


# --- repo_pick: which bundle a node takes ------------------------------------------------------

def _line(driver: str, flavour: str, profile: str, sha: str, published: str, *,
          kernel: str = "K", os: str = "flatcar", path: str = "") -> str:
    sha *= 32  # a well-formed sha256 (64 hex digits) from a short name: "a1" and on
    return (f"bundle {driver} {flavour} {profile} {os} 3975.2.2,3975.2.3 {kernel} "
            f"{path or f'bundles/{sha}/nvidia.tar.gz'} {sha} 1 {published}")


D1, D2, D3 = "2025-06-01T00:00:00Z", "2025-06-02T00:00:00Z", "2025-06-03T00:00:00Z"
PICK_INDEX = [
    _line("535.261.03", "proprietary", "compute", "a1", D1),
    _line("535.261.03", "proprietary", "compute", "a2", D2),  # rebuilds: the newest,
    _line("535.261.03", "proprietary", "compute", "a3", D2),  # then the greatest sha256
    _line("535.261.03", "open", "compute", "b1", D3),
    _line("535.261.03", "proprietary", "full", "c1", D3),
    _line("535.54.03", "proprietary", "compute", "d1", D3),  # lower, though "54" > "261"
    _line("580.82.07", "open", "compute", "e1", D1),
    _line("590.1.1", "gsp", "compute", "f1", D3),  # nothing a node can install
    _line("590.1.1", "open", "compute", "f2", D3, path="bundles/../nvidia.tar.gz"),
    _line("999.1.1", "open", "compute", "f3", D3, os="coreos"),
    _line("999.1.1", "open", "compute", "f4", D3, kernel="other"),
]
# (kernel|release, what, driver, flavour, profile) -> the sha256 taken ("" for none)
PICKS = [
    (("kernel", "K", "535.261.03", "proprietary", "compute"), "a3"),
    (("kernel", "K", "535.261.03", "open", "compute"), "b1"),
    (("kernel", "K", "535.261.03", "proprietary", "full"), "c1"),
    (("kernel", "K", "535.54.03", "proprietary", "compute"), "d1"),
    (("kernel", "K", "580.82.07", "proprietary", "compute"), ""),
    (("release", "3975.2.3", "535.261.03", "proprietary", "compute"), "a3"),
    (("release", "3975.2.9", "535.261.03", "proprietary", "compute"), ""),
    # Unpinned (no caller leaves them empty now): the highest driver, proprietary before
    # open, compute before full.
    (("kernel", "K", "", "proprietary", "compute"), "a3"),
    (("kernel", "K", "535.261.03", "", ""), "a3"),
    (("kernel", "K", "", "open", ""), "e1"),
    (("kernel", "K", "", "", ""), "e1"),
]


@pytest.mark.parametrize("awk", AWKS)
@pytest.mark.parametrize("shell", SHELLS)
def test_repo_pick_never_chooses_by_the_order_of_the_index(tmp_path: Path, shell: str,
                                                           awk: str) -> None:
    """What node/repository.sh's repo_pick takes (provision.sh and fetch.sh call it), the
    index's lines in either order, under each shell and awk a node may have."""
    awk_bin(tmp_path / "bin", awk)  # the node's awk, or busybox's
    (tmp_path / "repository.sh").write_bytes(
        (default_node_files() / "repository.sh").read_bytes())
    calls = "".join(f'printf "%s\\n" "$(repo_pick "$1" {shlex.join(args)} flatcar)"\n'
                    for args, _ in PICKS)
    (tmp_path / "pick.sh").write_text(f'. "${{0%/*}}/repository.sh"\n{calls}')
    expected = [f"bundles/{sha * 32}/nvidia.tar.gz {sha * 32} 1 K" if sha else ""
                for _, sha in PICKS]
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    for order in (PICK_INDEX, PICK_INDEX[::-1]):
        (tmp_path / "index.txt").write_text("coreos-gpu-index 1\n" + "\n".join(order) + "\n")
        ran = subprocess.run([*shell.split(), tmp_path / "pick.sh", tmp_path / "index.txt"],
                             capture_output=True, text=True, check=False, env=env)
        assert (ran.returncode, ran.stderr) == (0, "")
        assert ran.stdout.splitlines() == expected


# --- output and bad input ----------------------------------------------------------------------

def test_output_is_written_whole_and_as_an_ordinary_file(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "node.ign"
    out.write_text("old\n")
    ok(cli("render", "ignition", *BY_URL, "--output", out))
    assert json.loads(out.read_text()) == json.loads(ok(cli("render", "ignition", *BY_URL)))
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # A refused value writes nothing, and leaves the old file as it was.
    out.write_text("old\n")
    assert cli("render", "ignition", "--bundle-url", "ftp://x/n.tar.gz", "--bundle-sha256",
               SHA256, "--output", out).code == ExitCode.CONFIG
    assert out.read_text() == "old\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


BAD = [
    (("ignition",), ExitCode.CONFIG, "needs a bundle or a repository"),
    (("ignition", "--bundle-url", "ftp://h/n.tar.gz", "--bundle-sha256", SHA256),
     ExitCode.CONFIG, "is not an http:// or https:// URL"),
    (("ignition", "--bundle-url", "https://h/a b.tar.gz", "--bundle-sha256", SHA256),
     ExitCode.CONFIG, "holds characters a URL may not"),
    (("ignition", "--bundle-url", "https:///n.tar.gz", "--bundle-sha256", SHA256),
     ExitCode.CONFIG, "is not an http:// or https:// URL"),
    (("ignition", "--bundle-url", URL), ExitCode.CONFIG, "needs --bundle-sha256"),
    (("ignition", "--bundle-url", URL, "--bundle-sha256", "ab" * 31), ExitCode.CONFIG,
     "is not a sha256 (64 hex digits)"),
    (("ignition", "--bundle-url", URL, "--bundle-sha256", "zz" * 32), ExitCode.CONFIG,
     "is not a sha256"),
    (("ignition", "--bundle-url", URL, "--bundle-sha256", SHA256, "--bundle-sha512", "ab"),
     ExitCode.CONFIG, "is not a sha512 (128 hex digits)"),
    (("ignition", "--bundle-sha256", SHA256), ExitCode.CONFIG, "--bundle-url is missing"),
    (("ignition", "--os", "coreos", "--bundle-url", URL, "--bundle-sha256", SHA256),
     ExitCode.CONFIG, "checks downloads by sha512 only"),
    (("ignition", *BY_URL, "--os", "ubuntu"), ExitCode.CONFIG, "is not one of flatcar, coreos"),
    (("ignition", *BY_URL, "--ignition-version", "3.4.0"), ExitCode.CONFIG, "invalid choice"),
    (("ignition", *BY_URL, "--repository", REPO_URL), ExitCode.CONFIG, "not both"),
    (("ignition", "--repository", REPO_URL), ExitCode.CONFIG, "needs --repository-key"),
    (("ignition", "--repository-key", "k.pub"), ExitCode.CONFIG, "needs --repository URL"),
    (("ignition", "--repository", "file:///srv/repo", "--repository-key", "@pub"),
     ExitCode.CONFIG, "is not an http:// or https:// URL"),
    (("ignition", "--repository", REPO_URL, "--repository-key", "@notakey"), ExitCode.KEY, ""),
    (("ignition", "--repository", REPO_URL, "--repository-key", "@pub", "--driver-version",
      "latest"), ExitCode.CONFIG, "invalid --driver-version: 'latest'"),
    (("ignition", "--repository", REPO_URL, "--repository-key", "@pub",
      "--kernel-module-type", "both"), ExitCode.CONFIG, "invalid --kernel-module-type: 'both'"),
    (("ignition", "--repository", REPO_URL, "--repository-key", "@pub", "--profile", "min"),
     ExitCode.CONFIG, "invalid --profile: 'min'"),
    (("ignition", "--repository", REPO_URL, "--repository-key", "@pub", "--config",
      "@badconfig"), ExitCode.CONFIG, "invalid kernel_module_type in"),
    (("ignition", *BY_URL, "--kernel-module-type", "open"), ExitCode.CONFIG,
     "--kernel-module-type chooses the bundle a node takes from a repository"),
    (("marathon-app", "--profile", "full"), ExitCode.CONFIG,
     "--profile chooses the bundle a node takes from a repository"),
    (("ignition", "--bundle", "@archive", "--bundle-url", URL, "--kernel-module-type", "open"),
     ExitCode.CONFIG, "--kernel-module-type open, but the bundle holds flavour proprietary"),
    (("ignition", "--bundle", "@missing", "--bundle-url", URL), ExitCode.CONFIG,
     "no such file"),
    (("ignition", "--bundle", "@notabundle", "--bundle-url", URL), ExitCode.BUNDLE, ""),
    (("ignition", "--bundle", "@archive", "--bundle-url", URL, "--bundle-sha256", SHA256),
     ExitCode.CONFIG, "is not the hash of"),
    (("ignition", "--bundle", "@archive", "--bundle-url", URL, "--os", "coreos"),
     ExitCode.CONFIG, "the bundle is built for flatcar"),
    (("ignition", *BY_URL, "--output", "@folder"), ExitCode.CONFIG, "is a folder"),
    (("marathon-app", "--bundle", "@archive", "--driver-version", "580.82.07"),
     ExitCode.CONFIG, "but the bundle holds driver 535.261.03"),
    (("marathon-app", "--image", "nvidia/cuda:12 ; rm -rf /"), ExitCode.CONFIG,
     "is not a Docker image reference"),
    (("marathon-app", "--id", "/GPU_test"), ExitCode.CONFIG, "is not a marathon-app id"),
    (("metronome-job", "--id", "gpu/test"), ExitCode.CONFIG, "is not a metronome-job id"),
    (("metronome-job", "--id=-gpu"), ExitCode.CONFIG, "is not a metronome-job id"),
]


@pytest.mark.parametrize(("argv", "code", "message"), BAD,
                         ids=[f"{i}-{a[0]}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_input_is_one_line_and_its_exit_code(cli: Cli, tmp_path: Path, archive: Path,
                                                 pub: Path, argv: tuple[str, ...],
                                                 code: ExitCode, message: str) -> None:
    (tmp_path / "notakey").write_text("not a key\n")
    (tmp_path / "notabundle").write_bytes(b"\x1f\x8b not a gzip tar")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad.toml").write_text('kernel_module_type = "both"\n')
    places = {"@pub": str(pub), "@archive": str(archive), "@missing": "absent.tar.gz",
              "@notakey": "notakey", "@notabundle": "notabundle", "@folder": "folder",
              "@badconfig": "bad.toml"}
    result = cli("render", *(places.get(a, a) for a in argv))
    assert result.code == code, result.stderr
    assert result.stdout == ""
    errors = [line for line in result.error_lines if ": error: " in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_kernel_facts_reach_the_terraform_comment(cli: Cli, archive: Path) -> None:
    # A bundle file's own driver, flavour and profile, given, are checked and taken.
    text = ok(cli("render", "terraform", "--bundle", archive, "--bundle-url", URL,
                  "--driver-version", VERSION, "--kernel-module-type", "proprietary",
                  "--profile", "compute"))
    assert f"NVIDIA driver {VERSION} (kernels {KERNEL})" in text
