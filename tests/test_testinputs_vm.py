"""The VM image builder's own contract: the initrd's format and the guest's scripts and units."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testinputs.vm import GUEST, guest_files, render_initrd


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_initrd_is_a_newc_cpio_the_kernel_can_unpack(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(render_initrd(b"#!/bin/busybox sh\n", b"\x7fELF",
                                     {"virtio.ko": b"a", "ext4.ko": b"bc"}))
    out = tmp_path / "out"
    out.mkdir()
    with initrd.open("rb") as f:
        # busybox cpio cannot make a device node without root: leave it out when not root.
        subprocess.run(["busybox", "cpio", "-i", "-d"], stdin=f, cwd=out, check=True,
                       capture_output=True)
    assert (out / "modules").read_text() == "virtio.ko\next4.ko\n"  # load order, deps first
    assert (out / "lib/modules/ext4.ko").read_bytes() == b"bc"
    assert (out / "init").stat().st_mode & 0o111
    listing = subprocess.run(["busybox", "cpio", "-t", "-v"], stdin=initrd.open("rb"),
                             capture_output=True, text=True, check=True).stdout
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw")


def guest_scripts() -> list[Path]:
    return [GUEST / "init", *(path for name, path in guest_files()
                              if "/bin/" in f"/{name}" or "/sbin/" in f"/{name}")]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", guest_scripts(), ids=lambda path: path.name)
def test_guest_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run(["shellcheck", "-s", "sh", script], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout


def test_guest_units_install_into_multi_user_target() -> None:
    units = {name: path.read_text() for name, path in guest_files() if name.endswith(".service")}
    assert set(units) == {"etc/systemd/system/dcos-mesos-slave.service",
                          "etc/systemd/system/coreos-gpu-test.service"}
    for text in units.values():
        assert "WantedBy=multi-user.target" in text
    agent = units["etc/systemd/system/dcos-mesos-slave.service"]
    assert "EnvironmentFile=/opt/mesosphere/environment" in agent
    runner = units["etc/systemd/system/coreos-gpu-test.service"]
    assert "After=multi-user.target dcos-mesos-slave.service" in runner


def test_agent_environment_is_dcos_path() -> None:
    environment = (GUEST / "root/opt/mesosphere/environment").read_text()
    assert "PATH=/opt/mesosphere/bin:/usr/bin:/bin:/sbin\n" in environment


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("bwrap") is None,
                    reason="systemd-analyze or bwrap not installed")
def test_guest_units_pass_systemd_analyze_verify() -> None:
    """verify warns about unknown keys and bad values on stderr, so any output fails."""
    root = GUEST / "root"
    units = [path for name, path in guest_files() if name.endswith(".service")]
    # Their ExecStart= programs must exist: the guest's folders in place of the host's.
    result = subprocess.run(
        ["bwrap", "--dev-bind", "/", "/", "--ro-bind", root / "opt", "/opt",
         "--ro-bind", root / "usr/local/sbin", "/usr/local/sbin",
         "systemd-analyze", "verify", "--man=no", *units],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stdout + result.stderr, (
        result.stdout + result.stderr)
