"""Flatcar's own NVIDIA recipe on the node (DESIGN.md, "The real Flatcar GPU node"): every
Flatcar image ships an enabled /usr/lib/systemd/system/nvidia.service whose setup-nvidia
compiles NVIDIA's driver at boot into /opt/nvidia/<driver>/<kernel>, links /opt/nvidia/current,
copies its tools into /opt/bin and writes /etc/ld.so.conf.d/nvidia.conf. Our unit shadows it by
name; install_nvidia.sh stops a run of it, takes its files over (in the transaction: a failed
install puts them back) and removes its build once the install is whole; --uninstall leaves
the node as Flatcar's recipe finds it on a first boot; nvidia-doctor says which it is.
Under bash, dash and busybox sh, against sysroots (tests/nodetree.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .bundletools import KERNEL
from .nodetree import SHELLS, Node, Result, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
THEIRS = "535.247.01"  # coreos-overlay's nvidia-drivers-service-535.247.01 (nvidia-metadata)
FLATCAR_UNIT = "usr/lib/systemd/system/nvidia.service"
# The directives of coreos-overlay x11-drivers/nvidia-drivers-service/files/units/
# nvidia.service; the ebuild enables it into multi-user.target (systemd_enable_service).
FLATCAR_UNIT_TEXT = """\
[Unit]
Description=NVIDIA Configure Service
Wants=systemd-sysext.service
After=systemd-sysext.service
Before=containerd.target

[Service]
Type=oneshot
RemainAfterExit=true
Restart=no
Environment=PATH=/opt/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin
ExecStart=/usr/lib/nvidia/bin/setup-nvidia

