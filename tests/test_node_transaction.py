"""A node never ends worse than it began: an install is one transaction, and the boot does not
need `current` to be whole to say what is wrong with it.

Faults are injected at every step of an install (the n-th command it runs fails, for every n;
a path it writes is read-only, in a mount namespace; the file system fills up, on a small
tmpfs; something is in the way; a tool is missing). Each install either succeeds, and leaves
what an undisturbed install leaves, or fails with exactly one `install_nvidia.sh: error:` line,
no line from the shell, the root byte-identical to before, nothing left in temporary places,
and the old driver still loading. Then the boot: a `current` that is dangling, garbage or a
folder is named in one line and the boot falls back to `previous`. Then a bundle that is not
for this node: staged, not made current; refused when it cannot be staged or is for another
machine or OS. Under dash, bash (also as `sh`) and busybox sh, against sysroots
(tests/nodetree.py); no VM.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreos_gpu.config import KernelModuleType

from .bundletools import CLOUD, KERNEL
from .nodetree import SHELLS, Node, NodeBundles, Result, snapshot
from .test_node_faults import COMMANDS, bundle_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
GPU = "0000:00:1e.0"

# The n-th external command of the run fails (exit 1, saying nothing: the words must be ours),
# without running. Calls are counted under a lock (pipelines run in parallel).
FAILER = """#!/bin/sh
PATH=${PATH#*:}  # the wrappers' own folder is first
n=$(flock "$FAIL_STATE.lock" /bin/sh -c \
    'n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 )); echo "$n" >"$1"; echo "$n"' _ "$FAIL_STATE")
[ "$n" = "$FAIL_AT" ] && exit 1
exec "${0##*/}" "$@"
"""


@dataclass(frozen=True)
class Bundles:
    old: Path  # the node's driver, no repository
    new: Path  # the same driver, another bundle id, with a repository (its units come along)
    cloud: Path  # only for the cloud kernel, which the node does not run
    cloud_open: Path  # the same, with the open modules


@pytest.fixture(scope="module")
def bundles(node_bundles: NodeBundles) -> Bundles:
    make = node_bundles.make
    return Bundles(
        old=make("old"),
        new=make("new", tool_version="0.2.0", repository=node_bundles.trust),  # never reached
        cloud=make("cloud", tool_version="0.3.0", kernels=(CLOUD,)),
        cloud_open=make("cloud-open", tool_version="0.3.0", kernels=(CLOUD,),
                        flavour=KernelModuleType.OPEN))


def with_driver(folder: Path, bundle: Path | None, shell: str = "sh") -> Node:
    """A node with a GPU, and the bundle's driver installed (None: no driver yet)."""
    node = Node(folder, shell=shell)
    node.add_gpu(GPU, 0)
    if bundle is not None:
        assert node.install(bundle).code == 0
    return node


def clone(node: Node, folder: Path) -> Node:
    shutil.copytree(node.root.parent, folder, symlinks=True)
    return Node(folder, shell=" ".join(node.shell))


def loads(node: Node, name: str) -> None:
    """The boot loads the driver in /opt/nvidia/<name>."""
    result = node.startup()
    assert result.code == 0, result.stderr
    assert node.calls("insmod")[0][1] == f"{node.root}/opt/nvidia/{name}/modules/{KERNEL}/nvidia.ko"


def one_line_of_ours(result: Result) -> str:
    """The run said exactly one error line, and nothing that is not ours."""
    lines = result.stderr.splitlines()
    assert [line for line in lines if not line.startswith("install_nvidia.sh: ")] == [], \
        result.stderr
    assert len(result.errors) == 1, result.stderr
    return result.errors[0]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp." in p.name or p.name.startswith(
        (".stage.", ".undo.", ".gone."))]


# --- a command fails, at every step ------------------------------------------------------------

def install_failing(node: Node, bundle: Path, at: int) -> tuple[Result, int]:
    """Install with the at-th external command failing (0: none); the result, and how many
    commands ran."""
    wrappers = node.root.parent / "failing-bin"
    if not wrappers.exists():
        wrappers.mkdir()
        for name in COMMANDS:
            (wrappers / name).write_text(FAILER)
            (wrappers / name).chmod(0o755)
    state = node.root.parent / "failing-count"
    state.write_text("0")
    result = node.install(bundle, env={"FAIL_STATE": str(state), "FAIL_AT": str(at),
                                       "PATH": f"{wrappers}:{node.env['PATH']}"})
    return result, int(state.read_text())


