"""The CDI spec startup.sh writes at each driver load (lib.sh's write_cdi_spec), against a fake
node under bash, dash and busybox sh: its shape by CDI's own schema, its devices, what it
mounts, the atomic write, no GPU, --check, --uninstall, the doctor's `cdi` check; and a real
consumer, Podman, handing the devices, libraries and tools to a container."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from .nodetree import EIGHT_GPUS, SHELLS, UVM_MAJOR, Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")

SPEC = "run/cdi/nvidia.com-gpu.json"  # /var/run/cdi: /var/run links to /run
SCHEMAS = Path(__file__).parent / "data" / "schemas"
OPTIONS = ["ro", "nosuid", "nodev", "bind"]
COMMON = ["/dev/nvidiactl", "/dev/nvidia-modeset", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
# SPEC.md's version table: what came after 0.5.0, which a cdiVersion 0.5.0 spec must not use.
AFTER_0_5_0 = {"annotations", "intelRdt", "additionalGids", "netDevices"}
# SPEC.md: a kind is vendor.com/class; a device name alphanumerics with - _ . between.
KIND = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?/[a-zA-Z0-9]([a-zA-Z0-9_.-]*[a-zA-Z0-9])?$")
NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9_.-]*[a-zA-Z0-9])?$")


def uuid_of(minor: int) -> str:
    return f"GPU-{minor:08x}-3897-f599-d088-ccd04ae45ec1"


def with_gpus(tmp_path: Path, bundle: Path, gpus: dict[str, int], shell: str = "sh") -> Node:
    """Installed, with these GPUs (bus: minor), each with a UUID of its own."""
    node = Node(tmp_path, shell=shell)
    assert node.install(bundle).code == 0
    for bus, minor in gpus.items():
        node.add_gpu(bus, minor)
        info = node.root / "proc/driver/nvidia/gpus" / bus / "information"
        info.write_text(re.sub(r"GPU-[0-9a-f-]+", uuid_of(minor), info.read_text()))
    return node


def started(node: Node, *args: str) -> str:
    result = node.startup(*args)
    assert result.code == 0, result.stderr
    return result.stderr


def folder(node: Node) -> str:
    """The resolved driver folder, as the node sees it."""
    return "/" + str((node.root / "opt/nvidia/current").resolve().relative_to(node.root))


def spec_of(node: Node) -> dict[str, Any]:
    spec = json.loads((node.root / SPEC).read_text())
    assert isinstance(spec, dict)
    check_by_cdi(spec)
    return spec


def check_by_cdi(spec: dict[str, Any]) -> None:
    """Valid by CDI's schema, with no key its schema does not name (it forbids none itself),
    nothing newer than the cdiVersion it says, and names by SPEC.md's rules."""
    schema = json.loads((SCHEMAS / "cdi-1.1.0-schema.json").read_text())
    defs = json.loads((SCHEMAS / "cdi-1.1.0-defs.json").read_text())
    registry: Registry[Any] = Registry().with_resource(
        "defs.json", Resource.from_contents(defs, default_specification=DRAFT7))
    Draft7Validator(schema, registry=registry).validate(spec)
    d = defs["definitions"]
    edits = set(d["containerEdits"]["properties"])
    node_keys, mount_keys = set(d["DeviceNode"]["properties"]), set(d["Mount"]["properties"])

    def check_edits(found: dict[str, Any]) -> None:
        assert set(found) <= edits - AFTER_0_5_0, found
        for node in found.get("deviceNodes", []):
            assert set(node) <= node_keys, node
        for mount in found.get("mounts", []):
            assert set(mount) <= mount_keys, mount

    assert set(spec) <= set(schema["properties"]) - AFTER_0_5_0, spec.keys()
    assert spec["cdiVersion"] == "0.5.0" and KIND.match(spec["kind"])
    names = [device["name"] for device in spec["devices"]]
    assert len(names) == len(set(names)) and all(NAME.match(n) for n in names), names
    device_keys = set(schema["properties"]["devices"]["items"]["properties"]) - AFTER_0_5_0
    for device in spec["devices"]:
        assert set(device) <= device_keys, device
        check_edits(device["containerEdits"])
    check_edits(spec["containerEdits"])


def nodes_of(edits: dict[str, Any]) -> list[str]:
    return [n["path"] for n in edits.get("deviceNodes", [])]