[Install]
WantedBy=multi-user.target
"""
# The tools setup-nvidia copies into /opt/bin (copy_nvidia_build_artifacts), as files.
TOOLS = ("nvidia-debugdump", "nvidia-cuda-mps-control", "nvidia-xconfig", "nvidia-modprobe",
         "nvidia-smi", "nvidia-cuda-mps-server", "nvidia-persistenced", "nvidia-settings")


def write(root: Path, path: str, text: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


def add_flatcar_os(root: Path) -> None:
    """What /usr of every Flatcar image holds of the recipe: the enabled unit, setup-nvidia
    (a stand-in: it is never run here) and nvidia-metadata."""
    write(root, FLATCAR_UNIT, FLATCAR_UNIT_TEXT)
    wants = root / "usr/lib/systemd/system/multi-user.target.wants/nvidia.service"
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.symlink_to("../nvidia.service")
    write(root, "usr/lib/nvidia/bin/setup-nvidia", "#!/bin/bash\nexit 1\n")
    write(root, "usr/share/flatcar/nvidia-metadata",
          f"NVIDIA_DRIVER_VERSION={THEIRS}\nNVIDIA_PRODUCT_TYPE=tesla\n")


def add_setup_nvidia_build(root: Path, kernel: str = KERNEL) -> None:
    """What a finished setup-nvidia leaves (its copy_nvidia_build_artifacts and
    install_and_load): the driver under /opt/nvidia/<driver>/<kernel>/usr, `current` linked
    relative to it, the tools, the ld.so.conf.d line, and its work folder."""
    tree = f"opt/nvidia/{THEIRS}/{kernel}/usr"
    write(root, f"{tree}/lib64/libnvidia-ml.so.{THEIRS}", "theirs")
    (root / f"{tree}/lib64/libnvidia-ml.so.1").symlink_to(f"libnvidia-ml.so.{THEIRS}")  # ldconfig's
    for name in ("nvidia", "nvidia-modeset", "nvidia-uvm"):
        write(root, f"{tree}/lib/modules/{kernel}/video/{name}.ko", "theirs")
    write(root, f"{tree}/lib/modules/{kernel}/modules.dep", "")
    write(root, f"{tree}/lib/extension-release.d/extension-release.nvidia-driver",
          "ID=flatcar\nSYSEXT_LEVEL=1.0\n")
    (root / "opt/nvidia/current").symlink_to(f"{THEIRS}/{kernel}")
    for tool in TOOLS:
        write(root, f"opt/bin/{tool}", "#!/bin/sh\necho Flatcar's\n")
    write(root, "etc/ld.so.conf.d/nvidia.conf", "/opt/nvidia/current/usr/lib64\n")
    write(root, "opt/nvidia/workdir/flatcar_developer_container-4459.2.0.bin", "image")
    write(root, f"opt/nvidia/workdir/nvidia-workdir/NVIDIA-Linux-x86_64-{THEIRS}.run", "run")


def flatcar_node(tmp_path: Path, shell: str = "sh", *, built: bool = True) -> Node:
    node = Node(tmp_path, shell=shell)
    add_flatcar_os(node.root)
    if built:
        add_setup_nvidia_build(node.root)
    return node


def said(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "Flatcar" in line]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_install_takes_over_what_setup_nvidia_left(tmp_path: Path, bundle: Path,
                                                      shell: str) -> None:
    node = flatcar_node(tmp_path, shell)
    result = node.install(bundle)
    assert result.code == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    tools = " ".join(f"/opt/bin/{tool}" for tool in TOOLS)
    assert said(result) == [
        f"install_nvidia.sh: taking over from Flatcar's setup-nvidia: /opt/nvidia/current {tools} "
        "/etc/ld.so.conf.d/nvidia.conf",
        f"install_nvidia.sh: removed Flatcar's setup-nvidia build: /opt/nvidia/{THEIRS} "
        "/opt/nvidia/workdir (after nvidia-uninstall, Flatcar's nvidia.service builds its "
        "driver again at the next boot)"]
    opt = node.root / "opt/nvidia"
    ours = os.readlink(opt / "current")
    assert "/" not in ours and (opt / ours / "node/bundle.env").is_file()
    assert not (opt / "previous").exists(), "setup-nvidia's folder is never our previous"
    assert sorted(p.name for p in opt.iterdir()) == sorted(
        [ours, "current", "startup.sh", "nvidia-doctor", ".lock", ".created-dirs"])
    # The bundle's tools are ours now; setup-nvidia's others (another driver's) are gone.
    bin_dir = node.root / "opt/bin"
    for tool in TOOLS:
        path = bin_dir / tool
        assert not path.exists() or os.readlink(path) == f"/opt/nvidia/current/bin/{tool}", tool
    assert os.readlink(bin_dir / "nvidia-smi") == "/opt/nvidia/current/bin/nvidia-smi"
    assert (node.root / "etc/ld.so.conf.d/nvidia.conf").read_text().startswith("# coreos-gpu")
    # Flatcar's unit stays where its image put it, shadowed by ours of the same name.
    assert (node.root / FLATCAR_UNIT).read_text() == FLATCAR_UNIT_TEXT
    assert (node.root / "etc/systemd/system/nvidia.service").read_text().startswith(
        "# Written by coreos-gpu")


@pytest.mark.parametrize("shell", SHELLS)
def test_uninstall_leaves_the_node_as_flatcars_recipe_finds_a_first_boot(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    """After the install and --uninstall, the node is a node setup-nvidia never ran on: it
    builds at the next boot (no /opt/nvidia/<driver>/<kernel> to skip on), and nothing of ours
    is in its way."""
    pristine = flatcar_node(tmp_path / "pristine", built=False).root
    for folder in ("opt/bin", "etc/ld.so.conf.d"):  # setup-nvidia made them; they stay
        (pristine / folder).mkdir(parents=True)
    first_boot = snapshot(pristine)
    node = flatcar_node(tmp_path / "node", shell)
    assert node.install(bundle).code == 0
    gone = node.run(node.root / "opt/nvidia/current/install_nvidia.sh", "--root", str(node.root),
                    "--uninstall")
    assert gone.code == 0, gone.stderr
    assert said(gone) == [
        "install_nvidia.sh: Flatcar's own nvidia.service (setup-nvidia) is no longer shadowed: "
        f"at the next boot it downloads, builds and loads NVIDIA's driver {THEIRS} on a node "
        "with an NVIDIA GPU (systemctl mask nvidia.service keeps it from doing so)"]
    assert snapshot(node.root) == first_boot


def test_a_failed_install_puts_setup_nvidias_files_back(tmp_path: Path, bundle: Path) -> None:
    """The take-over is part of the transaction: `systemctl enable` failing after the switch
    puts Flatcar's current, tools and ld.so.conf.d line back, and its build was never
    touched."""
    node = flatcar_node(tmp_path)
    before = snapshot(node.root)
    result = node.install(bundle, env={"FAKE_SYSTEMCTL_RC": "1"})
    assert result.code == 1, result.stderr
    assert result.errors == ["install_nvidia.sh: error: systemctl enable nvidia.service failed"]
    assert snapshot(node.root) == before


def test_a_dry_run_says_what_it_would_take_over_and_changes_nothing(tmp_path: Path,
                                                                   bundle: Path) -> None:
    node = flatcar_node(tmp_path)
    before = snapshot(node.root)
    result = node.install(bundle, "--dry-run")
    assert result.code == 0, result.stderr
    assert snapshot(node.root) == before
    assert "taking over from Flatcar's setup-nvidia: /opt/nvidia/current" in result.stderr
    for path in (f"/opt/nvidia/{THEIRS}", "/opt/nvidia/workdir", "/opt/bin/nvidia-smi"):
        assert "would run: rm -" in result.stderr and path in result.stderr, path
    assert "is not coreos-gpu's; leaving it" not in result.stderr


def test_someone_elses_tools_stay_where_setup_nvidia_left_nothing(tmp_path: Path,
                                                                  bundle: Path) -> None:
    """A file in /opt/bin is setup-nvidia's only beside a build of its own: without one,
    an operator's nvidia-smi there stays, with a warning, as before."""
    node = flatcar_node(tmp_path, built=False)
    write(node.root, "opt/bin/nvidia-smi", "#!/bin/sh\necho mine\n")
    result = node.install(bundle)
    assert result.code == 0, result.stderr
    assert said(result) == []
    assert "/opt/bin/nvidia-smi is not coreos-gpu's; leaving it" in result.stderr
    assert (node.root / "opt/bin/nvidia-smi").read_text() == "#!/bin/sh\necho mine\n"