def fail_everywhere(tmp_path: Path, start: Node, bundle: Path, old: str | None,
                    step: int = 1) -> int:
    """Fail each command of an install over `start` in turn (every step-th); return how many
    of those runs failed."""
    reference = clone(start, tmp_path / "reference")
    result, total = install_failing(reference, bundle, 0)
    assert result.code == 0, result.stderr
    expected = snapshot(reference.root)
    before = snapshot(start.root)
    assert total > 60, total
    failures = 0
    for at in range(1, total + 1, step):
        node = clone(start, tmp_path / f"at-{at}")
        result, _ = install_failing(node, bundle, at)
        if result.code == 0:  # a command whose failure only changes the way (cmp: "differs")
            found = snapshot(node.root)
            if "cannot remove the journal" in result.stderr:  # the next run removes it
                found = {k: v for k, v in found.items() if "/.undo." not in f"/{k}"}
            assert found == expected, (at, result.stderr)
        else:
            failures += 1
            one_line_of_ours(result)
            assert snapshot(node.root) == before, (at, result.stderr)
            assert not leftovers(node.root), at
            if old is not None:
                loads(node, old)
        shutil.rmtree(node.root.parent)
    assert failures > total // (3 * step), (failures, total)
    return failures


@pytest.mark.slow
@pytest.mark.parametrize("shell", SHELLS)
def test_an_upgrade_that_fails_at_any_step_leaves_the_node_as_it_was(
        tmp_path: Path, bundles: Bundles, shell: str) -> None:
    """Before the new folder lands, while it lands, after it, after the switch, during the
    ldconfig and systemctl that follow: the old driver stays current and loads."""
    start = with_driver(tmp_path / "start", bundles.old, shell)
    # Every step under bash (Flatcar's sh), every other under dash, every third under
    # busybox: the steps are the same script's; what differs is how each shell fails.
    fail_everywhere(tmp_path, start, bundles.new, bundle_name(bundles.old),
                    step={"bash": 1, "dash": 2}.get(shell, 3))


@pytest.mark.slow
def test_a_first_install_that_fails_at_any_step_leaves_no_trace(
        tmp_path: Path, bundles: Bundles) -> None:
    start = with_driver(tmp_path / "start", None)
    (start.root / "opt/bin").mkdir(parents=True)
    (start.root / "opt/bin/kubectl").write_text("#!/bin/sh\n")
    fail_everywhere(tmp_path, start, bundles.new, None, step=2)


# --- read-only paths, a full file system, things in the way, a missing tool ---------------------

def in_namespace(node: Node, bundle: Path, script: str,
                 env: dict[str, str] | None = None) -> Result:
    """Run `script` (sh) in a mount namespace of its own: $R is the node's root, and "$@"
    the install of bundle into it."""
    return node.run("/bin/sh", "-c", f'R="$1"; shift; {script}', "_", str(node.root),
                    *node.shell, str(bundle / "install_nvidia.sh"), "--root", str(node.root),
                    env=env, shell=["unshare", "--mount"])


def read_only(path: str) -> str:
    return (f'mount --bind "$R/{path}" "$R/{path}" && mount -o remount,bind,ro "$R/{path}" && '
            'exec "$@"')


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("path", "upgrade"), [
    ("opt/bin", False), ("etc/ld.so.conf.d", False), ("etc/systemd/system", False),
    ("etc/systemd/system/dcos-mesos-slave.service.d", False),
    # The upgrade changes the unit (the new bundle has a repository) and adds units.
    ("etc/systemd/system", True)])
def test_a_read_only_path_fails_the_install_whole(tmp_path: Path, bundles: Bundles,
                                                  shell: str, path: str, upgrade: bool) -> None:
    node = with_driver(tmp_path, bundles.old if upgrade else None, shell)
    (node.root / path).mkdir(parents=True, exist_ok=True)
    before = snapshot(node.root)
    result = in_namespace(node, bundles.new, read_only(path))
    assert result.code == 1, result.stderr
    line = one_line_of_ours(result)
    assert "Read-only file system" in line, line
    assert snapshot(node.root) == before
    if upgrade:
        loads(node, bundle_name(bundles.old))


