"""install_nvidia.sh against a sysroot: layout, checks before changes, idempotence,
upgrades, locking and --uninstall. Runs the real script under bash, dash and busybox sh."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coreos_gpu.config import DriverFailurePolicy
from coreos_gpu.keys import write_key_pair
from coreos_gpu.repository import load_trust

from .bundletools import CLOUD, KERNEL, VERSION
from .nodetree import SHELLS, Node, NodeBundles, Result, make_bundle, reseal, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
AGENTS = ("dcos-mesos-slave.service", "dcos-mesos-slave-public.service")
TOOLS = ("nvidia-smi", "nvidia-modprobe", "nvidia-doctor", "nvidia-uninstall")


@pytest.fixture(scope="module")
def bundles(node_bundles: NodeBundles) -> dict[str, Path]:
    """Three bundles of one driver with three bundle ids, and a "wait" one."""
    make = node_bundles.make
    return {
        "a": make("a"),
        "b": make("b", tool_version="0.2.0", kernels=(KERNEL, CLOUD)),
        "c": make("c", tool_version="0.3.0"),
        "wait": make("wait", tool_version="0.4.0", policy=DriverFailurePolicy.WAIT,
                     agent_units=("my-agent.service",)),
    }


def bundle_id(bundle: Path) -> str:
    return hashlib.sha256((bundle / "SHA256SUMS").read_bytes()).hexdigest()[:12]


def with_unrelated_files(node: Node) -> None:
    """What a node has before: files the install must neither change nor remove."""
    for path, text in {"opt/bin/kubectl": "#!/bin/sh\n", "etc/ld.so.conf.d/libc.conf": "/x\n",
                       "etc/systemd/system/docker.service": "[Unit]\n",
                       "etc/systemd/system/dcos-mesos-slave.service.d/10-dcos.conf": "[Unit]\n"
                       }.items():
        (node.root / path).parent.mkdir(parents=True, exist_ok=True)
        (node.root / path).write_text(text)


def contents(bundle: Path) -> dict[str, tuple[int, str | None]]:
    """node/contents: {path in the driver folder: (mode, link target or None)}."""
    found = {}
    for line in (bundle / "node/contents").read_text().splitlines():
        mode, kind, path, *target = line.split(" ")
        found[path.removeprefix(f"payload/{VERSION}/")] = (
            int(mode, 8), target[0] if kind == "link" else None)
    return found


def check_installed(node: Node, bundle: Path) -> None:
    """The node carries this bundle, complete, root's, and everything points at it."""
    root = node.root
    name = f"{VERSION}-{bundle_id(bundle)}"
    assert os.readlink(root / "opt/nvidia/current") == name
    folder = root / "opt/nvidia" / name
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split("  ", 1)
        target = folder / path.removeprefix(f"payload/{VERSION}/")
        assert target.is_file() and not target.is_symlink(), path
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digest, path
    # Owner and modes from the bundle, whoever extracted it and with whatever umask.
    for path, (mode, link) in contents(bundle).items():
        st = (folder / path).lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
        if link is None:
            assert st.st_mode & 0o7777 == mode, path
        else:
            assert os.readlink(folder / path) == link, path
    for sub in [folder, *folder.rglob("*")]:
        st = sub.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), sub
        assert sub.is_symlink() or not st.st_mode & 0o022, sub
    # What the boot runs is not reached through current (a broken current cannot take it
    # along): files of their own, copies of the bundle's.
    for copy, original, mode in (
            ("opt/nvidia/startup.sh", "node/boot.sh", 0o755),
            ("opt/nvidia/nvidia-doctor", "node/nvidia-doctor", 0o755),
            ("etc/systemd/system/nvidia.service", "nvidia.service", 0o644)):
        assert not (root / copy).is_symlink(), copy
        assert (root / copy).read_bytes() == (folder / original).read_bytes(), copy
        assert (root / copy).stat().st_mode & 0o7777 == mode, copy
    assert (root / "etc/ld.so.conf.d/nvidia.conf").read_text().splitlines()[-1] == (
        "/opt/nvidia/current/lib64")
    env = (folder / "node/bundle.env").read_text()
    units = next(line for line in env.splitlines() if line.startswith("AGENT_UNITS="))
    for unit in units.split("=", 1)[1].strip("'").split():
        dropin = root / f"etc/systemd/system/{unit}.d/coreos-gpu.conf"
        assert not dropin.is_symlink(), dropin
        assert dropin.read_bytes() == (folder / "node/agent-dropin.conf").read_bytes(), dropin
    inside = {"nvidia-doctor": "/opt/nvidia/nvidia-doctor",
              "nvidia-uninstall": "/opt/nvidia/current/install_nvidia.sh"}
    for tool in TOOLS:
        assert os.readlink(root / "opt/bin" / tool) == inside.get(
            tool, f"/opt/nvidia/current/bin/{tool}")
    assert not list((root / "opt/nvidia").glob(".stage.*"))
    assert not list((root / "opt/nvidia").glob(".undo.*"))
    assert not [p for p in root.rglob("*.tmp.*")]


