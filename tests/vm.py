"""Boot the test VM image (testinputs/vm.py) in QEMU and read back what its test runner left.

A Vm is one guest: its own copy of the root disk, kept across boots, so each boot() after the
first is a reboot of the same node (into any of the image's kernels). Every boot gets a fresh
data disk (ext4, /dev/vdb, mounted at /data in the guest) made from the `data` folder plus the
results of the boots before, so /data/results accumulates like a disk that stayed in. In the
guest, coreos-gpu-test.service runs `sh /data/scenario.sh N` (N = boot number, from 1) once
the agent stand-in has started, collects logs into /data/results and powers off; qemu exits,
and the results are copied out of the disk image without mounting it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coreos_gpu.cache import link_tree
from coreos_gpu.run import run
from testinputs.debian_root import disk_usage, sbin_tool, write_ext4
from testinputs.vm import Kernel, VmImage

QEMU = "qemu-system-x86_64"
# Quiet but not blind: kernel warnings and errors (NVRM's, insmod's) and failed units still
# reach the console; dmesg-N.txt has every kernel message. panic=-1 turns a panic (say, the
# initrd failing to mount root) into a reboot, which -no-reboot turns into qemu exiting.
CMDLINE = ("console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "loglevel=4", "log_buf_len=1M",
           "systemd.show_status=auto", "mitigations=off", "nokaslr")
DATA_FREE_SPACE = 1 << 30
CONSOLE_TAIL = 200


@dataclass(frozen=True)
class AgentStart:
    """One record of the agent stand-in: what DC/OS's agent would find as it starts."""

    boot_id: str
    unit: str
    start_us: int  # CLOCK_MONOTONIC, as systemd's *TimestampMonotonic properties
    nvidia: Mapping[str, str]  # nvidia.service's properties, e.g. "ActiveState": "active"
    devices: Mapping[str, tuple[int, int]]  # /dev/nvidia* -> (major, minor)
    path: str  # the agent's PATH
    nvidia_smi: str  # `command -v nvidia-smi` on that PATH; "" when not found


