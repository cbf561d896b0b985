"""startup.sh against a fake GPU node: detection, kernel match, load order, firmware,
device nodes, exit codes. Runs the real script under bash, dash and busybox sh."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .bundletools import CLOUD, KERNEL, VERSION
from .nodetree import EIGHT_GPUS, SHELLS, UVM_MAJOR, Node, make_bundle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")


def installed(tmp_path: Path, bundle: Path, *, shell: str = "sh") -> Node:
    node = Node(tmp_path, shell=shell)
    result = node.install(bundle)
    assert result.code == 0, result.stderr
    return node


def expected_nodes(*minors: int) -> dict[str, tuple[int, int, int]]:
    nodes = {"/dev/nvidiactl": (195, 255, 0o666), "/dev/nvidia-modeset": (195, 254, 0o666),
             "/dev/nvidia-uvm": (UVM_MAJOR, 0, 0o666),
             "/dev/nvidia-uvm-tools": (UVM_MAJOR, 1, 0o666)}
    nodes.update({f"/dev/nvidia{m}": (195, m, 0o666) for m in minors})
    return nodes


def module_dir(node: Node) -> Path:
    return (node.root / "opt/nvidia/current").resolve() / "modules" / KERNEL


@pytest.mark.parametrize("shell", SHELLS)
def test_no_gpu_loads_nothing_and_succeeds(tmp_path: Path, bundle: Path, shell: str) -> None:
    node = installed(tmp_path, bundle, shell=shell)
    node.add_pci("0000:00:02.0", vendor="0x1234", cls="0x030000")  # another vendor's VGA
    node.add_pci("0000:00:1f.0", cls="0x040300")  # an NVIDIA audio function is no GPU
    result = node.startup()
    assert result.code == 0, result.stderr
    assert "no NVIDIA GPU on PCI" in result.stderr
    # Only modprobe -c, which reads its configuration and loads nothing.
    assert not node.calls("insmod") and not node.calls("mknod")
    assert [c[1] for c in node.calls("modprobe")] in ([], ["-c"])
    assert node.nodes() == {}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("cls", ["0x030000", "0x030200"], ids=["VGA", "3D"])
def test_one_gpu(tmp_path: Path, bundle: Path, shell: str, cls: str) -> None:
    node = installed(tmp_path, bundle, shell=shell)
    node.add_gpu("0000:00:1e.0", 0, cls=cls)
    result = node.startup()
    assert result.code == 0, result.stderr
    folder = module_dir(node)
    # modprobe's configuration (for the options), kernel dependencies, then ours by full
    # path, in order.
    assert [c[:2] for c in node.calls() if c[0] in ("insmod", "modprobe")] == [
        ["modprobe", "-c"], ["modprobe", "-q"], ["modprobe", "-q"],
        ["insmod", f"{folder}/nvidia.ko"], ["insmod", f"{folder}/nvidia-modeset.ko"],
        ["insmod", f"{folder}/nvidia-uvm.ko"]]
    assert node.nodes() == expected_nodes(0)
    assert node.calls("nvidia-smi") == [["nvidia-smi", "-L"]]
    # The GSP firmware search path: the resolved version folder, as the node sees it.
    firmware = (node.root / "sys/module/firmware_class/parameters/path").read_text()
    assert firmware == f"/opt/nvidia/{folder.parent.parent.name}/firmware"
    assert (node.root / firmware.lstrip("/") / "nvidia" / VERSION / "gsp_ga10x.bin").is_file()
    assert "1 GPU(s) answer nvidia-smi" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_two_gpus(tmp_path: Path, bundle: Path, shell: str) -> None:
    node = installed(tmp_path, bundle, shell=shell)
    node.add_gpu("0000:00:1e.0", 0)
    node.add_gpu("0000:00:1f.0", 1, cls="0x030000")
    assert node.startup().code == 0
    assert node.nodes() == expected_nodes(0, 1)


@pytest.mark.parametrize("shell", SHELLS)
def test_eight_gpus_numbered_by_device_minor_not_bus_order(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    node = installed(tmp_path, bundle, shell=shell)
    for bus, minor in EIGHT_GPUS.items():
        node.add_gpu(bus, minor)
    result = node.startup()
    assert result.code == 0, result.stderr
    assert node.nodes() == expected_nodes(*range(8))
    assert "8 NVIDIA GPU(s)" in result.stderr


def test_minors_that_are_not_contiguous(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 3)
    node.add_gpu("0000:00:1f.0", 0)
    assert node.startup().code == 0
    assert node.nodes() == expected_nodes(0, 3)  # not nvidia0 and nvidia1


def test_uvm_major_comes_from_proc_devices(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    devices = node.root / "proc/devices"
    devices.write_text(devices.read_text().replace(f"{UVM_MAJOR} nvidia-uvm\n",
                                                   "237 nvidia-uvm\n"))
    assert node.startup().code == 0
    assert node.nodes()["/dev/nvidia-uvm"] == (237, 0, 0o666)
    assert node.nodes()["/dev/nvidia-uvm-tools"] == (237, 1, 0o666)


@pytest.mark.parametrize("shell", SHELLS)
def test_present_nodes_are_kept_and_a_rerun_changes_nothing(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    node = installed(tmp_path, bundle, shell=shell)
    node.add_gpu("0000:00:1e.0", 0)
    node.add_gpu("0000:00:1f.0", 1)
    os.mknod(node.root / "dev/nvidiactl", 0o20644, os.makedev(195, 255))  # umask 022
    os.mknod(node.root / "dev/nvidia1", 0o20666, os.makedev(195, 7))  # wrong numbers
    assert node.startup().code == 0
    made = [c[3] for c in node.calls("mknod")]
    assert f"{node.root}/dev/nvidiactl" not in made  # kept, its mode mended
    assert f"{node.root}/dev/nvidia1" in made
    assert node.nodes() == expected_nodes(0, 1)
    # Again: modules loaded, nodes there — nothing to do, and no failure.
    again = node.startup()
    assert again.code == 0, again.stderr
    assert not node.calls("insmod") and not node.calls("mknod")
    assert "nvidia is loaded already" in again.stderr


def test_kernel_mismatch_refuses_before_any_insmod(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    result = node.startup(env={"FAKE_KERNEL": CLOUD})
    assert result.code == 4
    [error] = result.errors
    assert f"the running kernel is {CLOUD}" in error and f"only for {KERNEL}" in error
    assert "coreos-gpu build" in error
    assert not node.calls("insmod") and node.nodes() == {}


@pytest.mark.parametrize(("error", "code", "words"), [
    ("Invalid module format", 4, "kernel mismatch"),
    ("No such device", 8, "the kernel accepted nvidia.ko, but the driver found no usable"),
    ("Unknown symbol in module", 5, "insmod"),
])
def test_insmod_failures_have_their_own_exit_codes(
        tmp_path: Path, bundle: Path, error: str, code: int, words: str) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    result = node.startup(env={"FAKE_INSMOD_ERROR": f"nvidia:{error}"})
    assert result.code == code, result.stderr
    [line] = result.errors
    assert words in line and error in line
    assert len(node.calls("insmod")) == 1 and node.nodes() == {}


@pytest.mark.parametrize(("args", "env"), [(["--force-load"], {}),
                                          ([], {"NVIDIA_FORCE_LOAD": "1"})])
def test_force_load_without_gpu_reports_no_device(tmp_path: Path, bundle: Path,
                                                  args: list[str], env: dict[str, str]) -> None:
    node = installed(tmp_path, bundle)
    result = node.startup(*args, env={"FAKE_INSMOD_ERROR": "nvidia:No such device", **env})
    assert result.code == 8
    assert "loading anyway (--force-load)" in result.stderr


def test_another_loaded_driver_version_needs_a_reboot(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    (node.root / "sys/module/nvidia").mkdir(parents=True)
    (node.root / "sys/module/nvidia/version").write_text("470.256.02\n")
    result = node.startup()
    assert result.code == 9
    assert "NVIDIA driver 470.256.02 is loaded, but 535.261.03 is installed: reboot" in (
        result.errors[0])
    assert not node.calls("insmod")


@pytest.mark.parametrize(("insmod", "code"), [("", 0), ("nvidia:Unknown symbol in module", 5),
                                              ("nvidia:Invalid module format", 4)])
def test_a_missing_kernel_dependency_is_named(tmp_path: Path, bundle: Path, insmod: str,
                                              code: int) -> None:
    """modprobe of a dependency fails: insmod still runs, so its error tells a kernel
    mismatch from a missing dependency, and a missing dependency is named."""
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    deps = (node.root / "opt/nvidia/current/node/module-deps")
    deps.write_text(deps.read_text().replace(f"{KERNEL} nvidia -", f"{KERNEL} nvidia ipmi_x,drm"))
    (node.root / "proc/modules").write_text("")
    result = node.startup(env={"FAKE_MODPROBE_MISSING": "drm", "FAKE_INSMOD_ERROR": insmod})
    assert result.code == code, result.stderr
    assert "warning: cannot load the kernel module drm, which nvidia needs" in result.stderr
    assert [c[1] for c in node.calls("modprobe") if c[1] not in ("-q", "-c")] == ["ipmi_x", "drm"]
    assert node.calls("insmod")
    if code == 5:
        assert result.errors[0].endswith("these kernel modules it needs could not be loaded: drm")
    if code == 4:
        assert "kernel mismatch" in result.errors[0]


def test_nvidia_drm_on_request(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    folder = module_dir(node)
    result = node.startup(env={"NVIDIA_LOAD_DRM": "1"})
    assert result.code == 3  # the test bundle has no nvidia-drm.ko: said, not ignored
    assert f"{folder}/nvidia-drm.ko is missing" in result.errors[0]


def test_mknod_failure(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    result = node.startup(env={"FAKE_MKNOD_FAIL": "1"})
    assert result.code == 6
    assert "cannot make the device node /dev/nvidiactl (c 195 255)" in result.errors[0]


def test_nvidia_smi_must_answer(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    result = node.startup(env={"FAKE_SMI_FAIL": "1"})
    assert result.code == 7
    assert "nvidia-smi does not answer: NVIDIA-SMI has failed" in result.errors[0]


def test_persistence_mode_on_request(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    node.add_gpu("0000:00:1e.0", 0)
    assert node.startup(env={"NVIDIA_PERSISTENCE_MODE": "1"}).code == 0
    assert ["nvidia-smi", "-pm", "1"] in node.calls("nvidia-smi")
    assert node.startup().code == 0
    assert ["nvidia-smi", "-pm", "1"] not in node.calls("nvidia-smi")


@pytest.mark.parametrize("shell", SHELLS)
def test_check_changes_nothing(tmp_path: Path, bundle: Path, shell: str) -> None:
    node = installed(tmp_path, bundle, shell=shell)
    node.add_gpu("0000:00:1e.0", 0)
    result = node.startup("--check")
    assert result.code == 7  # nothing is loaded, so nvidia-smi cannot answer
    # Only modprobe -c, which reads its configuration and loads nothing.
    assert not node.calls("insmod") and not node.calls("mknod")
    assert [c[1] for c in node.calls("modprobe")] in ([], ["-c"])
    assert node.nodes() == {}
    assert (node.root / "sys/module/firmware_class/parameters/path").read_text() == "\n"
    assert f"would run: insmod {module_dir(node)}/nvidia.ko" in result.stderr
    assert "would set the firmware search path" in result.stderr
    # Loaded and made by a real run, --check finds nothing to do, and passes.
    assert node.startup().code == 0
    checked = node.startup("--check")
    assert checked.code == 0, checked.stderr
    assert "would" not in checked.stderr


def test_not_installed(tmp_path: Path) -> None:
    node = Node(tmp_path)
    result = node.run(Path(__file__).parents[1] / "src/coreos_gpu/resources/node/startup.sh",
                      "--root", str(node.root))
    assert result.code == 3
    assert result.errors == [
        f"startup.sh: error: {Path(__file__).parents[1]}/src/coreos_gpu/resources/node is not a "
        "driver folder of /opt/nvidia: startup.sh loads only an installed driver "
        "(install_nvidia.sh installs one; nvidia.service runs /opt/nvidia/startup.sh)"]


def test_bad_arguments(tmp_path: Path, bundle: Path) -> None:
    node = installed(tmp_path, bundle)
    result = node.startup("--frobnicate")
    assert result.code == 2
    assert result.errors == ["startup.sh: error: unknown argument --frobnicate"]


@pytest.mark.parametrize("shell", SHELLS)
def test_modprobe_d_options_reach_insmod(tmp_path: Path, bundle: Path, shell: str) -> None:
    """insmod ignores /etc/modprobe.d: startup.sh passes each module its options as modprobe
    -c gives them (module names with - or _ alike), and no other module's."""
    node = installed(tmp_path, bundle, shell=shell)
    node.add_gpu("0000:00:1e.0", 0)
    conf = node.root / "etc/modprobe.d"
    conf.mkdir(parents=True)
    (conf / "nvidia.conf").write_text(
        "# GSP firmware off: the driver's own documented switch\n"
        "options nvidia NVreg_EnableGpuFirmware=0\n"
        "options nvidia NVreg_DeviceFileMode=0660 NVreg_RegistryDwords=\"RMA=1;RMB=2\"\n"
        "options nvidia-uvm uvm_perf_prefetch_enable=0\n"
        "options nvidia_drm modeset=1\n"
        "blacklist nouveau\n")
    result = node.startup()
    assert result.code == 0, result.stderr
    folder = module_dir(node)
    assert node.calls("insmod") == [
        ["insmod", f"{folder}/nvidia.ko", "NVreg_EnableGpuFirmware=0", "NVreg_DeviceFileMode=0660",
         'NVreg_RegistryDwords="RMA=1;RMB=2"'],
        ["insmod", f"{folder}/nvidia-modeset.ko"],
        ["insmod", f"{folder}/nvidia-uvm.ko", "uvm_perf_prefetch_enable=0"]]
    assert ["modprobe", "-c", "-C", f"{node.root}/etc/modprobe.d"] in node.calls("modprobe")


