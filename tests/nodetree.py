"""A fake node for the node-side scripts: a sysroot folder with /sys, /proc and /dev shaped
like a GPU host's (see shared/reference/node-files.md), recording stand-ins for the
commands that touch the kernel or systemd, and real bundles made by assemble_bundle.

The scripts run for real (under bash, dash or busybox sh) with `--root`; only insmod,
modprobe, mknod, ldconfig, systemctl, nvidia-smi, uname, id, df and dmesg are stand-ins,
first on PATH. Each stand-in appends its argv (tab-separated) to the call log.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from coreos_gpu.bundle import NodeSettings, assemble_bundle
from coreos_gpu.cache import sha256_of
from coreos_gpu.config import (
    DEFAULT_AGENT_UNITS,
    Compression,
    DriverFailurePolicy,
    KernelModuleType,
    Persistence,
    Profile,
)
from coreos_gpu.keys import KeyPair
from coreos_gpu.layout import (
    CONTENTS_NAME,
    SUMS_NAME,
    ReleaseInputs,
    render_contents,
    render_sums,
)
from coreos_gpu.repository import RepositoryTrust, load_trust

from .bundletools import (
    CLOUD,
    CLOUD_RELEASE,
    KERNEL,
    PERSISTENCED,
    RELEASE,
    VERSION,
    make_package,
    module_set,
)

SHELLS = ("bash", "dash", "busybox sh")
# The awks a node may have: its system's (mawk here; gawk elsewhere) and busybox's.
AWKS = ("awk", "busybox awk")
NODE_PARTS = Path(__file__).resolve().parents[1] / "src/coreos_gpu/resources/node"


def awk_bin(folder: Path, awk: str) -> Path:
    """folder, made, whose `awk` runs AWK (one of AWKS): put it first on PATH. Skips the
    test where AWK's program is missing."""
    program, *applet = awk.split()
    found = shutil.which(program)
    if found is None:
        pytest.skip(f"{program} is missing")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "awk").write_text(f'#!/bin/sh\nexec {shlex.join([found, *applet])} "$@"\n')
    (folder / "awk").chmod(0o755)
    return folder


def node_definitions(*names: str) -> str:
    """Each function (NAME) or variable (NAME=…, one line or a '…' block) as whichever node
    part defines it, for a test to run the node's own reader: sourcing the script that holds
    it would run the script."""
    texts = [part.read_text() for part in sorted(NODE_PARTS.glob("*.sh"))]
    out = []
    for name in names:
        pattern = (rf"^{name}\(\) \{{\n.*?^\}}\n" if name.islower()
                   else rf"^{name}='\n.*?^\t\}}'\n|^{name}=[^\n]*\n")
        found = next((m.group(0) for t in texts if (m := re.search(pattern, t, re.M | re.S))),
                     None)
        assert found, f"no node part in {NODE_PARTS} defines {name}"
        out.append(found)
    return "".join(out)
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there
UVM_MAJOR = 508
# /proc/devices with the decoys a sloppy parser trips on: nvidia-uvm-tools-like names and
# a block device of the same name.
PROC_DEVICES = f"""\
Character devices:
  1 mem
  4 tty
 10 misc
195 nvidia-frontend
226 drm
234 nvidia-nvlink
235 nvidia-caps
{UVM_MAJOR} nvidia-uvm
509 nvidia-uvm-extra

Block devices:
  8 sd
259 blkext
510 nvidia-uvm
"""
CGROUP_V1_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,nosuid,nodev,noexec,relatime,devices 0 0
"""
CGROUP_V2_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
"""
# The bus-to-minor map of a real 8-GPU host: minors do not follow bus order.
EIGHT_GPUS = {"0000:07:00.0": 2, "0000:0b:00.0": 3, "0000:48:00.0": 0, "0000:4c:00.0": 1,
              "0000:88:00.0": 6, "0000:8b:00.0": 7, "0000:c8:00.0": 4, "0000:cb:00.0": 5}

