from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from coreos_gpu.config import (
    DEFAULT_AGENT_UNITS,
    SETTINGS,
    BuildConfig,
    OsName,
    Persistence,
    Profile,
    add_setting_flags,
    load_config,
)
from coreos_gpu.errors import CoreosGpuError, ExitCode

from .conftest import REPO

EXAMPLE = REPO / "examples" / "coreos-gpu.toml"


def test_every_setting_is_a_config_field() -> None:
    assert [s.key for s in SETTINGS] == [f.name for f in fields(BuildConfig) if f.name != "sources"]


def test_a_verb_gets_the_flags_of_the_settings_it_names() -> None:
    parser = argparse.ArgumentParser()
    add_setting_flags(parser, ("offline", "jobs", "releases"))  # shown in the table's order
    flags = [a.option_strings for a in parser._actions if a.dest != "help"]
    assert flags == [["--release"], ["--jobs"], ["--offline", "--no-offline"]]
    assert vars(parser.parse_args(["--release", "3975.2.2", "--no-offline"])) == {
        "releases": ["3975.2.2"], "jobs": None, "offline": False}
    every = argparse.ArgumentParser()
    add_setting_flags(every)
    assert len([a for a in every._actions if a.dest != "help"]) == len(SETTINGS)
    with pytest.raises(ValueError, match="no such setting: job"):
        add_setting_flags(argparse.ArgumentParser(), ("job",))
    none = argparse.ArgumentParser()
    add_setting_flags(none, ())  # a verb that reads no setting (inspect)
    assert [a.dest for a in none._actions] == ["help"]
    assert "settings" not in none.format_help()  # argparse leaves out an empty section


def test_defaults() -> None:
    config = load_config({}, None)
    assert config.os is OsName.FLATCAR
    assert config.channel == "stable"
    assert config.releases == ("current",)
    assert config.profile is Profile.COMPUTE
    assert config.kernel_module_type is None  # the driver's own default (driver.default_flavour)
    assert config.agent_units == DEFAULT_AGENT_UNITS
    assert config.persistence is Persistence.DAEMON  # NVIDIA's way
    assert re.fullmatch(r"\d{3}\.\d+\.\d+", config.driver_version)
    assert set(config.sources.values()) == {"default"}


def test_flag_beats_file_beats_default(tmp_path: Path) -> None:
    file = tmp_path / "coreos-gpu.toml"
    file.write_text('profile = "full"\nchannel = "beta"\noutput = "out/nvidia.tar.gz"\n')
    config = load_config({"profile": "compute", "release": None}, file)
    assert (config.profile, config.sources["profile"]) == (Profile.COMPUTE, "--profile")
    assert (config.channel, config.sources["channel"]) == ("beta", str(file))
    assert config.sources["os"] == "default"
    # Paths in a config file are relative to its folder, not to where coreos-gpu runs.
    assert config.output == tmp_path / "out" / "nvidia.tar.gz"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", ""), ("AB" * 32, "ab" * 32), ("0123456789abcdef" * 4, "0123456789abcdef" * 4)],
)
def test_driver_sha256_is_kept_in_lower_case(raw: str, expected: str) -> None:
    assert load_config({"driver_sha256": raw}, None).driver_sha256 == expected
    assert load_config({}, None).driver_sha256 == ""  # not checked unless pinned


def test_list_settings_take_repeated_flags() -> None:
    config = load_config({"releases": ["3975.2.2", "current"],
                          "agent_units": ["my-agent.service"]}, None)
    assert config.releases == ("3975.2.2", "current")
    assert config.agent_units == ("my-agent.service",)