@pytest.mark.parametrize("shell", SHELLS)
def test_a_read_only_opt_nvidia_is_refused_in_one_line(tmp_path: Path, bundles: Bundles,
                                                       shell: str) -> None:
    node = with_driver(tmp_path, bundles.old, shell)
    before = snapshot(node.root)
    result = in_namespace(node, bundles.new, read_only("opt/nvidia"))
    assert result.code == 1, result.stderr
    assert "cannot open the lock file" in one_line_of_ours(result)
    assert snapshot(node.root) == before


# In the namespace: the root moved onto a tmpfs just big enough, then filled to leave ROOM KiB;
# a listing with every file's sum before and after the install (the filler stays for both).
FULL = """
cp -a "$R" "$R.copy" && mount -t tmpfs -o size=SIZEk tmpfs "$R" && cp -a "$R.copy/." "$R/" &&
rm -rf "$R.copy" || exit 99
free=$(/bin/df -k "$R" | awk 'NR == 2 { print $4 }')
head -c $(( (free - ROOM) * 1024 )) /dev/zero >"$R/filler" || exit 99
listing() {
    find "$R" -printf '%y %m %p %l\\n' | sort
    find "$R" -type f -exec sha256sum {} + | sort
}
listing >"$R.before"
"$@"
rc=$?
listing >"$R.after"
cmp -s "$R.before" "$R.after" && echo "the root is as it was" >&2
rm -f "$R.before" "$R.after"
exit $rc
"""