_RECORD = """#!/bin/sh
{ printf '%s' "${0##*/}"; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\n'; } >>"$FAKE_LOG"
"""
STAND_INS = {
    "uname": """
[ "${1:-}" = -r ] && { echo "$FAKE_KERNEL"; exit 0; }
[ "${1:-}" = -m ] && [ -n "$FAKE_MACHINE" ] && { echo "$FAKE_MACHINE"; exit 0; }
exec /bin/uname "$@"
""",
    "insmod": """
name=$(basename "$1" .ko)
if [ "${FAKE_INSMOD_ERROR%%:*}" = "$name" ]; then
	echo "insmod: ERROR: could not insert module $1: ${FAKE_INSMOD_ERROR#*:}" >&2
	exit 1
fi
echo "$(echo "$name" | tr - _) 65536 0 - Live 0x0000000000000000" >>"$FAKE_ROOT/proc/modules"
if [ "$name" = nvidia ]; then
	mkdir -p "$FAKE_ROOT/sys/module/nvidia"
	echo "$FAKE_DRIVER_VERSION" >"$FAKE_ROOT/sys/module/nvidia/version"
fi
""",
    # -c: the "options" lines of the configuration (-C DIR, else the root's modprobe.d).
    "modprobe": """
if [ "$1" = -c ]; then
	cat "${3:-$FAKE_ROOT/etc/modprobe.d}"/*.conf 2>/dev/null | sed 's/#.*//' | grep '^options'
	exit 0
fi
[ "$1" = -q ] && shift
case " $FAKE_MODPROBE_MISSING " in *" $1 "*) exit 1 ;; esac
echo "$1 16384 0 - Live 0x0000000000000000" >>"$FAKE_ROOT/proc/modules"
""",
    "mknod": """
[ -z "$FAKE_MKNOD_FAIL" ] || { echo "mknod: Operation not permitted" >&2; exit 1; }
exec /bin/mknod "$@"
""",
    "ldconfig": """
case " $* " in *" -p "*) cat "$FAKE_ROOT/.ldcache" 2>/dev/null ;; esac
exit 0
""",
    # `systemctl show -p PROP --value UNIT` answers from $FAKE_ROOT/.systemd/UNIT/PROP.
    "systemctl": """
if [ "$1" = show ]; then
	cat "$FAKE_ROOT/.systemd/$5/$3" 2>/dev/null
	exit 0
fi
# `systemctl start nvidia.service` with FAKE_START_RUNS_STARTUP=1: what the unit runs.
if [ "$1 $2" = "start nvidia.service" ] && [ -n "$FAKE_START_RUNS_STARTUP" ]; then
	exec sh "$FAKE_ROOT/opt/nvidia/startup.sh" --root "$FAKE_ROOT"
fi
# `systemctl is-active -q UNIT`: active unless FAKE_INACTIVE names it.
if [ "$1" = is-active ]; then
	case " $FAKE_INACTIVE " in *" $3 "*) exit 3 ;; esac
	exit 0
fi
# `systemctl start|restart [--no-block] UNIT` fails, as for a masked unit, when
# FAKE_START_FAIL names UNIT.
case $1 in start | restart)
	for unit in "$@"; do
		case " $FAKE_START_FAIL " in *" $unit "*)
			echo "Failed to $1 $unit: Unit $unit is masked." >&2
			exit 1 ;;
		esac
	done ;;
esac
exit "${FAKE_SYSTEMCTL_RC:-0}"
""",
    "nvidia-smi": """
grep -q '^nvidia ' "$FAKE_ROOT/proc/modules" && [ -z "$FAKE_SMI_FAIL" ] || {
	echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
	exit 9
}
[ "$1" = -L ] || exit 0
i=0
for gpu in "$FAKE_ROOT"/proc/driver/nvidia/gpus/*/; do
	[ -d "$gpu" ] || continue
	echo "GPU $i: Tesla V100-SXM2-16GB (UUID: GPU-82523fd8-3897-f599-d088-ccd04ae45ec$i)"
	i=$((i + 1))
done
""",
    "id": """
[ "$1" = -u ] && { echo "${FAKE_UID:-0}"; exit 0; }
exec /usr/bin/id "$@"
""",
    "df": """
[ -n "$FAKE_DF_AVAIL" ] || exec /bin/df "$@"
echo "Filesystem 1024-blocks Used Available Capacity Mounted on"
echo "/dev/vda9 1000000 0 $FAKE_DF_AVAIL 1% /"
""",
    "dmesg": "exit 0\n",
}
STAND_IN_ENV = ("FAKE_INSMOD_ERROR", "FAKE_MODPROBE_MISSING", "FAKE_MKNOD_FAIL", "FAKE_SMI_FAIL",
                "FAKE_DF_AVAIL", "FAKE_INACTIVE", "FAKE_START_RUNS_STARTUP", "FAKE_MACHINE",
                "FAKE_START_FAIL")