@pytest.fixture(scope="module")
def two_kernels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two bundles of one driver: one for the kernel the node runs now, one for the kernel
    an OS update brings (another bundle id)."""
    folder = tmp_path_factory.mktemp("update")
    ko_dir = folder / "ko"
    ko_dir.mkdir()
    return (make_bundle(folder / "now", ko_dir),
            make_bundle(folder / "next", ko_dir, tool_version="0.2.0", kernels=(CLOUD,)))


def current(node: Node) -> str:
    return os.readlink(node.root / "opt/nvidia/current")


@pytest.mark.parametrize("shell", SHELLS)
def test_a_boot_into_another_kernel_switches_to_the_folder_for_it(
        tmp_path: Path, two_kernels: tuple[Path, Path], shell: str) -> None:
    """The bundle for the next kernel installed (current points at it), the node still on
    the old kernel, then the update's kernel, then a rollback to the old one: each boot uses
    the folder with modules for the kernel it runs, switching `current` without network."""
    now, upcoming = two_kernels
    node = installed(tmp_path, now, shell=shell)
    first = current(node)
    # --force: made current although the node does not run its kernel yet (without it, the
    # bundle is staged instead: test_node_transaction).
    assert node.install(upcoming, "--force").code == 0
    second = current(node)
    node.add_gpu("0000:00:1e.0", 0)
    # Still on the old kernel: back to the first folder.
    result = node.startup()
    assert result.code == 0, result.stderr
    assert current(node) == first
    assert os.readlink(node.root / "opt/nvidia/previous") == second
    assert f"/opt/nvidia/current is now {first} (was {second})" in result.stderr
    assert node.calls("insmod")[0][1] == (
        f"{node.root}/opt/nvidia/{first}/modules/{KERNEL}/nvidia.ko")
    # The update's kernel: the second folder, its modules.
    for path in ("proc/modules", "sys/module/nvidia/version"):
        (node.root / path).unlink()
    (node.root / "proc/modules").write_text("")
    updated = node.startup(env={"FAKE_KERNEL": CLOUD})
    assert updated.code == 0, updated.stderr
    assert current(node) == second
    assert [c[1] for c in node.calls("insmod")] == [
        f"{node.root}/opt/nvidia/{second}/modules/{CLOUD}/{m}.ko"
        for m in ("nvidia", "nvidia-modeset", "nvidia-uvm")]
    firmware = (node.root / "sys/module/firmware_class/parameters/path").read_text()
    assert firmware == f"/opt/nvidia/{second}/firmware"


def test_check_says_it_would_switch_and_changes_nothing(
        tmp_path: Path, two_kernels: tuple[Path, Path]) -> None:
    now, upcoming = two_kernels
    node = installed(tmp_path, now)
    assert node.install(upcoming, "--force").code == 0
    before = current(node)
    node.add_gpu("0000:00:1e.0", 0)
    result = node.startup("--check")
    assert f"would point /opt/nvidia/current at {os.readlink(node.root / 'opt/nvidia/previous')}"\
        f", which has modules for kernel {KERNEL}" in result.stderr
    assert result.stderr.count("NVIDIA GPU(s)") == 1  # said once, by the folder switched to
    assert current(node) == before and not node.calls("insmod")


def test_no_switch_to_another_flavour(tmp_path: Path, two_kernels: tuple[Path, Path]) -> None:
    """A folder of the same driver with the other module flavour is not this driver."""
    now, upcoming = two_kernels
    node = installed(tmp_path, now)
    other = current(node)
    env = node.root / "opt/nvidia" / other / "node/bundle.env"
    env.write_text(env.read_text().replace("FLAVOUR=proprietary", "FLAVOUR=open"))
    assert node.install(upcoming, "--force").code == 0
    node.add_gpu("0000:00:1e.0", 0)
    result = node.startup()
    assert result.code == 4, result.stderr
    assert "no other installed folder of driver" in result.errors[0]
    assert current(node) != other and not node.calls("insmod")