def expected_devices(minors: list[int]) -> dict[str, list[str]]:
    devices: dict[str, list[str]] = {}
    for minor in sorted(minors):
        devices[str(minor)] = [f"/dev/nvidia{minor}"]
        devices[uuid_of(minor)] = [f"/dev/nvidia{minor}"]
    devices["all"] = [f"/dev/nvidia{m}" for m in sorted(minors)]
    return devices


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("gpus", [{"0000:00:1e.0": 0}, EIGHT_GPUS], ids=["1 GPU", "8 GPUs"])
def test_the_spec_names_each_gpu_by_index_and_uuid_and_all(
        tmp_path: Path, bundle: Path, shell: str, gpus: dict[str, int]) -> None:
    node = with_gpus(tmp_path, bundle, gpus, shell)
    said = started(node)
    indices = " ".join(map(str, sorted(gpus.values())))
    assert (f"wrote /run/cdi/nvidia.com-gpu.json: nvidia.com/gpu={indices} (and by UUID), all"
            in said)
    spec = spec_of(node)
    assert spec["kind"] == "nvidia.com/gpu"
    assert {d["name"]: nodes_of(d["containerEdits"]) for d in spec["devices"]} == \
        expected_devices(list(gpus.values()))
    common = spec["containerEdits"]
    assert nodes_of(common) == COMMON
    # The resolved driver folder, not current: a later install must not change what a
    # running container has; its tools on every image's PATH.
    driver = folder(node)
    assert driver != "/opt/nvidia/current"
    assert common["mounts"] == [
        {"hostPath": f"{driver}/lib64", "containerPath": "/usr/local/nvidia/lib64",
         "options": OPTIONS},
        {"hostPath": f"{driver}/bin", "containerPath": "/usr/local/nvidia/bin", "options": OPTIONS},
        {"hostPath": f"{driver}/bin/nvidia-smi", "containerPath": "/usr/bin/nvidia-smi",
         "options": OPTIONS}]
    assert "env" not in common and "hooks" not in common
    assert (node.root / SPEC).stat().st_mode & 0o7777 == 0o644


def test_minors_that_are_not_contiguous(tmp_path: Path, bundle: Path) -> None:
    node = with_gpus(tmp_path, bundle, {"0000:00:1e.0": 3, "0000:00:1f.0": 0})
    started(node)
    assert {d["name"]: nodes_of(d["containerEdits"]) for d in spec_of(node)["devices"]} == \
        expected_devices([0, 3])


