"""What a real Flatcar GPU node may have that our driver must not run into (DESIGN.md, "The
real Flatcar GPU node"): Flatcar's own NVIDIA driver as an official sysext (a name in
/etc/flatcar/enabled-sysext.conf, a link in /etc/extensions, merged into /usr), and a kernel
that loads only signed modules (lockdown, which Flatcar turns on under Secure Boot).
install_nvidia.sh refuses before it changes anything, startup.sh before any insmod, in one
line each, and nvidia-doctor fails a check of its own, with the way out. Under bash, dash
and busybox sh, against sysroots (tests/nodetree.py), whose /sys has no lockdown file: a
kernel without the lockdown LSM, as every other node test assumes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .bundletools import KERNEL, VERSION
from .nodetree import SHELLS, Node, Result, reseal, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
GPU = "0000:00:1e.0"
NAME = "nvidia-drivers-570-open"  # one of Flatcar's (flatcar/scripts extra_sysexts.sh)
# What Flatcar's initrd links for an enabled name, and what systemd-sysext merges into /usr.
LINK = f"etc/extensions/flatcar-{NAME}.raw"
IMAGE = f"/etc/flatcar/sysext/flatcar-{NAME}-4459.2.0.raw"
RELEASE = f"usr/lib/extension-release.d/extension-release.flatcar-{NAME}"
VIDEO = f"usr/lib/modules/{KERNEL}/video/nvidia.ko"
LOCKDOWN = "sys/kernel/security/lockdown"
SECURE_BOOT = "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
# scripts/sign-file appends the signature, then this (MODULE_SIG_STRING).
MAGIC = b"~Module signature appended~\n"


def write(root: Path, path: str, text: str | bytes) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        (root / path).write_bytes(text)
    else:
        (root / path).write_text(text)


def add_sysext(root: Path, how: str) -> None:
    if how == "enabled":  # as the docs' Butane writes it, with a comment and another name
        write(root, "etc/flatcar/enabled-sysext.conf",
              f"# GPU nodes\npython\n{NAME}  # Flatcar's\n")
    elif how == "linked":  # the name gone from the file, the link the initrd made still there
        (root / LINK).parent.mkdir(parents=True, exist_ok=True)
        (root / LINK).symlink_to(IMAGE)
    elif how == "merged":  # merged into /usr (the link already gone, no reboot since)
        write(root, RELEASE, "ID=flatcar\nVERSION_ID=4459.2.0\nARCHITECTURE=x86-64\n")
    else:  # only its modules in /usr
        write(root, VIDEO, "")


def one_error(result: Result, prog: str) -> str:
    """The run's one error line (every line ours: none of the shell's)."""
    assert all(line.startswith(f"{prog}: ") for line in result.stderr.splitlines()), \
        result.stderr
    [error] = result.errors
    assert error.startswith(f"{prog}: error: "), error
    return error


def doctor_line(node: Node, check: str) -> tuple[str, str]:
    """The doctor's line for the check (and its fix line, "" when it passed)."""
    lines = node.doctor().stdout.splitlines()
    i = next(i for i, text in enumerate(lines) if text.split(" ", 2)[1:2] == [f"{check}:"])
    fix = lines[i + 1] if lines[i].startswith("FAIL ") else ""
    return lines[i], fix


def unload(node: Node) -> None:
    """A reboot, as the kernel sees it: nothing of ours loaded."""
    (node.root / "proc/modules").write_text("drm 622592 0 - Live 0x0000000000000000\n")
    (node.root / "sys/module/firmware_class/parameters/path").write_text("\n")
    subprocess.run(["rm", "-rf", node.root / "sys/module/nvidia"], check=True)


def sign(folder: Path) -> None:
    for ko in folder.glob("*.ko"):
        ko.write_bytes(ko.read_bytes() + b"\x00" * 3 + MAGIC)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("how", ["enabled", "linked", "merged"])