# Flatcar's update_engine_client (flatcar/update_engine, update_engine_client.cc): -status
# prints these five lines (shared/reference/flatcar-update.md); -watch_for_updates logs each
# status signal to stderr and never returns (here: the lines of .update-engine-signals once
# that file is there, then it waits). Added by Node.add_update_engine.
UPDATE_ENGINE_CLIENT = """
case $1 in
-status)
	printf '%s\n' "I1202 10:00:00.000000  1234 update_engine_client.cc:241]" \
		"Querying Update Engine status..." | paste -sd' ' >&2
	cat "$FAKE_ROOT/.update-engine-status" ;;
-watch_for_updates)
	while [ ! -e "$FAKE_ROOT/.update-engine-signals" ]; do sleep 0.1; done
	cat "$FAKE_ROOT/.update-engine-signals" >&2
	exec sleep 3600 ;;
*) exit 1 ;;
esac
"""


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if ": error: " in line]


def make_bundle(folder: Path, ko_dir: Path, *, tool_version: str = "0.1.0",
                kernels: tuple[str, ...] = (KERNEL,),
                policy: DriverFailurePolicy = DriverFailurePolicy.START_WITHOUT_GPUS,
                agent_units: tuple[str, ...] = DEFAULT_AGENT_UNITS,
                repository: RepositoryTrust | None = None,
                flavour: KernelModuleType = KernelModuleType.PROPRIETARY,
                releases: tuple[ReleaseInputs, ...] = (),
                persistence: Persistence = Persistence.OFF) -> Path:
    """A real bundle (with the real node scripts), extracted with tar like an operator
    does, in folder/bundle (the archive: folder/nvidia.tar.gz); another tool_version gives
    the same driver with another bundle id. With persistence = daemon the driver package
    has nvidia-persistenced too."""
    folder.mkdir(parents=True)
    by_kernel = {KERNEL: RELEASE, CLOUD: CLOUD_RELEASE}
    bundle = assemble_bundle(
        package=make_package(folder / "driver", extra=PERSISTENCED
                             if persistence is Persistence.DAEMON else ""),
        module_sets=[replace(module_set(ko_dir, k), flavour=flavour) for k in kernels],
        profile=Profile.COMPUTE,
        compression=Compression.GZIP, output=folder / "nvidia.tar.gz",
        releases=list(releases) or [by_kernel[k] for k in kernels],
        node=NodeSettings(agent_units, policy, repository, persistence=persistence),
        tool_version=tool_version)
    extracted = folder / "bundle"
    extracted.mkdir()
    subprocess.run(["tar", "xzf", bundle.path, "-C", extracted], check=True)
    with tarfile.open(bundle.path) as tar:  # the tools the real archive carries
        assert "payload/535.261.03/bin/nvidia-smi" in tar.getnames()
    return extracted