def size_kib(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*")) // 1024 + 1


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("room", ["half the driver", "the driver", "the driver and a bit"])
def test_a_full_file_system_fails_the_install_whole(tmp_path: Path, bundles: Bundles,
                                                    shell: str, room: str) -> None:
    """The node's root on a small tmpfs with little room left: the space check passes (the
    stand-in df says there is plenty), then a write fails midway: while the folder lands, or
    the journal, the units or the links after it."""
    node = with_driver(tmp_path / "start", bundles.old, shell)
    driver = size_kib(bundles.new / "payload") + size_kib(bundles.new / "node")
    left = {"half the driver": driver // 2, "the driver": driver + 16,
            "the driver and a bit": driver + 96}[room]
    script = FULL.replace("SIZE", str(size_kib(node.root) + 4 * driver + 1024)).replace(
        "ROOM", str(left))
    result = in_namespace(node, bundles.new, script, env={"FAKE_DF_AVAIL": "99999999"})
    assert result.code != 99, result.stderr
    lines = result.stderr.splitlines()
    if result.code == 0:  # it fit after all: then it is whole
        assert any(line.startswith("install_nvidia.sh: done:") for line in lines), lines
        return
    assert lines[-1] == "the root is as it was", result.stderr
    assert [line for line in lines[:-1] if not line.startswith("install_nvidia.sh: ")] == [], \
        result.stderr
    [error] = [line for line in lines if ": error:" in line]
    assert "No space left on device" in error, error


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("where", ["opt/bin", "ld.so.conf.d", "agent drop-in folder",
                                   "current is a folder"])
def test_something_in_the_way_fails_the_install_whole(tmp_path: Path, bundles: Bundles,
                                                      shell: str, where: str) -> None:
    node = with_driver(tmp_path, None if where == "current is a folder" else bundles.old,
                       shell)
    root = node.root
    if where == "opt/bin":
        shutil.rmtree(root / "opt/bin")
        (root / "opt/bin").write_text("not a folder\n")
    elif where == "ld.so.conf.d":
        shutil.rmtree(root / "etc/ld.so.conf.d")
        (root / "etc/ld.so.conf.d").write_text("not a folder\n")
    elif where == "agent drop-in folder":
        shutil.rmtree(root / "etc/systemd/system/dcos-mesos-slave.service.d")
        (root / "etc/systemd/system/dcos-mesos-slave.service.d").write_text("not a folder\n")
    else:
        (root / "opt/nvidia/current").mkdir(parents=True)
        (root / "opt/nvidia/current/notes.txt").write_text("an earlier tool's\n")
    before = snapshot(root)
    result = node.install(bundles.new)
    assert result.code == 1, result.stderr
    one_line_of_ours(result)
    assert snapshot(root) == before
    assert not leftovers(root)
    if where != "current is a folder":
        loads(node, bundle_name(bundles.old))


@pytest.mark.parametrize("tool", ["cmp", "head", "flock"])
def test_a_missing_tool_is_named_before_anything_changes(tmp_path: Path, bundles: Bundles,
                                                         tool: str) -> None:
    node = with_driver(tmp_path, bundles.old)
    before = snapshot(node.root)
    result = node.install(bundles.new, env={"PATH": node.path_without(tool)})
    assert result.code == 7, result.stderr
    assert f"the command {tool} is missing on this node" in one_line_of_ours(result)
    assert snapshot(node.root) == before


# --- the boot with a broken current ---------------------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("broken", ["dangling", "garbage", "a folder", "half removed"])
def test_a_broken_current_is_named_and_the_boot_falls_back_to_previous(
        tmp_path: Path, bundles: Bundles, shell: str, broken: str) -> None:
    node = with_driver(tmp_path, bundles.old, shell)
    assert node.install(bundles.new).code == 0
    old, new = bundle_name(bundles.old), bundle_name(bundles.new)
    current = node.root / "opt/nvidia/current"
    if broken == "dangling":
        shutil.rmtree(node.root / "opt/nvidia" / new)
        reason = f"/opt/nvidia/current points at {new}, which is not there"
    elif broken == "garbage":
        current.unlink()
        current.symlink_to("../../etc")
        reason = "/opt/nvidia/current points at ../../etc, not a driver folder of /opt/nvidia"
    elif broken == "a folder":
        current.unlink()
        current.mkdir()
        reason = "/opt/nvidia/current is not a link to a driver folder"
    else:
        (node.root / "opt/nvidia" / new / "startup.sh").unlink()
        reason = f"/opt/nvidia/current points at {new}, which lacks its startup.sh or node/lib.sh"
    if broken != "a folder":
        doctor = node.doctor()
        assert doctor.code == 3, doctor.stdout
        assert f"FAIL modules: {reason}\n" in doctor.stdout, doctor.stdout
        assert f"it falls back to the previous driver, {old}" in doctor.stdout, doctor.stdout
    result = node.startup()
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"startup.sh: warning: {reason}: pointing it at the previous driver, {old}, "
        "and starting that"), result.stderr
    assert os.readlink(current) == old
    assert node.calls("insmod")[0][1] == f"{node.root}/opt/nvidia/{old}/modules/{KERNEL}/nvidia.ko"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_broken_current_without_previous_fails_in_one_line(
        tmp_path: Path, bundles: Bundles, shell: str) -> None:
    node = with_driver(tmp_path, bundles.old, shell)
    name = bundle_name(bundles.old)
    shutil.rmtree(node.root / "opt/nvidia" / name)
    before = snapshot(node.root)
    result = node.startup()
    assert result.code == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"startup.sh: error: /opt/nvidia/current points at {name}, which is not there, and "
        "there is no whole previous driver to fall back to; extract a bundle and run its "
        "install_nvidia.sh"]
    assert snapshot(node.root) == before
    doctor = node.doctor()
    assert doctor.code == 3 and "and there is no whole previous driver" in doctor.stdout


def test_check_says_it_would_fall_back_and_changes_nothing(tmp_path: Path,
                                                           bundles: Bundles) -> None:
    node = with_driver(tmp_path, bundles.old)
    assert node.install(bundles.new).code == 0
    shutil.rmtree(node.root / "opt/nvidia" / bundle_name(bundles.new))
    before = snapshot(node.root)
    result = node.startup("--check")
    assert "would point it at the previous driver" in result.stderr.splitlines()[0]
    # ... then the previous driver's own --check says what it would load.
    assert f"would run: insmod {node.root}/opt/nvidia/{bundle_name(bundles.old)}/" in \
        result.stderr
    assert snapshot(node.root) == before and not node.calls("insmod")