def test_flatcars_nvidia_sysext_is_refused_before_anything_changes(
        tmp_path: Path, bundle: Path, shell: str, how: str) -> None:
    fresh = Node(tmp_path / "fresh", shell=shell)
    fresh.add_gpu(GPU, 0)
    add_sysext(fresh.root, how)
    before = snapshot(fresh.root)
    refused = fresh.install(bundle)
    assert refused.code == 8, refused.stderr
    error = one_error(refused, "install_nvidia.sh")
    assert "error: Flatcar's NVIDIA driver sysext is enabled on this node (" in error
    assert "must not both load, so nothing was changed" in error
    assert snapshot(fresh.root) == before
    # A node with our driver, then the sysext: the boot loads nothing, the doctor says why.
    node = Node(tmp_path / "node", shell=shell)
    node.add_gpu(GPU, 0)
    assert node.install(bundle).code == 0
    add_sysext(node.root, how)
    result = node.startup()
    assert result.code == 9, result.stderr
    error = one_error(result, "startup.sh")
    assert node.calls("insmod") == [] and node.calls("mknod") == []
    assert (node.root / "sys/module/firmware_class/parameters/path").read_text() == "\n"
    line, fix = doctor_line(node, "sysext")
    assert line.startswith("FAIL sysext: Flatcar's NVIDIA driver sysext is enabled"), line
    # Each names what it found and the steps that disable it.
    found, steps = {
        "enabled": (f"{NAME} in /etc/flatcar/enabled-sysext.conf",
                    f"remove the line {NAME} from /etc/flatcar/enabled-sysext.conf, then reboot"),
        "linked": (f"/{LINK}", f"remove /{LINK}, then reboot"),
        "merged": (f"/{RELEASE} (merged into /usr)",
                   "remove its image from /etc/extensions (systemd-sysext status names it), "
                   "then reboot"),
    }[how]
    for text in (refused.errors[0], error, line):
        assert f"({found})" in text, text
    for text in (refused.errors[0], error, fix):
        assert steps in text and "systemd-sysext refresh unmerges it" in text, text
    assert fix.startswith("     fix: to keep coreos-gpu's driver, ")


def test_its_modules_in_usr_are_another_driver(tmp_path: Path, bundle: Path) -> None:
    node = Node(tmp_path)
    node.add_gpu(GPU, 0)
    assert node.install(bundle).code == 0
    add_sysext(node.root, "modules")
    result = node.startup()
    assert result.code == 9 and f"(/{VIDEO} (merged into /usr))" in one_error(result, "startup.sh")
    assert node.calls("insmod") == []


@pytest.mark.parametrize("shell", SHELLS)
def test_a_disabled_or_commented_sysext_is_no_sysext(tmp_path: Path, bundle: Path,
                                                   shell: str) -> None:
    """"-NAME" disables a default; "#" starts a comment; other extensions are not NVIDIA's."""
    node = Node(tmp_path, shell=shell)
    node.add_gpu(GPU, 0)
    write(node.root, "etc/flatcar/enabled-sysext.conf",
          "-nvidia-drivers-550\n# nvidia-drivers-535\npython zfs # nvidia-drivers-570\n*\n")
    write(node.root, "etc/extensions/flatcar-python.raw", "")
    assert node.install(bundle).code == 0
    assert node.startup().code == 0
    assert doctor_line(node, "sysext") == (
        "PASS sysext: no Flatcar NVIDIA driver sysext is enabled, linked or merged", "")