@dataclass(frozen=True)
class NodeBundles:
    """make_bundle for one test module (conftest's node_bundles fixture): each bundle in a
    folder of its own, the .ko files compiled once a session, and a repository key pair a
    bundle may trust at UNREACHABLE: a test that fetches serves its own repository and points
    the node at it (NVIDIA_REPOSITORY_URL, as /etc/default/nvidia would)."""

    folder: Path
    ko_dir: Path
    keys: KeyPair

    @property
    def trust(self) -> RepositoryTrust:
        trust = load_trust(UNREACHABLE, str(self.keys.public))
        assert trust is not None
        return trust

    def make(self, name: str, **settings: Any) -> Path:
        """make_bundle in folder/name (the archive: folder/name/nvidia.tar.gz)."""
        return make_bundle(self.folder / name, self.ko_dir, **settings)


BUNDLE_PARTS = ("install_nvidia.sh", "nvidia.service", "startup.sh", "MANIFEST.json", SUMS_NAME,
                "node", "payload")


def reseal(tree: Path) -> None:
    """Rewrite node/contents and SHA256SUMS to describe the extracted bundle as it is now,
    as someone who changed it on purpose would (a test's guard bundle, a hostile one)."""
    members = sorted(p for part in BUNDLE_PARTS for p in [tree / part, *(tree / part).rglob("*")]
                     if p.is_symlink() or p.is_file())
    described = {str(p.relative_to(tree)): (
        (0o777, os.readlink(p)) if p.is_symlink() else (p.stat().st_mode & 0o7777, None))
        for p in members}
    described[CONTENTS_NAME] = (0o644, None)
    (tree / CONTENTS_NAME).write_bytes(render_contents(described))
    files = [path for path, (_, target) in described.items()
             if target is None and path != SUMS_NAME]
    (tree / SUMS_NAME).write_bytes(render_sums({f: sha256_of(tree / f) for f in files}))


