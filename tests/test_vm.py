"""The VM harness (tests/vm.py): record parsing, qemu's command line, and a real boot and reboot."""

from __future__ import annotations

from pathlib import Path

import pytest

from testinputs.vm import Kernel, VmImage

from .vm import AgentStart, Boot, Vm, parse_record, parse_records, render_qemu_argv

GENERIC = "6.1.0-50-amd64"
CLOUD = "6.1.0-50-cloud-amd64"
DCOS_PATH = "/opt/mesosphere/bin:/usr/bin:/bin:/sbin"

RECORD = ("boot_id=0b7e\tunit=dcos-mesos-slave.service\tstart_us=12905449"
          "\tnvidia.LoadState=loaded\tnvidia.ActiveState=active\tnvidia.SubState=exited"
          "\tnvidia.Result=success\tnvidia.ExecMainStatus=0"
          "\tnvidia.ExecMainExitTimestampMonotonic=12000000"
          "\tnvidia.ActiveEnterTimestampMonotonic=12000001"
          "\tdevices=/dev/nvidia-uvm:508:0 /dev/nvidiactl:195:255"
          f"\tpath=/opt/nvidia/current/bin:{DCOS_PATH}\tnvidia_smi=/opt/nvidia/current/bin/nvidia-smi")


def test_record_line_parses_into_fields() -> None:
    assert parse_record(RECORD) == AgentStart(
        boot_id="0b7e", unit="dcos-mesos-slave.service", start_us=12905449,
        nvidia={"LoadState": "loaded", "ActiveState": "active", "SubState": "exited",
                "Result": "success", "ExecMainStatus": "0",
                "ExecMainExitTimestampMonotonic": "12000000",
                "ActiveEnterTimestampMonotonic": "12000001"},
        devices={"/dev/nvidia-uvm": (508, 0), "/dev/nvidiactl": (195, 255)},
        path=f"/opt/nvidia/current/bin:{DCOS_PATH}",
        nvidia_smi="/opt/nvidia/current/bin/nvidia-smi")


def test_record_without_nvidia_service_or_nodes() -> None:
    line = (f"boot_id=b\tunit=u\tstart_us=1\tnvidia.LoadState=not-found\tdevices=\t"
            f"path={DCOS_PATH}\tnvidia_smi=")
    record = parse_record(line)
    assert (record.nvidia, record.devices, record.nvidia_smi) == (
        {"LoadState": "not-found"}, {}, "")


@pytest.mark.parametrize("broken", [RECORD.replace("\tpath=", "\tpat="),
                                    RECORD.replace("start_us=12905449", "start_us=")])
def test_bad_record_names_the_line(broken: str) -> None:
    with pytest.raises(ValueError, match="bad agent record"):
        parse_record(broken)


def test_records_skip_blank_lines() -> None:
    assert [r.boot_id for r in parse_records(f"{RECORD}\n\n{RECORD}\n")] == ["0b7e", "0b7e"]


def test_qemu_gets_no_network_and_exits_instead_of_rebooting(tmp_path: Path) -> None:
    kernel = Kernel(GENERIC, tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "vmlinux")
    argv = render_qemu_argv(kernel, tmp_path / "a,b.img", tmp_path / "data.img",
                            tmp_path / "console", cmdline=["systemd.unified_cgroup_hierarchy=0"])
    assert argv[argv.index("-nic") + 1] == "none"
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "vmlinux")
    assert f"file={tmp_path}/a,,b.img,format=raw,if=virtio,cache=unsafe" in argv
    append = argv[argv.index("-append") + 1].split()
    assert {"console=ttyS0", "root=/dev/vda", "panic=-1"} <= set(append)
    assert append[-1] == "systemd.unified_cgroup_hierarchy=0"


# --- real boots ---------------------------------------------------------------------------------

SCENARIO = """\
set -u
# Results named *-N.txt (N = boot number, $1) are read with Boot.read(name).
uname -r >/data/results/uname-$1.txt
systemctl is-system-running --wait >/data/results/system-$1.txt 2>&1
modprobe drm >/data/results/modprobe-$1.txt 2>&1
echo "modprobe drm: $?"
lsmod >/data/results/lsmod-$1.txt
other=$(ls /lib/modules | grep -vx "$(uname -r)")
insmod "/lib/modules/$other/kernel/lib/crc7.ko" >/data/results/insmod-$1.txt 2>&1
exit 3
"""


def loaded_modules(lsmod: str) -> set[str]:
    return {line.split()[0] for line in lsmod.splitlines()[1:] if line.strip()}


def check_agent_start_without_driver(start: AgentStart) -> None:
    assert start.unit == "dcos-mesos-slave.service"
    assert start.start_us > 0
    assert start.nvidia["LoadState"] == "not-found"
    assert start.nvidia["ActiveState"] == "inactive"
    assert start.path == DCOS_PATH
    assert (start.devices, start.nvidia_smi) == ({}, "")


def check_other_kernels_module_is_refused(boot: Boot) -> None:
    """The kernel's own words, in the results: what a kernel mismatch looks like on a node."""
    assert "Invalid module format" in boot.read("insmod")
    assert "crc7: disagrees about version of symbol module_layout" in boot.read("dmesg")


@pytest.mark.slow
def test_boot_then_reboot_into_the_other_kernel(vm_image: VmImage, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "scenario.sh").write_text(SCENARIO)
    assert vm_image.kernels[GENERIC].vmlinux is not None  # boots without decompressing
    with Vm(vm_image, tmp_path / "vm") as vm:
        first = vm.boot(GENERIC, data)
        print(f"boot 1 ({GENERIC}): {first.seconds:.1f} s")
        assert first.rc == 3, first.describe()
        assert first.read("uname").strip() == GENERIC
        assert first.read("system").strip() == "running", first.read("units")
        assert "drm" in loaded_modules(first.read("lsmod")), first.read("modprobe")
        assert "modprobe drm: 0" in first.console  # the scenario's output reaches the console
        (start,) = first.agent_starts()
        check_agent_start_without_driver(start)
        assert "Linux version 6.1.0-50-amd64" in first.read("dmesg")
        check_other_kernels_module_is_refused(first)

        second = vm.boot(CLOUD, data)
        print(f"boot 2 ({CLOUD}): {second.seconds:.1f} s")
        assert second.rc == 3, second.describe()
        assert second.read("uname").strip() == CLOUD
        assert second.read("system").strip() == "running", second.read("units")
        # Debian's cloud kernel is built without DRM (and IPMI): what needs it cannot load there.
        assert "drm" not in loaded_modules(second.read("lsmod"))
        assert "Module drm not found" in second.read("modprobe")
        first_again, start_again = second.records()
        assert first_again == start
        assert start_again.boot_id == second.boot_id != first.boot_id
        check_agent_start_without_driver(start_again)
        check_other_kernels_module_is_refused(second)
        # The results of boot 1 stay on the data disk.
        assert (second.results / "scenario-1.rc").read_text().strip() == "3"