# --- on a running node: setup-nvidia compiling while the install runs -------------------------

def with_host_alternatives(node: Node) -> None:
    """The host's tools behind /etc/alternatives (awk is one), which the node's /etc hides."""
    if Path("/etc/alternatives").is_dir() and not (node.root / "etc/alternatives").exists():
        shutil.copytree("/etc/alternatives", node.root / "etc/alternatives", symlinks=True)


def on_a_flatcar_node(node: Node, script: Path, *args: str,
                      env: dict[str, str] | None = None) -> Result:
    """script without --root in a mount namespace whose /opt, /etc, /sys, /run and
    /usr/lib/systemd/system are the node's; systemctl is the stand-in, whose `show` answers
    from the node's .systemd/<unit>/<property>."""
    with_host_alternatives(node)
    binds = [arg for sub in ("opt", "etc", "sys", "run", "usr/lib/systemd/system")
             for arg in ("--bind", str(node.root / sub), f"/{sub}")]
    return node.run(script, *args, env=env,
                    shell=["bwrap", "--dev-bind", "/", "/", *binds, *node.shell])


def systemctl_changes(node: Node) -> list[list[str]]:
    """What the install asked systemctl to do (its questions, `show`, left out)."""
    return [c[1:] for c in node.calls("systemctl") if c[1] != "show"]


def systemd_says(node: Node, unit: str, **properties: str) -> None:
    for name, value in properties.items():
        write(node.root, f".systemd/{unit}/{name}", f"{value}\n")


@pytest.mark.parametrize(("shell", "fragment"), [
    *((shell, f"/{FLATCAR_UNIT}") for shell in SHELLS),
    # systemd built with its units in /lib (Debian 12's: the VM's), /lib a link to usr/lib
    ("sh", "/lib/systemd/system/nvidia.service")])
def test_on_a_node_a_running_setup_nvidia_is_stopped_first(tmp_path: Path, bundle: Path,
                                                           shell: str, fragment: str) -> None:
    node = flatcar_node(tmp_path, shell)
    systemd_says(node, "nvidia.service", FragmentPath=fragment, ActiveState="activating")
    # The operator's override (Flatcar's docs), the one setup-nvidia reads over /usr's; here
    # also the only one the namespace shows (its /usr is the host's).
    write(node.root, "etc/flatcar/nvidia-metadata", 'NVIDIA_DRIVER_VERSION="550.163.01"\n')
    result = on_a_flatcar_node(node, bundle / "install_nvidia.sh")
    assert result.code == 0, result.stderr
    calls = systemctl_changes(node)
    assert calls[:2] == [["stop", "nvidia.service"], ["daemon-reload"]], calls
    assert said(result)[0] == (
        "install_nvidia.sh: stopping Flatcar's nvidia.service: its setup-nvidia is building "
        "NVIDIA's driver 550.163.01 into /opt/nvidia, and coreos-gpu's nvidia.service replaces "
        "it")