class Node:
    """A sysroot with a GPU host's /sys, /proc and /dev, and the stand-ins."""

    def __init__(self, folder: Path, *, shell: str = "sh") -> None:
        self.root = folder / "root"
        self.bin = folder / "bin"
        self.log = folder / "calls"
        self.shell = shell.split()
        # var/lib: every Flatcar and CoreOS root has it (the node remembers index generations
        # there).
        for sub in ("dev", "etc", "sys/bus/pci/devices", "sys/module/firmware_class/parameters",
                    "proc/driver/nvidia/gpus", "run", "var/lib"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "sys/module/firmware_class/parameters/path").write_text("\n")
        (self.root / "proc/devices").write_text(PROC_DEVICES)
        (self.root / "proc/modules").write_text("drm 622592 0 - Live 0x0000000000000000\n")
        (self.root / "proc/mounts").write_text(CGROUP_V1_MOUNTS)
        self.bin.mkdir(parents=True, exist_ok=True)
        for name, body in STAND_INS.items():
            (self.bin / name).write_text(_RECORD + body)
            (self.bin / name).chmod(0o755)
        self.env = {"PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
                    "FAKE_ROOT": str(self.root), "FAKE_LOG": str(self.log),
                    "FAKE_KERNEL": KERNEL, "FAKE_DRIVER_VERSION": VERSION,
                    **dict.fromkeys(STAND_IN_ENV, "")}
        self.log.write_text("")

    # --- the hardware --------------------------------------------------------------------
    def add_pci(self, bus: str, *, vendor: str = "0x10de", cls: str = "0x030200") -> None:
        device = self.root / "sys/bus/pci/devices" / bus
        device.mkdir(parents=True)
        (device / "vendor").write_text(f"{vendor}\n")
        (device / "class").write_text(f"{cls}\n")
        (device / "device").write_text("0x1db1\n")

    def add_gpu(self, bus: str, minor: int, *, cls: str = "0x030200") -> None:
        """A GPU on PCI, and what the driver says of it once loaded."""
        self.add_pci(bus, cls=cls)
        info = self.root / "proc/driver/nvidia/gpus" / bus
        info.mkdir(parents=True)
        (info / "information").write_text(
            "Model: \t\t Tesla V100-SXM2-16GB\nIRQ:   \t\t 42\n"
            "GPU UUID: \t GPU-82523fd8-3897-f599-d088-ccd04ae45ec1\n"
            "Video BIOS: \t 88.00.4f.00.09\nBus Type: \t PCIe\nDMA Size: \t 47 bits\n"
            f"DMA Mask: \t 0x7fffffffffff\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"
            "GPU Excluded: \t No\n")

    def add_update_engine(self, op: str = "UPDATE_STATUS_IDLE", new_version: str = "0.0.0"
                          ) -> None:
        """update_engine_client on PATH, in the state given."""
        (self.root / ".update-engine-status").write_text(
            "LAST_CHECKED_TIME=1733083200\nPROGRESS=0.000000\n"
            f"CURRENT_OP={op}\nNEW_VERSION={new_version}\nNEW_SIZE=465371229\n")
        # StatusUpdateSignalHandler's LOG(INFO) lines, glog's prefix and all.
        log = "I1202 10:00:00.000000  1234 update_engine_client.cc:{}] {}\n".format
        (self.root / ".update-engine-signals").write_text("".join(
            log(line, text) for line, text in (
                (80, "Got status update:"), (81, "  last_checked_time: 1733083200"),
                (82, "  progress: 1"), (83, f"  current_operation: {op}"),
                (84, f"  new_version: {new_version}"), (85, "  new_size: 465371229"))))
        tool = self.bin / "update_engine_client"
        tool.write_text(_RECORD + UPDATE_ENGINE_CLIENT)
        tool.chmod(0o755)

    def fetch(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.run(self.root / "opt/nvidia/current/node/fetch.sh", "--root",
                        str(self.root), *args, env=env)

    # --- running things --------------------------------------------------------------------
    def run(self, script: Path | str, *args: str, env: dict[str, str] | None = None,
            shell: list[str] | None = None) -> Result:
        self.log.write_text("")
        proc = subprocess.run([*(shell or self.shell), str(script), *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=120, check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def install(self, bundle: Path, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.run(bundle / "install_nvidia.sh", "--root", str(self.root), *args, env=env)

    def startup(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.run(self.root / "opt/nvidia/startup.sh", "--root", str(self.root), *args,
                        env=env)

    def doctor(self, *args: str, env: dict[str, str] | None = None) -> Result:
        # /opt/bin/nvidia-doctor links to the node's absolute /opt/nvidia/nvidia-doctor
        return self.run(self.root / "opt/nvidia/nvidia-doctor", "--root",
                        str(self.root), *args, env=env)

    def path_without(self, tool: str) -> str:
        """A PATH with every command of this node's PATH but `tool` (links in a folder of
        their own): a node that lacks it."""
        folder = self.root.parent / f"path-without-{tool}"
        if not folder.exists():
            folder.mkdir()
            for entry in reversed(self.env["PATH"].split(":")):  # the first entry wins
                for exe in sorted(Path(entry).glob("*")) if Path(entry).is_dir() else []:
                    if exe.name != tool and exe.is_file() and os.access(exe, os.X_OK):
                        (folder / exe.name).unlink(missing_ok=True)
                        (folder / exe.name).symlink_to(exe)
        return str(folder)

    def calls(self, name: str | None = None) -> list[list[str]]:
        lines = [line.split("\t") for line in self.log.read_text().splitlines()]
        return [c for c in lines if name is None or c[0] == name]

    def nodes(self) -> dict[str, tuple[int, int, int]]:
        """/dev/nvidia*: (major, minor, mode) of each character device."""
        found = {}
        for path in sorted((self.root / "dev").glob("nvidia*")):
            st = path.lstat()
            found[f"/dev/{path.name}"] = (os.major(st.st_rdev), os.minor(st.st_rdev),
                                          st.st_mode & 0o777)
        return found


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its kind and content (or link target): for "nothing
    changed" and "nothing left behind" checks."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        elif path.is_file():
            found[rel] = (f"file {path.stat().st_mode & 0o7777:o} "
                         f"{hashlib.sha256(path.read_bytes()).hexdigest()}")
        else:
            found[rel] = f"special {path.lstat().st_rdev}"
    return found