@pytest.mark.parametrize("shell", SHELLS)
def test_a_locked_down_kernel_is_said_before_any_insmod(tmp_path: Path, bundle: Path,
                                                       shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    node.add_gpu(GPU, 0)
    # Not locked down ("none" in force): as before.
    write(node.root, LOCKDOWN, "[none] integrity confidentiality\n")
    assert node.install(bundle).code == 0
    assert node.startup().code == 0 and len(node.calls("insmod")) == 3
    assert doctor_line(node, "lockdown") == (
        "PASS lockdown: the kernel loads unsigned modules (not locked down)", "")
    # A boot with Secure Boot on: Flatcar locks down (integrity).
    unload(node)
    write(node.root, LOCKDOWN, "none [integrity] confidentiality\n")
    write(node.root, SECURE_BOOT, b"\x06\x00\x00\x00\x01")
    before = snapshot(node.root)
    refused = node.install(bundle)
    assert refused.code == 8, refused.stderr
    assert one_error(refused, "install_nvidia.sh").startswith(
        "install_nvidia.sh: error: this kernel loads only signed modules (lockdown=integrity, "
        f"Secure Boot on), and this bundle's payload/{VERSION}/modules/{KERNEL}/")
    assert "is unsigned: its driver cannot load here, so nothing was changed; the choices: " \
        "Flatcar's NVIDIA sysext" in refused.errors[0]
    assert snapshot(node.root) == before
    result = node.startup()
    assert result.code == 4, result.stderr
    error = one_error(result, "startup.sh")
    folder = os.readlink(node.root / "opt/nvidia/current")
    assert (f"this kernel loads only signed modules (lockdown=integrity, Secure Boot on), and "
            f"/opt/nvidia/{folder}/modules/{KERNEL}/nvidia.ko is unsigned") in error
    for choice in ("Flatcar's NVIDIA sysext", "Secure Boot off", "signed with a key this kernel "
                   "trusts"):
        assert choice in error
    assert node.calls("insmod") == [] and [c[1] for c in node.calls("modprobe")] in ([], ["-c"])
    assert (node.root / "sys/module/firmware_class/parameters/path").read_text() == "\n"
    line, fix = doctor_line(node, "lockdown")
    assert line == ("FAIL lockdown: this kernel loads only signed modules (lockdown=integrity, "
                    f"Secure Boot on), and /opt/nvidia/current/modules/{KERNEL}/nvidia.ko is "
                    f"unsigned: driver {VERSION} cannot load here")
    assert fix.startswith("     fix: the choices: Flatcar's NVIDIA sysext")
    # Modules signed (by a later build, with a key the kernel trusts): no refusal.
    sign(node.root / "opt/nvidia" / folder / "modules" / KERNEL)
    result = node.startup()
    assert result.code == 0, result.stderr
    assert len(node.calls("insmod")) == 3
    line, _ = doctor_line(node, "lockdown")
    assert line == ("PASS lockdown: this kernel loads only signed modules (lockdown=integrity, "
                    f"Secure Boot on), and driver {VERSION}'s for kernel {KERNEL} are signed")


def test_a_bundle_with_signed_modules_installs_on_a_locked_down_kernel(
        tmp_path: Path, bundle: Path) -> None:
    signed = tmp_path / "signed"
    subprocess.run(["cp", "-a", bundle, signed], check=True)
    sign(signed / "payload" / VERSION / "modules" / KERNEL)
    reseal(signed)
    node = Node(tmp_path / "node")
    node.add_gpu(GPU, 0)
    write(node.root, LOCKDOWN, "none integrity [confidentiality]\n")  # no EFI: not said
    assert node.install(bundle).code == 8
    result = node.install(signed)
    assert result.code == 0, result.stderr
    assert node.startup().code == 0 and len(node.calls("insmod")) == 3
    report = json.loads(node.doctor("--json").stdout)
    [check] = [c for c in report["checks"] if c["check"] == "lockdown"]
    assert check["status"] == "PASS" and "(lockdown=confidentiality)" in check["detail"]


@pytest.mark.parametrize(("sig_enforce", "error", "code", "words"), [
    ("Y", "", 4, "this kernel loads only signed modules (module.sig_enforce=1)"),
    ("N", "Key was rejected by service", 4, "the kernel refused the signature of nvidia.ko"),
    ("N", "Operation not permitted", 5, "insmod"),  # not locked down: not a signature
])
def test_what_else_keeps_unsigned_modules_out(tmp_path: Path, bundle: Path, sig_enforce: str,
                                              error: str, code: int, words: str) -> None:
    node = Node(tmp_path)
    node.add_gpu(GPU, 0)
    assert node.install(bundle).code == 0
    write(node.root, "sys/module/module/parameters/sig_enforce", f"{sig_enforce}\n")
    result = node.startup(env={"FAKE_INSMOD_ERROR": f"nvidia:{error}" if error else ""})
    assert result.code == code, result.stderr
    assert words in one_error(result, "startup.sh")
    assert len(node.calls("insmod")) == (0 if sig_enforce == "Y" else 1)


def test_a_signature_lockdown_refuses_is_the_kernels_refusal(tmp_path: Path,
                                                             bundle: Path) -> None:
    """Signed, but with a key the locked-down kernel does not trust: EPERM at insmod."""
    node = Node(tmp_path)
    node.add_gpu(GPU, 0)
    assert node.install(bundle).code == 0
    sign((node.root / "opt/nvidia/current").resolve() / "modules" / KERNEL)
    write(node.root, LOCKDOWN, "none [integrity] confidentiality\n")
    result = node.startup(env={"FAKE_INSMOD_ERROR": "nvidia:Operation not permitted"})
    assert result.code == 4, result.stderr
    assert "the kernel (lockdown=integrity) refused nvidia.ko from " in one_error(
        result, "startup.sh")