@pytest.mark.parametrize(("fragment", "state"), [
    (f"/{FLATCAR_UNIT}", "active"),  # it finished: nothing runs, its files are taken over
    ("/etc/systemd/system/nvidia.service", "activating"),  # ours, running: not stopped
], ids=["flatcar's finished", "ours"])
def test_on_a_node_only_a_running_setup_nvidia_is_stopped(tmp_path: Path, bundle: Path,
                                                          fragment: str, state: str) -> None:
    node = flatcar_node(tmp_path)
    systemd_says(node, "nvidia.service", FragmentPath=fragment, ActiveState=state)
    result = on_a_flatcar_node(node, bundle / "install_nvidia.sh")
    assert result.code == 0, result.stderr
    assert ["stop", "nvidia.service"] not in systemctl_changes(node)
    assert "stopping" not in result.stderr


def test_on_a_node_a_failed_install_starts_setup_nvidia_again(tmp_path: Path,
                                                              bundle: Path) -> None:
    node = flatcar_node(tmp_path)
    systemd_says(node, "nvidia.service", FragmentPath=f"/{FLATCAR_UNIT}",
                 ActiveState="activating")
    with_host_alternatives(node)
    before = snapshot(node.root)
    result = on_a_flatcar_node(node, bundle / "install_nvidia.sh",
                               env={"FAKE_SYSTEMCTL_RC": "1"})
    assert result.code == 1, result.stderr
    assert result.errors == [
        "install_nvidia.sh: error: cannot stop Flatcar's nvidia.service (setup-nvidia)"]
    assert systemctl_changes(node) == [
        ["stop", "nvidia.service"], ["start", "--no-block", "nvidia.service"]]
    assert snapshot(node.root) == before


# --- the doctor -----------------------------------------------------------------------------

def doctor_line(node: Node) -> str:
    lines = node.doctor().stdout.splitlines()
    i = next(i for i, text in enumerate(lines) if text.split(" ", 2)[1:2] == ["flatcar-recipe:"])
    return lines[i] + (f"\n{lines[i + 1]}" if lines[i].startswith("FAIL ") else "")


def test_the_doctor_says_whose_nvidia_service_runs(tmp_path: Path, bundle: Path) -> None:
    plain = Node(tmp_path / "plain")
    assert plain.install(bundle).code == 0
    assert doctor_line(plain) == (
        "PASS flatcar-recipe: this OS has no setup-nvidia (Flatcar's nvidia.service)")

    node = flatcar_node(tmp_path / "flatcar")
    assert node.install(bundle).code == 0
    assert doctor_line(node) == (
        f"PASS flatcar-recipe: Flatcar's nvidia.service (setup-nvidia, driver {THEIRS}) is "
        "shadowed by coreos-gpu's in /etc/systemd/system: it never runs")

    # Our unit gone (deleted by hand): systemd runs Flatcar's at the next boot.
    (node.root / "etc/systemd/system/nvidia.service").unlink()
    assert doctor_line(node) == (
        f"FAIL flatcar-recipe: nvidia.service is Flatcar's (setup-nvidia, driver {THEIRS}), not "
        "coreos-gpu's: at boot it builds and loads a driver of its own\n"
        "     fix: run install_nvidia.sh from a bundle again: its nvidia.service in "
        "/etc/systemd/system shadows Flatcar's")

    # setup-nvidia ran beside ours (say, before our unit was there) and left its build.
    (node.root / f"opt/nvidia/{THEIRS}/{KERNEL}/usr/lib64").mkdir(parents=True)
    assert doctor_line(node) == (
        f"FAIL flatcar-recipe: Flatcar's setup-nvidia left a driver of its own: "
        f"/opt/nvidia/{THEIRS}\n"
        "     fix: run install_nvidia.sh from a bundle again: it takes these over (or "
        "nvidia-uninstall, to leave the node to Flatcar's recipe)")