# --- a bundle that is not for this node -----------------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_a_bundle_for_another_kernel_is_staged_not_made_current(
        tmp_path: Path, bundles: Bundles, shell: str) -> None:
    node = with_driver(tmp_path, bundles.old, shell)
    old, cloud = bundle_name(bundles.old), bundle_name(bundles.cloud)
    result = node.install(bundles.cloud)
    assert result.code == 0, result.stderr
    assert f"this node runs kernel {KERNEL}, and the bundle has modules only for {CLOUD}: " \
           "staging it" in result.stderr, result.stderr
    assert os.readlink(node.root / "opt/nvidia/current") == old
    assert (node.root / "opt/nvidia/staged").read_text() == f"{cloud} -\n"
    loads(node, old)
    # The boot into that kernel switches to it.
    for path in ("proc/modules", "sys/module/nvidia/version"):
        (node.root / path).unlink()
    (node.root / "proc/modules").write_text("")
    booted = node.startup(env={"FAKE_KERNEL": CLOUD})
    assert booted.code == 0, booted.stderr
    assert os.readlink(node.root / "opt/nvidia/current") == cloud


@pytest.mark.parametrize("shell", SHELLS)
def test_a_bundle_for_another_kernel_and_flavour_is_refused_unless_forced(
        tmp_path: Path, bundles: Bundles, shell: str) -> None:
    node = with_driver(tmp_path, bundles.old, shell)
    before = snapshot(node.root)
    result = node.install(bundles.cloud_open)
    assert result.code == 8, result.stderr
    assert "cannot be staged beside it; install a bundle built for kernel" in \
        one_line_of_ours(result)
    assert snapshot(node.root) == before
    forced = node.install(bundles.cloud_open, "--force")
    assert forced.code == 0, forced.stderr
    assert os.readlink(node.root / "opt/nvidia/current") == bundle_name(bundles.cloud_open)
    assert "the driver will not load until the node boots one of those" in forced.stderr


@pytest.mark.parametrize(("what", "env", "os_release", "message"), [
    ("machine", {"FAKE_MACHINE": "aarch64"}, None,
     "this bundle is for x86_64 machines, but this node is aarch64"),
    ("os", {}, 'NAME="Container Linux by CoreOS"\nID=coreos\n',
     "this bundle is for flatcar, but this node runs coreos; build one with --os coreos"),
])
def test_a_bundle_for_another_machine_or_os_is_refused(
        tmp_path: Path, bundles: Bundles, what: str, env: dict[str, str],
        os_release: str | None, message: str) -> None:
    node = with_driver(tmp_path, None)
    if os_release is not None:
        (node.root / "etc/os-release").write_text(os_release)
    before = snapshot(node.root)
    result = node.install(bundles.old, env=env)
    assert result.code == 8, result.stderr
    assert message in one_line_of_ours(result)
    assert snapshot(node.root) == before


def test_flatcar_is_flatcar(tmp_path: Path, bundles: Bundles) -> None:
    """Flatcar's os-release says ID=flatcar and ID_LIKE=coreos (shared/reference)."""
    node = with_driver(tmp_path, None)
    (node.root / "etc/os-release").write_text(
        'NAME="Flatcar Container Linux by Kinvolk"\nID=flatcar\nID_LIKE=coreos\n')
    assert node.install(bundles.old).code == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_a_fifo_where_a_setting_is_read_does_not_hang_the_boot(
        tmp_path: Path, bundles: Bundles, shell: str) -> None:
    """/etc/default/nvidia as a FIFO nobody writes (what a hung mount looks like): the boot
    and the doctor read it only as a regular file (for NVIDIA_REPOSITORY_URL; systemd reads
    the rest), so they do not block on it."""
    node = with_driver(tmp_path, bundles.new, shell)  # with a repository: the URL is looked up
    (node.root / "etc/default").mkdir(parents=True, exist_ok=True)
    os.mkfifo(node.root / "etc/default/nvidia")
    booted = node.startup()
    assert booted.code == 0, booted.stderr
    folder = f"{node.root}/opt/nvidia/{bundle_name(bundles.new)}/"
    assert node.calls("insmod")[0][1].startswith(folder)
    doctor = node.doctor()
    assert "FAIL repository" in doctor.stdout, doctor.stdout  # it answered (nothing listens)