def parse_record(line: str) -> AgentStart:
    """A records line: tab-separated key=value fields (agent-stand-in in testinputs/vm_guest)."""
    fields = dict(field.partition("=")[::2] for field in line.rstrip("\n").split("\t"))
    try:
        devices = {}
        for item in fields["devices"].split():
            node, major, minor = item.rsplit(":", 2)
            devices[node] = (int(major), int(minor))
        return AgentStart(
            boot_id=fields["boot_id"], unit=fields["unit"], start_us=int(fields["start_us"]),
            nvidia={key.removeprefix("nvidia."): value for key, value in fields.items()
                    if key.startswith("nvidia.")},
            devices=devices, path=fields["path"], nvidia_smi=fields["nvidia_smi"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"bad agent record ({e!r}): {line!r}") from None


def parse_records(text: str) -> list[AgentStart]:
    return [parse_record(line) for line in text.splitlines() if line.strip()]


def tail(text: str, lines: int = CONSOLE_TAIL) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Boot:
    """One boot of a Vm, after qemu has exited. Files of boot N in results are named `*-N.*`."""

    number: int  # 1 for the Vm's first boot
    kernel_release: str
    console: str  # the serial console: kernel warnings, failed units, the scenario's output
    results: Path  # /data/results after this boot: this boot's files and those before
    seconds: float  # wall time from qemu's start to its exit

    def read(self, name: str) -> str:
        """This boot's `name-N.txt`: journal, dmesg, units (list-units --all), status, boot_id."""
        return (self.results / f"{name}-{self.number}.txt").read_text(errors="replace")

    @property
    def boot_id(self) -> str:
        return self.read("boot_id").strip()

    @property
    def rc(self) -> int | None:
        """scenario.sh's exit code; None when the data folder had no scenario.sh."""
        path = self.results / f"scenario-{self.number}.rc"
        return int(path.read_text()) if path.exists() else None

    @property
    def scenario_log(self) -> str:
        path = self.results / f"scenario-{self.number}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def records(self) -> list[AgentStart]:
        """Every agent start recorded on this node so far, all boots, oldest first."""
        return parse_records((self.results / "records").read_text())

    def agent_starts(self) -> list[AgentStart]:
        """The agent starts of this boot (more than one if it was restarted)."""
        return [record for record in self.records() if record.boot_id == self.boot_id]

    def describe(self, lines: int = CONSOLE_TAIL) -> str:
        """For assertion messages: the scenario's exit code and the console's last lines."""
        return (f"boot {self.number} ({self.kernel_release}, {self.seconds:.0f} s): scenario "
                f"exit code {self.rc}; results in {self.results}\n--- console, last {lines} "
                f"lines ---\n{tail(self.console, lines)}")


def render_qemu_argv(kernel: Kernel, root_disk: Path, data_disk: Path, console: Path, *,
                     cmdline: Sequence[str] = (), qemu_args: Sequence[str] = ()) -> list[str]:
    def drive(path: Path) -> str:  # qemu reads a doubled comma as a comma in an option value
        return f"file={str(path).replace(',', ',,')},format=raw,if=virtio,cache=unsafe"

    # cache=unsafe: guest flushes cost nothing; qemu writes everything out when it exits, and
    # a disk left by a killed qemu belongs to a failed test anyway.
    return [QEMU, "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", f"file:{console}", "-drive", drive(root_disk), "-drive", drive(data_disk),
            "-kernel", str(kernel.boot_image), "-initrd", str(kernel.initrd),
            "-append", " ".join([*CMDLINE, *cmdline]), *qemu_args]


def write_data_disk(data: Path | None, previous_results: Path | None, stage: Path,
                    disk: Path) -> None:
    """An ext4 image of data's files plus results/ from the boot before, staged in stage
    (hard links, no copy) and removed after."""
    stage.mkdir(parents=True)
    if data is not None:
        link_tree(data, stage)
    if previous_results is not None:
        link_tree(previous_results, stage / "results")
    used, inodes = disk_usage(stage)
    size = -(-(used * 5 // 4 + DATA_FREE_SPACE) // (1 << 20)) << 20
    with open(disk, "wb") as f:
        f.truncate(size)
    write_ext4(stage, disk, size=size, inodes=inodes + 4096, label="data")
    shutil.rmtree(stage)


def read_results(disk: Path, dest: Path) -> Path:
    """Copy /results out of the data disk image (debugfs: no mount, no root needed)."""
    dest.mkdir(parents=True)
    run([sbin_tool("debugfs"), "-R", f"rdump /results {dest}", disk],
        what="reading the results off the data disk")
    return dest / "results"


class Vm:
    """One guest, with its own copy of the image's root disk, booted again and again.

    Use it as a context manager: leaving it deletes the root disk copy (most of a Vm's
    space); each boot's console.log and results stay in workdir/boot-N.
    """

    def __init__(self, image: VmImage, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.root_disk = workdir / "root.img"
        self.boots: list[Boot] = []
        workdir.mkdir(parents=True, exist_ok=True)
        run(["cp", "--sparse=always", image.root_image, self.root_disk],
            what="copying the VM's root disk")

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.root_disk.unlink(missing_ok=True)

    def boot(self, kernel_release: str, data: Path | None = None, *, timeout: float = 300,
             cmdline: Sequence[str] = (), qemu_args: Sequence[str] = ()) -> Boot:
        """Boot once, run data/scenario.sh if there is one, and return after power-off.

        Raises AssertionError, with the console's last lines, if the guest does not power off
        within timeout seconds or its test runner did not finish. A scenario's exit code is
        not checked here: see Boot.rc. cmdline adds kernel parameters, qemu_args devices.
        """
        kernel = self.image.kernels[kernel_release]
        number = len(self.boots) + 1
        folder = self.workdir / f"boot-{number}"
        shutil.rmtree(folder, ignore_errors=True)  # left by a boot that failed
        folder.mkdir()
        disk = folder / "data.img"
        write_data_disk(data, self.boots[-1].results if self.boots else None,
                        folder / "data-disk", disk)
        console_file = folder / "console.log"
        argv = render_qemu_argv(kernel, self.root_disk, disk, console_file, cmdline=cmdline,
                                qemu_args=qemu_args)
        seconds = run_qemu(argv, folder / "qemu.log", timeout=timeout,
                           what=f"boot {number} ({kernel_release})", console=console_file)
        boot = Boot(number, kernel_release, read_console(console_file),
                    read_results(disk, folder / "out"), seconds)
        if not (boot.results / f"done-{number}").exists():
            raise AssertionError(f"the guest's test runner did not finish boot {number}\n"
                                 f"{boot.describe()}")
        disk.unlink()  # its files are in boot.results now; a failed boot keeps it to look at
        self.boots.append(boot)
        return boot


def read_console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def run_qemu(argv: Sequence[str], log: Path, *, timeout: float, what: str,
             console: Path) -> float:
    """Run qemu until the guest powers off; → wall seconds. AssertionError if it does not."""
    start = time.monotonic()
    with open(log, "w") as out:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            code: int | None = qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also on KeyboardInterrupt: no qemu outlives the test
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
    if code is None:
        raise AssertionError(f"{what} did not power off within {timeout:.0f} s; console, last "
                             f"{CONSOLE_TAIL} lines:\n{tail(read_console(console))}")
    if code != 0:
        raise AssertionError(f"{what}: qemu exited with {code}: {log.read_text()}\nconsole, "
                             f"last {CONSOLE_TAIL} lines:\n{tail(read_console(console))}")
    return time.monotonic() - start