def test_a_gpu_without_a_uuid_has_its_index_only(tmp_path: Path, bundle: Path) -> None:
    node = with_gpus(tmp_path, bundle, {"0000:00:1e.0": 0, "0000:00:1f.0": 1})
    info = node.root / "proc/driver/nvidia/gpus/0000:00:1f.0/information"
    info.write_text("".join(line for line in info.read_text().splitlines(keepends=True)
                            if not line.startswith("GPU UUID")))
    started(node)
    assert [d["name"] for d in spec_of(node)["devices"]] == ["0", uuid_of(0), "1", "all"]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_mig_capability_nodes_and_the_socket_only_where_present(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    node = with_gpus(tmp_path, bundle, {"0000:00:1e.0": 0}, shell)
    started(node)
    spec = spec_of(node)
    assert nodes_of(spec["containerEdits"]) == COMMON
    assert not [m for m in spec["containerEdits"]["mounts"] if "persistenced" in m["hostPath"]]
    caps = node.root / "dev/nvidia-caps"
    caps.mkdir()
    for minor in (1, 2):
        os.mknod(caps / f"nvidia-cap{minor}", 0o20400, os.makedev(237, minor))
    (caps / "not-a-device").write_text("")
    (node.root / "var/run").symlink_to("../run")  # as on Flatcar
    (node.root / "run/nvidia-persistenced").mkdir()
    # Bound by its relative name (a Unix socket's path is limited to 107 bytes); the file
    # stays when the process ends.
    subprocess.run([sys.executable, "-c", "import socket; "
                    "socket.socket(socket.AF_UNIX).bind('socket')"],
                   cwd=node.root / "run/nvidia-persistenced", check=True)
    started(node)
    spec = spec_of(node)
    assert nodes_of(spec["containerEdits"]) == [
        *COMMON, "/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2"]
    assert spec["containerEdits"]["mounts"][-1] == {
        "hostPath": "/var/run/nvidia-persistenced/socket",
        "containerPath": "/var/run/nvidia-persistenced/socket", "options": OPTIONS}


def test_the_write_is_one_rename(tmp_path: Path, bundle: Path) -> None:
    """An existing spec is replaced whole (a reader sees the old or the new file, never a
    mix): a hard link to the old one keeps the old bytes; a temporary file a killed run left
    is cleared; none is left."""
    node = with_gpus(tmp_path, bundle, {"0000:00:1e.0": 0})
    spec = node.root / SPEC
    spec.parent.mkdir(parents=True)
    old = '{"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "devices": []}\n' + " " * 9000
    spec.write_text(old)
    spec.chmod(0o600)
    witness = tmp_path / "witness"
    os.link(spec, witness)
    (spec.parent / ".nvidia.com-gpu.json.tmp.4242").write_text("{")
    started(node)
    assert witness.read_text() == old
    assert spec.stat().st_ino != witness.stat().st_ino
    assert spec.stat().st_mode & 0o7777 == 0o644
    assert [d["name"] for d in spec_of(node)["devices"]] == ["0", uuid_of(0), "all"]
    assert sorted(p.name for p in spec.parent.iterdir()) == ["nvidia.com-gpu.json"]
    # Again: the same bytes.
    before = spec.read_bytes()
    started(node)
    assert spec.read_bytes() == before


@pytest.mark.parametrize("shell", SHELLS)
def test_no_gpu_writes_no_spec_and_removes_a_stale_one(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    node = with_gpus(tmp_path, bundle, {}, shell)
    said = started(node)
    assert not (node.root / SPEC).exists() and "cdi" not in said
    spec = node.root / SPEC
    spec.parent.mkdir(parents=True)
    spec.write_text("{}")
    said = started(node)
    assert "no NVIDIA GPU on PCI" in said
    assert "removed /run/cdi/nvidia.com-gpu.json" in said
    assert not spec.exists()


def test_check_says_what_it_would_write_and_writes_nothing(tmp_path: Path, bundle: Path) -> None:
    node = with_gpus(tmp_path, bundle, {"0000:00:1e.0": 0, "0000:00:1f.0": 1})
    started(node)
    (node.root / SPEC).unlink()
    said = started(node, "--check")
    assert ("would write /run/cdi/nvidia.com-gpu.json: nvidia.com/gpu=0 1 (and by UUID), all"
            in said)
    assert not (node.root / SPEC).exists()
    # Up to date: nothing to say.
    started(node)
    assert "would write" not in started(node, "--check")


def test_uninstall_removes_it(tmp_path: Path, bundle: Path) -> None:
    node = with_gpus(tmp_path, bundle, {"0000:00:1e.0": 0})
    started(node)
    assert (node.root / SPEC).is_file()
    result = node.install(bundle, "--uninstall")
    assert result.code == 0, result.stderr
    assert not (node.root / SPEC).exists()


def cdi_check(node: Node) -> dict[str, str]:
    report = json.loads(node.doctor("--json").stdout)
    [check] = [c for c in report["checks"] if c["check"] == "cdi"]
    assert isinstance(check, dict)
    return check


def test_the_doctors_cdi_check(tmp_path: Path, bundle: Path) -> None:
    """(Under every shell, test_node_doctor's healthy node passes it.)"""
    node = with_gpus(tmp_path, bundle, {"0000:00:1e.0": 0, "0000:00:1f.0": 3})
    started(node)
    check = cdi_check(node)
    assert check["status"] == "PASS", check
    assert check["detail"].startswith(
        "/run/cdi/nvidia.com-gpu.json: 5 devices for the 2 GPU(s) the driver lists "
        "(nvidia.com/gpu=0 3 by index and UUID, and all)"), check
    # The driver now lists a third GPU the spec does not.
    node.add_gpu("0000:00:20.0", 1)
    check = cdi_check(node)
    assert check["status"] == "FAIL" and "but the driver lists nvidia.com/gpu=0 " in check["detail"]
    assert check["fix"].startswith("systemctl restart nvidia.service"), check
    (node.root / SPEC).unlink()
    check = cdi_check(node)
    assert check["status"] == "FAIL" and "nvidia.com-gpu.json is missing" in check["detail"]
    assert check["fix"].startswith("systemctl restart nvidia.service"), check
    (node.root / "proc/modules").write_text("drm 1 0 - Live 0x0\n")
    assert cdi_check(node)["status"] == "FAIL"


# --- a real consumer: Podman ------------------------------------------------------------------

PODMAN_FLAGS = ("--storage-driver", "vfs", "--cgroup-manager=cgroupfs", "--events-backend=file",
                "--runtime", "runc")
RUN_FLAGS = ("--rm", "--network", "none", "--ulimit", "nofile=4096:4096",
             "--ulimit", "nproc=4096:4096")


class Podman:
    """Podman with storage of its own, reading CDI specs from one folder: /run and /etc/cdi
    are tmpfs in a mount namespace of its own (Podman 4.3 reads only /etc/cdi and
    /var/run/cdi, and has no --cdi-spec-dir), so the machine's are neither read nor touched."""

    def __init__(self, folder: Path, specs: Path, runroot: Path) -> None:
        self.folder = folder
        self.specs = specs
        self.base = ["podman", "--root", str(folder / "storage"), "--runroot", str(runroot),
                     "--tmpdir", str(folder / "tmp"), *PODMAN_FLAGS]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        script = ('mount -t tmpfs tmpfs /run && mkdir /run/cdi && cp "$0"/*.json /run/cdi/ && '
                  '{ [ ! -d /etc/cdi ] || mount -t tmpfs tmpfs /etc/cdi; } && exec "$@"')
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
             str(self.specs), *self.base, *args],
            capture_output=True, text=True, timeout=120, check=False)