@pytest.mark.parametrize("shell", SHELLS)
def test_install_into_a_root(tmp_path: Path, bundles: dict[str, Path], shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    with_unrelated_files(node)
    result = node.install(bundles["a"])
    assert result.code == 0, result.stderr
    check_installed(node, bundles["a"])
    # ldconfig makes the soname links in the new folder before it goes live, then the cache.
    [links, cache] = node.calls("ldconfig")
    assert links[:2] == ["ldconfig", "-n"] and links[2].endswith("/lib64")
    assert "/opt/nvidia/.stage." in links[2]
    assert cache == ["ldconfig", "-r", str(node.root)]
    assert ["systemctl", f"--root={node.root}", "enable", "nvidia.service"] in node.calls()
    assert not [c for c in node.calls("systemctl") if "start" in c or "daemon-reload" in c]
    assert (node.root / "opt/bin/kubectl").read_text() == "#!/bin/sh\n"
    # The unit and the drop-in as the build rendered them.
    unit = (node.root / "opt/nvidia/current/nvidia.service").read_text()
    assert f"Before={' '.join(AGENTS)}\n" in unit
    assert "Type=oneshot\n" in unit and "RemainAfterExit=yes\n" in unit
    assert "ExecStart=/opt/nvidia/startup.sh\n" in unit
    dropin = (node.root / "opt/nvidia/current/node/agent-dropin.conf").read_text()
    assert "\nWants=nvidia.service\nAfter=nvidia.service\n" in dropin
    assert "EnvironmentFile=-/opt/nvidia/current/node/agent.env" in dropin
    assert (node.root / "opt/nvidia/current/node/agent.env").read_text().splitlines()[-1] == (
        "PATH=/opt/mesosphere/bin:/usr/bin:/bin:/sbin:/opt/nvidia/current/bin")


def test_no_enable(tmp_path: Path, bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    result = node.install(bundles["a"], "--no-enable")
    assert result.code == 0, result.stderr
    check_installed(node, bundles["a"])
    assert not node.calls("systemctl")


# --- on the running system: what starts now (never under --root) ---------------------------

@pytest.fixture(scope="module")
def with_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle built with a repository: it carries the stage watcher and the retry timer."""
    folder = tmp_path_factory.mktemp("install-repository")
    ko_dir = folder / "ko"
    ko_dir.mkdir()
    keys = write_key_pair(folder / "keys" / "repo.key")
    return make_bundle(folder / "r", ko_dir, repository=load_trust(
        "https://repository.example/gpu", str(keys.public)))


def on_the_running_system(node: Node, script: Path, *args: str,
                          env: dict[str, str] | None = None) -> Result:
    """script without --root, as on a node, in a mount namespace whose /opt, /etc, /sys and
    /run are the node's: systemctl (the stand-in) is asked to start things. No GPU on the
    node's PCI, so startup.sh loads nothing and succeeds."""
    (node.root / "opt").mkdir(exist_ok=True)
    # The host's tools behind /etc/alternatives (awk is one), which the node's /etc hides.
    if Path("/etc/alternatives").is_dir() and not (node.root / "etc/alternatives").exists():
        shutil.copytree("/etc/alternatives", node.root / "etc/alternatives", symlinks=True)
    binds = [arg for sub in ("opt", "etc", "sys", "run")
             for arg in ("--bind", str(node.root / sub), f"/{sub}")]
    return node.run(script, *args, env=env,
                    shell=["bwrap", "--dev-bind", "/", "/", *binds, *node.shell])


ENABLES = [["daemon-reload"], ["enable", "nvidia.service"], ["enable", "nvidia-retry.timer"],
           ["enable", "nvidia-stage.service"]]
# After nvidia.service: the retry timer, and the watcher restarted (the new current's fetch.sh).
STARTS = [["start", "--no-block", "nvidia-retry.timer"],
          ["restart", "--no-block", "nvidia-stage.service"]]


@pytest.mark.parametrize("shell", SHELLS)
def test_on_a_node_the_install_starts_the_watcher_and_the_retry_timer(
        tmp_path: Path, with_repository: Path, shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    result = on_the_running_system(node, with_repository / "install_nvidia.sh")
    assert result.code == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    assert [c[1:] for c in node.calls("systemctl")] == [
        *ENABLES, ["start", "nvidia.service"], *STARTS]
    # --uninstall stops them (a watcher left running would stage into the /opt/nvidia it
    # removes), then disables them; nvidia.service keeps running (the modules stay loaded).
    gone = on_the_running_system(node, node.root / "opt/nvidia/current/install_nvidia.sh",
                                 "--uninstall")
    assert gone.code == 0, gone.stderr
    calls = [c[1:] for c in node.calls("systemctl")]
    assert ["stop", "nvidia.service"] not in calls
    for unit in ("nvidia-retry.timer", "nvidia-retry.service", "nvidia-stage.service"):
        assert calls.index(["stop", unit]) < calls.index(["disable", unit]), calls


@pytest.mark.parametrize(("args", "fail", "code", "starts"), [
    ((), "nvidia-stage.service", 0, True),
    # The driver did not start: the retry timer is for that; the install's code says why.
    ((), "nvidia.service", 20, True),
    (("--no-start",), "", 0, False),
    (("--dry-run",), "", 0, False),
], ids=["a unit will not start", "nvidia.service will not start", "--no-start", "--dry-run"])
def test_on_a_node_what_starts_and_what_a_failure_to_start_says(
        tmp_path: Path, with_repository: Path, args: tuple[str, ...], fail: str, code: int,
        starts: bool) -> None:
    node = Node(tmp_path)
    result = on_the_running_system(node, with_repository / "install_nvidia.sh", *args,
                                   env={"FAKE_START_FAIL": fail})
    assert result.code == code, result.stderr
    started = [c[1:] for c in node.calls("systemctl") if c[1] in ("start", "restart")]
    assert started == ([["start", "nvidia.service"], *STARTS] if starts else []), started
    warnings = [line for line in result.stderr.splitlines() if ": warning: " in line]
    if fail == "nvidia-stage.service":
        assert warnings == [
            "install_nvidia.sh: warning: cannot start nvidia-stage.service (Failed to restart "
            "nvidia-stage.service: Unit nvidia-stage.service is masked.); it starts at the "
            "next boot, or now with: systemctl start nvidia-stage.service"]
        assert result.stderr.splitlines()[-1].startswith("install_nvidia.sh: done: ")
    elif fail:
        assert warnings == [] and result.errors == [
            f"install_nvidia.sh: error: installed driver {VERSION} and startup.sh loaded it, "
            "but systemctl start nvidia.service failed: journalctl -u nvidia.service"]
    if args == ("--dry-run",):
        assert not [c for c in node.calls() if c[0] == "systemctl"]
        assert ("would run: systemctl restart --no-block nvidia-stage.service"
                in result.stderr), result.stderr


def test_running_it_again_changes_nothing(tmp_path: Path, bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    assert node.install(bundles["a"]).code == 0
    before = snapshot(node.root)
    again = node.install(bundles["a"])
    assert again.code == 0, again.stderr
    assert "is installed already" in again.stderr
    assert snapshot(node.root) == before


def test_the_wait_policy_and_other_agent_units(tmp_path: Path,
                                               bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    assert node.install(bundles["a"]).code == 0
    assert node.install(bundles["wait"]).code == 0
    check_installed(node, bundles["wait"])
    dropin = (node.root / "opt/nvidia/current/node/agent-dropin.conf").read_text()
    assert "\nRequires=nvidia.service\n" in dropin and "Wants=" not in dropin
    # The drop-ins of the agent units this bundle does not name are gone.
    assert not (node.root / f"etc/systemd/system/{AGENTS[0]}.d/coreos-gpu.conf").exists()


def test_upgrade_keeps_one_previous_driver(tmp_path: Path, bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    names = {k: f"{VERSION}-{bundle_id(b)}" for k, b in bundles.items()}
    for key in ("a", "b", "c"):
        result = node.install(bundles[key])
        assert result.code == 0, result.stderr
        check_installed(node, bundles[key])
    kept = sorted(p.name for p in (node.root / "opt/nvidia").iterdir() if p.name[0].isdigit())
    assert kept == sorted([names["b"], names["c"]])
    assert f"/opt/nvidia/current is now {names['c']} (was {names['b']})" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_uninstall_removes_what_it_added_and_nothing_else(
        tmp_path: Path, bundles: dict[str, Path], shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    with_unrelated_files(node)
    before = snapshot(node.root)
    assert node.install(bundles["a"]).code == 0
    assert node.install(bundles["b"]).code == 0
    result = node.run(bundles["b"] / "install_nvidia.sh", "--root", str(node.root),
                      "--uninstall")
    assert result.code == 0, result.stderr
    assert snapshot(node.root) == before
    assert ["systemctl", f"--root={node.root}", "disable", "nvidia.service"] in node.calls()
    # Nothing installed: still fine.
    again = node.run(bundles["b"] / "install_nvidia.sh", "--root", str(node.root),
                     "--uninstall")
    assert again.code == 0, again.stderr
    assert snapshot(node.root) == before


def test_uninstall_keeps_an_earlier_tools_files(tmp_path: Path,
                                                bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    (node.root / "opt/nvidia/legacy").mkdir(parents=True)
    (node.root / "opt/nvidia/legacy/nvidia.ko").write_text("from an older script")
    assert node.install(bundles["a"]).code == 0
    assert node.run(bundles["a"] / "install_nvidia.sh", "--root", str(node.root),
                    "--uninstall").code == 0
    assert [p.name for p in (node.root / "opt/nvidia").iterdir()] == ["legacy"]


@pytest.mark.parametrize("shell", SHELLS)
def test_dry_run_changes_nothing(tmp_path: Path, bundles: dict[str, Path], shell: str) -> None:
    node = Node(tmp_path, shell=shell)
    before = snapshot(node.root)
    result = node.install(bundles["a"], "--dry-run")
    assert result.code == 0, result.stderr
    assert snapshot(node.root) == before
    assert f"would install driver {VERSION}" in result.stderr
    assert "would run: ln -s" in result.stderr and "would run: systemctl" in result.stderr
    assert not [c for c in node.calls() if c[0] in ("ldconfig", "systemctl")]


def without_openssl(folder: Path) -> str:
    """A PATH on which every command of /usr/bin is found but openssl."""
    folder.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "openssl":
            (folder / tool.name).symlink_to(tool)
    return f"{folder}:/usr/sbin"


@pytest.mark.parametrize("first", [False, True], ids=["upgrade", "first install"])
@pytest.mark.parametrize("checker", ["openssl", "sha256sum"])
@pytest.mark.parametrize(("damage", "words"), [
    ("flip", "the bundle in {b} is corrupt: payload/535.261.03/lib64/libcuda.so.535.261.03: "
             "FAILED (in its root-owned copy)"),
    ("extra", "is corrupt: payload/535.261.03/bin/extra: not part of the bundle"),
    ("missing", "is corrupt: payload/535.261.03/bin/nvidia-smi: missing"),
    ("link", "is corrupt: payload/535.261.03/bin/nvidia-smi: not a regular file"),
    ("wrong link", "is corrupt: payload/535.261.03/lib64/libcuda.so.1: links to "
                   "libnvidia-ml.so.1, not libcuda.so.535.261.03"),
])
def test_a_damaged_bundle_changes_nothing(tmp_path: Path, bundles: dict[str, Path],
                                          damage: str, words: str, checker: str,
                                          first: bool) -> None:
    bundle = tmp_path / "bundle"
    subprocess.run(["cp", "-a", bundles["a"], bundle], check=True)
    payload = bundle / f"payload/{VERSION}"
    if damage == "flip":
        lib = payload / f"lib64/libcuda.so.{VERSION}"
        data = bytearray(lib.read_bytes())
        data[10] ^= 1
        lib.write_bytes(bytes(data))
    elif damage == "extra":
        (payload / "bin/extra").write_text("#!/bin/sh\n")
    elif damage == "missing":
        (payload / "bin/nvidia-smi").unlink()
    elif damage == "link":  # a file swapped for a link to anything on the node
        (payload / "bin/nvidia-smi").unlink()
        (payload / "bin/nvidia-smi").symlink_to("/bin/true")
    else:
        (payload / "lib64/libcuda.so.1").unlink()
        (payload / "lib64/libcuda.so.1").symlink_to("libnvidia-ml.so.1")
    node = Node(tmp_path / "node")
    if not first:
        assert node.install(bundles["c"]).code == 0  # the driver in use
    before = snapshot(node.root)
    env = {} if checker == "openssl" else {
        "PATH": f"{node.bin}:{without_openssl(tmp_path / 'no-openssl')}"}
    result = node.install(bundle, env=env)
    assert result.code == 4, result.stderr
    [error] = result.errors
    assert words.format(b=bundle) in error
    assert snapshot(node.root) == before
    if not first:
        check_installed(node, bundles["c"])


def test_not_root(tmp_path: Path, bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    result = node.run(bundles["a"] / "install_nvidia.sh", env={"FAKE_UID": "1000"})
    assert result.code == 3
    assert result.errors == [f"install_nvidia.sh: error: run me as root (sudo "
                             f"{bundles['a']}/install_nvidia.sh)"]


def test_not_enough_space(tmp_path: Path, bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    before = snapshot(node.root)
    result = node.install(bundles["a"], env={"FAKE_DF_AVAIL": "100"})
    assert result.code == 5
    assert "not enough space for the driver in" in result.errors[0]
    assert "0 MiB free" in result.errors[0]
    assert snapshot(node.root) == before


def test_a_kernel_the_bundle_lacks_is_a_warning(tmp_path: Path,
                                                bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    result = node.install(bundles["a"], env={"FAKE_KERNEL": "6.6.0-1-amd64"})
    assert result.code == 0, result.stderr
    assert (f"warning: this node runs kernel 6.6.0-1-amd64, but the bundle has modules only "
            f"for {KERNEL}") in result.stderr


def test_bad_arguments(tmp_path: Path, bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    result = node.install(bundles["a"], "--now")
    assert result.code == 2
    assert result.errors == ["install_nvidia.sh: error: unknown argument --now"]
    missing = node.run(bundles["a"] / "install_nvidia.sh", "--root", str(tmp_path / "nope"))
    assert missing.code == 2
    assert "is not a folder" in missing.errors[0]


def test_concurrent_runs_take_turns(tmp_path: Path, bundles: dict[str, Path]) -> None:
    node = Node(tmp_path)
    assert node.install(bundles["a"]).code == 0
    lock = node.root / "opt/nvidia/.lock"
    # Someone holds the lock for a second: the install waits for it, then succeeds.
    holder = subprocess.Popen(["flock", lock, "sleep", "1"])
    time.sleep(0.2)
    started = time.monotonic()
    result = node.install(bundles["b"])
    holder.wait()
    assert result.code == 0, result.stderr
    assert time.monotonic() - started >= 0.7
    # Two installs at once (of different bundles): both finish, one after the other, and
    # the node ends complete with one of them.
    results = []

    def install(key: str) -> None:
        results.append(Node.run(node, bundles[key] / "install_nvidia.sh", "--root",
                                str(node.root)))

    threads = [threading.Thread(target=install, args=(k,)) for k in ("a", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.code for r in results] == [0, 0], [r.stderr for r in results]
    current = os.readlink(node.root / "opt/nvidia/current")
    check_installed(node, bundles["a"] if current.endswith(bundle_id(bundles["a"]))
                    else bundles["c"])


# --- the documented flow, and what the install trusts --------------------------------------
def extract_as_nobody(archive: Path, folder: Path, *, umask: str = "022") -> None:
    """`tar xzf nvidia.tar.gz -C /tmp` run by an unprivileged user (uid 65534)."""
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                    f'umask {umask} && tar xzf "$0" -C "$1"', archive, folder], check=True)


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """A folder an unprivileged user can reach (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="coreos-gpu-test-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def busy_tmp(tmp_path: Path, bundle: Path) -> tuple[Path, Path]:
    """A /tmp like the provisioning flow leaves it (tmp_path: a fresh user_tmp): world-
    writable and sticky, other files and folders in it, and the archive downloaded there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    (tmp / "terraform_123.sh").write_text("#!/bin/sh\necho provisioning\n")
    (tmp / "systemd-private-1a2b").mkdir()
    (tmp / "systemd-private-1a2b/tmp").mkdir()
    (tmp / ".X11-unix").mkdir()
    archive = tmp / "nvidia.tar.gz"
    subprocess.run(["cp", bundle.parent / "nvidia.tar.gz", archive], check=True)
    os.chown(archive, 65534, 65534)
    return tmp, archive


@pytest.mark.parametrize("shell", SHELLS)
def test_the_documented_flow(user_tmp: Path, bundles: dict[str, Path], shell: str) -> None:
    """wget -O /tmp/nvidia.tar.gz …; tar xfz /tmp/nvidia.tar.gz -C /tmp (a user, umask 077);
    sudo /tmp/install_nvidia.sh: installed, complete, and every installed file root's with the
    bundle's modes, though the extracted ones are the user's and unreadable to others."""
    tmp_path = user_tmp
    tmp, _ = busy_tmp(tmp_path, bundles["a"])
    extract_as_nobody(tmp / "nvidia.tar.gz", tmp, umask="077")
    assert (tmp / "startup.sh").stat().st_uid == 65534
    assert (tmp / "startup.sh").stat().st_mode & 0o777 == 0o700
    node = Node(tmp_path, shell=shell)
    result = node.install(tmp)
    assert result.code == 0, result.stderr
    check_installed(node, tmp)
    assert (tmp / "terraform_123.sh").is_file()  # what lay beside it is not ours


def test_a_file_swapped_after_extraction_is_refused(user_tmp: Path,
                                                    bundles: dict[str, Path]) -> None:
    tmp_path = user_tmp
    tmp, _ = busy_tmp(tmp_path, bundles["a"])
    extract_as_nobody(tmp / "nvidia.tar.gz", tmp)
    smi = tmp / f"payload/{VERSION}/bin/nvidia-smi"
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                    'printf "#!/bin/sh\\nid >/tmp/owned\\n" >"$0"', smi], check=True)
    node = Node(tmp_path / "node")
    before = snapshot(node.root)
    result = node.install(tmp)
    assert result.code == 4
    assert (f"is corrupt: payload/{VERSION}/bin/nvidia-smi: FAILED (in its root-owned copy)"
            in result.errors[0])
    assert snapshot(node.root) == before


def test_a_swap_while_it_copies_is_refused(user_tmp: Path, bundles: dict[str, Path]) -> None:
    """The sums are checked on the root-owned copy, not on the extracted files: a file the
    user changes between the first look and the copy is caught there."""
    tmp_path = user_tmp
    tmp, _ = busy_tmp(tmp_path, bundles["a"])
    extract_as_nobody(tmp / "nvidia.tar.gz", tmp)
    node = Node(tmp_path / "node")
    smi = tmp / f"payload/{VERSION}/bin/nvidia-smi"
    # The first cp of the install is the payload's: change a file of it just before.
    (node.bin / "cp").write_text(f"""#!/bin/sh
[ -e "{tmp_path}/swapped" ] || {{ echo swapped >"{tmp_path}/swapped"; echo '#!/bin/sh' >>"{smi}"; }}
exec /bin/cp "$@"
""")
    (node.bin / "cp").chmod(0o755)
    before = snapshot(node.root)
    result = node.install(tmp)
    assert (tmp_path / "swapped").exists()
    assert result.code == 4, result.stderr
    assert f"payload/{VERSION}/bin/nvidia-smi: FAILED (in its root-owned copy)" in result.stderr
    assert snapshot(node.root) == before


def test_nothing_from_the_extracted_folder_runs_before_it_is_checked(
        tmp_path: Path, bundles: dict[str, Path]) -> None:
    """node/lib.sh and node/bundle.env changed to run a command when sourced: the install
    refuses the bundle, and neither ran."""
    bundle = tmp_path / "bundle"
    subprocess.run(["cp", "-a", bundles["a"], bundle], check=True)
    marker = tmp_path / "sourced"
    for name in ("node/lib.sh", "node/bundle.env"):
        with (bundle / name).open("a") as f:
            f.write(f'touch "{marker}.{name.replace("/", "-")}"\n')
    script = (bundle / "install_nvidia.sh").read_text()
    # The build copied lib.sh in: the shipped script sources nothing.
    assert "# --- node/lib.sh, copied in by coreos-gpu ---" in script
    assert not [line for line in script.splitlines() if line.lstrip().startswith(". ")]
    node = Node(tmp_path / "node")
    result = node.install(bundle)
    assert result.code == 4, result.stderr
    assert "node/bundle.env: FAILED" in result.stderr or "node/lib.sh: FAILED" in result.stderr
    assert not list(tmp_path.glob("sourced.*"))


@pytest.mark.parametrize(("hostile", "words"), [
    ("absolute link", f"payload/{VERSION}/lib64/libevil.so: links to the absolute path "
                      "/etc/shadow"),
    ("escaping link", f"payload/{VERSION}/lib64/libevil.so: links to ../../../../etc/shadow, "
                      f"outside payload/{VERSION}/"),
    ("beneath a link", f"payload/{VERSION}/share/x/evil: lies beneath the link "
                       f"payload/{VERSION}/share/x"),
    ("group-writable", f"payload/{VERSION}/bin/nvidia-smi: mode 0775 is not a safe file mode"),
    ("outside the parts", "etc/passwd: not part of a coreos-gpu bundle"),
])
def test_a_hostile_bundle_changes_nothing(tmp_path: Path, bundles: dict[str, Path],
                                          hostile: str, words: str) -> None:
    """Bundles whose node/contents and SHA256SUMS agree with the changes (as an attacker
    would make them): links out of the bundle, files beneath a link, unsafe modes."""
    bundle = tmp_path / "bundle"
    subprocess.run(["cp", "-a", bundles["a"], bundle], check=True)
    payload = bundle / f"payload/{VERSION}"
    if hostile == "absolute link":
        (payload / "lib64/libevil.so").symlink_to("/etc/shadow")
    elif hostile == "escaping link":
        (payload / "lib64/libevil.so").symlink_to("../../../../etc/shadow")
    elif hostile == "beneath a link":
        (payload / "share").mkdir(exist_ok=True)
        (payload / "share/x").symlink_to("../lib64")
    elif hostile == "group-writable":
        (payload / "bin/nvidia-smi").chmod(0o775)
    reseal(bundle)
    if hostile == "beneath a link":  # as a tar member payload/…/share/x/evil would claim
        with (bundle / "node/contents").open("a") as f:
            f.write(f"0644 file payload/{VERSION}/share/x/evil\n")
    elif hostile == "outside the parts":
        with (bundle / "node/contents").open("a") as f:
            f.write("0644 file etc/passwd\n")
    node = Node(tmp_path / "node")
    before = snapshot(node.root)
    result = node.install(bundle)
    assert result.code == 4, result.stderr
    assert words in result.errors[0]
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
def test_uninstall_after_a_reboot(tmp_path: Path, bundles: dict[str, Path], shell: str) -> None:
    """/tmp is gone after a reboot: the installed copy of the script uninstalls, run as
    /opt/nvidia/current/install_nvidia.sh --uninstall or through a link named
    nvidia-uninstall (as /opt/bin/nvidia-uninstall is)."""
    node = Node(tmp_path, shell=shell)
    with_unrelated_files(node)
    before = snapshot(node.root)
    extracted = tmp_path / "extracted"
    subprocess.run(["cp", "-a", bundles["a"], extracted], check=True)
    assert node.install(extracted).code == 0
    subprocess.run(["rm", "-rf", extracted], check=True)
    installed = node.root / "opt/nvidia/current/install_nvidia.sh"
    refused = node.run(installed, "--root", str(node.root))
    assert refused.code == 2
    assert "is an installed driver, not an extracted bundle" in refused.errors[0]
    assert os.readlink(node.root / "opt/bin/nvidia-uninstall") == (
        "/opt/nvidia/current/install_nvidia.sh")
    (tmp_path / "bin2").mkdir()
    (tmp_path / "bin2/nvidia-uninstall").symlink_to(installed)
    result = node.run(tmp_path / "bin2/nvidia-uninstall", "--root", str(node.root))
    assert result.code == 0, result.stderr
    assert snapshot(node.root) == before


def test_a_run_waiting_on_uninstalls_lock_stays_serialised(tmp_path: Path,
                                                           bundles: dict[str, Path]) -> None:
    """--uninstall removes the lock file while holding it. An install that was waiting on
    it must not then run beside a third run that made a new lock file: it locks that one."""
    node = Node(tmp_path)
    assert node.install(bundles["a"]).code == 0
    gates = tmp_path / "gates"
    gates.mkdir()
    # systemctl --root … disable (uninstall) and ldconfig -n (the install's staging) wait
    # for a gate file each, so the test decides who is where.
    (node.bin / "systemctl").write_text(f"""#!/bin/sh
case " $* " in *" disable "*) while [ ! -e "{gates}/uninstall" ]; do sleep 0.05; done ;; esac
exit 0
""")
    (node.bin / "ldconfig").write_text(f"""#!/bin/sh
[ "$1" = -n ] || exit 0
echo "$$" >>"{gates}/in-ldconfig"
while [ ! -e "{gates}/install-$(wc -l <"{gates}/in-ldconfig")" ]; do sleep 0.05; done
""")
    uninstall = subprocess.Popen(["sh", bundles["a"] / "install_nvidia.sh", "--root",
                                  node.root, "--uninstall"], env=node.env,
                                 stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # uninstall holds the lock, in systemctl disable
    waiting = subprocess.Popen(["sh", bundles["b"] / "install_nvidia.sh", "--root",
                                node.root], env=node.env, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the install waits for the lock
    (gates / "uninstall").touch()
    assert uninstall.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while not (gates / "in-ldconfig").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The waiting install holds the (new) lock and stands in its staging; a third run now
    # must wait for it instead of running beside it.
    third = subprocess.Popen(["sh", bundles["c"] / "install_nvidia.sh", "--root", node.root],
                             env=node.env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert (gates / "in-ldconfig").read_text().count("\n") == 1, "the third run did not wait"
    (gates / "install-1").touch()
    assert waiting.wait(timeout=30) == 0, waiting.stderr.read() if waiting.stderr else ""
    (gates / "install-2").touch()
    assert third.wait(timeout=30) == 0, third.stderr.read() if third.stderr else ""
    check_installed(node, bundles["c"])