def test_example_file_names_every_setting_and_holds_the_defaults() -> None:
    text = EXAMPLE.read_text()
    for s in SETTINGS:
        assert re.search(rf"^#? ?{s.key} = ", text, re.M), f"{s.key} missing from the example"
    config = load_config({}, EXAMPLE)
    defaults = load_config({}, None)
    for s in SETTINGS:
        if s.key in tomllib.loads(text) and s.key != "output":
            assert getattr(config, s.key) == getattr(defaults, s.key), s.key


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        ('profil = "full"', [], r"coreos-gpu.toml: unknown key 'profil'"),
        ('driver_version = "535"', [],
         r"invalid driver_version in .*coreos-gpu.toml: '535' \(expected an NVIDIA driver "
         r"version like 535.261.03\)"),
        ('os = "ubuntu"', [], r"invalid os in .*: 'ubuntu' \(allowed: flatcar, coreos\)"),
        ('', ["--profile", "gpu"], r"invalid --profile: 'gpu' \(allowed: compute, full\)"),
        ('', ["--channel", "nightly"],
         r"invalid --channel: 'nightly' \(allowed: stable, beta, alpha, lts\)"),
        ('', ["--kernel-module-type", "nouveau"],
         r"invalid --kernel-module-type: 'nouveau' \(allowed: proprietary, open\)"),
        ('releases = ["current", "3975.x"]', [],
         r"invalid releases in .*: '3975.x' \(expected 'current' or a release like"),
        ('', ["--release", "latest"], r"invalid --release: 'latest'"),
        ('', ["--driver-version", "535.261.03.1"], r"invalid --driver-version: '535.261.03.1'"),
        ('jobs = "many"', [], r"invalid jobs in .*: 'many' \(expected a whole number"),
        ('offline = "yes"', [], r"invalid offline in .*: 'yes' \(expected true or false\)"),
        ('profile = ', [], r"coreos-gpu.toml: invalid TOML: .*line 1"),
        ('[driver]\nversion = "535.261.03"', [], r"unknown key 'driver'"),
        ('mirror = "ftp://example.invalid"', [], r"invalid mirror in .*\(expected an http"),
        ('', ["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
        ('', ["--config", "missing.toml"], r"config file missing.toml does not exist"),
        ('', ["--driver-sha256", "abc"],
         r"invalid --driver-sha256: 'abc' \(expected a sha256: 64 hex digits\)"),
        (f'driver_sha256 = "{"g" * 64}"', [], r"invalid driver_sha256 in .*coreos-gpu.toml"),
        (f'driver_sha256 = "{"0" * 65}"', [], r"invalid driver_sha256 in "),
        ("driver_sha256 = 7", [], r"invalid driver_sha256 in .*: 7 \(expected a sha256"),
        ('persistence = "on"', [],
         r"invalid persistence in .*coreos-gpu.toml: 'on' \(allowed: daemon, legacy, off\)$"),
        ('', ["--persistence", "nvidia-smi"],
         r"invalid --persistence: 'nvidia-smi' \(allowed: daemon, legacy, off\)$"),
        ("persistence = true", [], r"invalid persistence in .*: True \(allowed: daemon, "),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(cli, tmp_path: Path, toml: str,
                                               flags: list[str], message: str) -> None:
    (tmp_path / "coreos-gpu.toml").write_text(toml + "\n")
    result = cli("config", "show", *flags)
    assert result.code == ExitCode.CONFIG == 2
    assert "Traceback" not in result.stderr
    first = result.error_lines[0]
    assert first.startswith("coreos-gpu: error: ")
    assert re.search(message, first), first
    # One line of error, at most one line of hint, nothing else.
    assert result.error_lines == result.stderr.strip().splitlines()
    assert len(result.error_lines) <= 2
    assert all(line.startswith("coreos-gpu: hint: ") for line in result.error_lines[1:])
    assert result.stdout == ""


def test_unknown_key_suggests_the_near_one(cli, tmp_path: Path) -> None:
    (tmp_path / "coreos-gpu.toml").write_text('profil = "full"\n')
    assert cli("config", "show").error_lines[1] == "coreos-gpu: hint: did you mean 'profile'?"


def test_config_show_reports_sources(cli, tmp_path: Path) -> None:
    import json

    (tmp_path / "coreos-gpu.toml").write_text('profile = "full"\n')
    result = cli("config", "show", "--json", "--channel", "beta")
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["profile"] == {"value": "full", "source": str(tmp_path / "coreos-gpu.toml")}
    assert shown["channel"] == {"value": "beta", "source": "--channel"}
    assert shown["os"] == {"value": "flatcar", "source": "default"}
    text = cli("config", "show", "--channel", "beta")
    assert text.code == 0
    assert re.search(r"^channel +beta +--channel$", text.stdout, re.M)


def test_load_config_raises_the_one_error_type(tmp_path: Path) -> None:
    with pytest.raises(CoreosGpuError) as info:
        load_config({"profile": "gpu"}, None)
    assert info.value.code is ExitCode.CONFIG