def image_root(folder: Path) -> Path:
    """busybox and what `ldd` says it loads, at their paths, and sh: an image's root."""
    root = folder / "image"
    busybox = shutil.which("busybox")
    assert busybox is not None
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    ldd = subprocess.run(["ldd", busybox], capture_output=True, text=True, check=True).stdout
    for lib in re.findall(r"(/\S+) \(0x", ldd):
        (root / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, root / lib.lstrip("/"))
    return root


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Iterator[tuple[Podman, Node]]:
    """A node with GPUs 0 and 3 whose driver has a real ELF libnvidia-ml.so.1 (a host
    library's bytes) and an nvidia-smi stand-in; its spec with the host paths moved into the
    node's tree (the spec names the node's own paths, and this machine is not that node);
    an image imported from a local folder, with the LD_LIBRARY_PATH NVIDIA's CUDA images set."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    folder = tmp_path_factory.mktemp("podman")
    node = with_gpus(folder / "node", bundle, {"0000:00:1e.0": 0, "0000:00:1f.0": 3})
    driver = (node.root / "opt/nvidia/current").resolve()
    libz = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    [real] = re.findall(r"libz\.so\.1 \(libc6,x86-64\) => (\S+)", libz)[:1]
    shutil.copy(real, driver / "lib64/libnvidia-ml.so.1")  # was a link: a file now
    (driver / "bin/nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    started(node)
    spec = spec_of(node)
    for edits in [spec["containerEdits"], *(d["containerEdits"] for d in spec["devices"])]:
        for dev in edits.get("deviceNodes", []):
            dev["hostPath"] = f"{node.root}{dev['path']}"
        for mount in edits.get("mounts", []):
            mount["hostPath"] = f"{node.root}{mount['hostPath']}"
    specs = folder / "cdi"
    specs.mkdir()
    (specs / "nvidia.com-gpu.json").write_text(json.dumps(spec))
    # Podman refuses a runroot path longer than 50 characters, which a test's folder under
    # an xdist worker's base folder is: a short one of its own under /tmp.
    runroot = Path(tempfile.mkdtemp(prefix="podman-run-"))
    run = Podman(folder, specs, runroot)
    try:
        tar = folder / "image.tar"
        subprocess.run(["tar", "-C", image_root(folder), "-cf", tar, "."], check=True)
        imported = run("import", "--change", "ENV=LD_LIBRARY_PATH=/usr/local/nvidia/lib64",
                       str(tar), "localhost/coreos-gpu-cdi-test:1")
        assert imported.returncode == 0, imported.stderr
        yield run, node
    finally:
        run("rmi", "--all", "--force")
        shutil.rmtree(runroot, ignore_errors=True)


INSIDE = """
for d in /dev/nvidia*; do busybox stat -c '%n %F %t:%T' "$d"; done
echo "smi: $(command -v nvidia-smi) $(nvidia-smi)"
LD_DEBUG=libs LD_PRELOAD=libnvidia-ml.so.1 busybox true 2>&1 | busybox grep 'calling init: .*nvidia'
"""


@pytest.mark.parametrize("device,minors", [("all", [0, 3]), ("3", [3]), (uuid_of(0), [0])])
def test_podman_hands_a_container_the_devices_libraries_and_tools(
        podman: tuple[Podman, Node], device: str, minors: list[int]) -> None:
    run, _ = podman
    result = run("run", *RUN_FLAGS, "--device", f"nvidia.com/gpu={device}",
                 "localhost/coreos-gpu-cdi-test:1", "sh", "-c", INSIDE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    nodes = {line.split()[0]: line.split()[-1] for line in lines if "character special" in line}
    assert nodes == {
        **{f"/dev/nvidia{m}": f"c3:{m:x}" for m in minors}, "/dev/nvidiactl": "c3:ff",
        "/dev/nvidia-modeset": "c3:fe", "/dev/nvidia-uvm": f"{UVM_MAJOR:x}:0",
        "/dev/nvidia-uvm-tools": f"{UVM_MAJOR:x}:1"}, result.stdout
    assert "smi: /usr/bin/nvidia-smi GPU 0: stand-in" in lines, result.stdout
    # The loader finds the library by its soname in the mounted folder.
    assert any(line.endswith("calling init: /usr/local/nvidia/lib64/libnvidia-ml.so.1")
               for line in lines), result.stdout
