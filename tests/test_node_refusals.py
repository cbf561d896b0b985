"""A node never ends worse than it began: inputs and node states that must be refused with
one line of ours (not the shell's), a distinct exit code, and the root as it was. Each runs
the real scripts under bash, dash and busybox sh against a sysroot (tests/nodetree.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from coreos_gpu.node import default_node_files, inline_sources

from .bundletools import CLOUD
from .nodetree import SHELLS, Node, NodeBundles, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")


@pytest.fixture(scope="module")
def bundles(node_bundles: NodeBundles) -> tuple[Path, Path]:
    """One driver with a repository (never reached): for KERNEL, and for CLOUD."""
    trust = node_bundles.trust
    return (node_bundles.make("a", repository=trust),
            node_bundles.make("b", kernels=(CLOUD,), repository=trust))


@pytest.fixture
def bundle(bundles: tuple[Path, Path]) -> Path:
    return bundles[0]


def installed(tmp_path: Path, bundle: Path, shell: str) -> Node:
    """A node with the bundle's driver installed and working."""
    node = Node(tmp_path, shell=shell)
    assert node.install(bundle).code == 0
    return node


def copy_of(bundle: Path, where: Path) -> Path:
    subprocess.run(["cp", "-a", bundle, where], check=True)
    return where


@pytest.mark.parametrize("shell", SHELLS)
def test_a_half_extracted_bundle_is_incomplete_never_an_installed_driver(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    """tar stopped midway (a truncated download): install_nvidia.sh and node/ are there,
    payload/ is not. The advice used to be --uninstall, which removes the working driver."""
    node = installed(tmp_path, bundle, shell)
    before = snapshot(node.root)
    half = copy_of(bundle, tmp_path / "half")
    subprocess.run(["rm", "-rf", half / "payload"], check=True)
    result = node.install(half)
    assert result.code == 4, result.stderr
    assert result.errors == [
        f"install_nvidia.sh: error: {half} is not a whole coreos-gpu bundle (no "
        "payload/<driver version>/); extract the whole archive"]
    assert "uninstall" not in result.stderr
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
def test_stage_reads_nothing_before_the_bundles_structure_is_checked(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    """A FIFO as node/bundle.env used to hang the root-run --stage forever."""
    node = installed(tmp_path, bundle, shell)
    before = snapshot(node.root)
    bad = copy_of(bundle, tmp_path / "bad")
    (bad / "node/bundle.env").unlink()
    os.mkfifo(bad / "node/bundle.env")
    result = node.install(bad, "--stage")  # Node.run gives up after 120 s
    assert result.code == 4, result.stderr
    assert result.errors == [
        f"install_nvidia.sh: error: the bundle in {bad} is corrupt: node/bundle.env: not a "
        "regular file; download and extract it again"]
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("script", ["install", "fetch", "startup"])
def test_a_lock_file_that_cannot_be_opened_is_one_line_of_ours(
        tmp_path: Path, bundles: tuple[Path, Path], shell: str, script: str) -> None:
    """`exec 9>>LOCK || die` cannot work in a POSIX shell: the failed redirection of a special
    builtin ends the script before `die` (dash exits 2, bash as sh and busybox 1), with only
    the shell's words. Something in the lock file's place (here a folder) is one way; a
    read-only /opt/nvidia is another."""
    bundle, cloud = bundles
    node = installed(tmp_path, bundle, shell)
    # The other kernel's folder staged beside it: a boot into that kernel switches to it.
    assert node.install(cloud, "--stage").code == 0
    lock = node.root / "opt/nvidia" / (".fetch.lock" if script == "fetch" else ".lock")
    lock.unlink(missing_ok=True)
    lock.mkdir()
    before = snapshot(node.root)
    if script == "install":
        result = node.install(bundle)
    elif script == "fetch":  # a fetch takes the fetch lock before anything else
        result = node.fetch("--kernel", CLOUD)
    else:  # a boot into the other kernel takes the install lock to switch `current`
        result = node.startup(env={"FAKE_KERNEL": CLOUD})
    assert result.errors == [
        f"{result.errors[0].split(':')[0]}: error: cannot open the lock file {lock} (a "
        "read-only file system, or something else in its place); make "
        f"{lock.parent} writable and run me again"], result.stderr
    assert result.code == 1
    assert [line for line in result.stderr.splitlines() if str(lock) in line
            and ": error: " not in line] == [], "the shell's own words"
    assert snapshot(node.root) == before


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("was", ["dangling", "outside", "garbage"])
def test_only_an_installed_folder_becomes_previous(
        tmp_path: Path, bundles: tuple[Path, Path], shell: str, was: str) -> None:
    """`previous` is the rollback: it used to become whatever `current` pointed at."""
    bundle, _ = bundles
    node = Node(tmp_path, shell=shell)
    opt = node.root / "opt/nvidia"
    opt.mkdir(parents=True)
    (tmp_path / "elsewhere/node").mkdir(parents=True)
    (tmp_path / "elsewhere/node/bundle.env").write_text("DRIVER_VERSION='1.0'\n")
    (opt / "current").symlink_to({"dangling": "535.0-gone", "garbage": "../../../etc",
                                  "outside": str(tmp_path / "elsewhere")}[was])
    result = node.install(bundle)
    assert result.code == 0, result.stderr
    assert not (opt / "previous").is_symlink()
    assert "/opt/nvidia/previous stays as it was" in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_startup_loads_only_from_a_driver_folder_of_opt_nvidia(
        tmp_path: Path, bundle: Path, shell: str) -> None:
    """A copy of an installed driver folder anywhere else, reached through a link or by
    hand, is not loaded from, and nothing of it is sourced."""
    node = installed(tmp_path, bundle, shell)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", (node.root / "opt/nvidia/current").resolve(), copy], check=True)
    (copy / "node/bundle.env").write_text(f"touch {tmp_path}/sourced\n")
    (tmp_path / "via").symlink_to(copy / "startup.sh")
    for script in (copy / "startup.sh", tmp_path / "via"):
        result = node.run(script, "--root", str(node.root), "--force-load")
        assert result.code == 3, result.stderr
        assert result.errors == [
            f"startup.sh: error: {copy} is not a driver folder of /opt/nvidia: startup.sh loads "
            "only an installed driver (install_nvidia.sh installs one; nvidia.service runs "
            "/opt/nvidia/startup.sh)"]
    assert node.calls("insmod") == []
    assert not (tmp_path / "sourced").exists()


VALUES = ["535.261.03", "dcos-mesos-slave.service dcos-mesos-slave-public.service", "",
          "https://repo.example/gpu?a=1&b=2", "it's", "'", "$(touch {canary})", "`touch {canary}`",
          "a\\b", "x;y|z", '"quoted"']


@pytest.mark.parametrize("shell", SHELLS)
def test_bundle_env_values_are_read_as_the_build_wrote_them_never_run(
        tmp_path: Path, shell: str) -> None:
    """node.render_bundle_env writes each value with shlex.quote; lib.sh's bundle_value must
    give back the same string, and run nothing (startup.sh used to source the file)."""
    import shlex

    canary = tmp_path / "canary"
    values = [v.format(canary=canary) for v in VALUES]
    env = tmp_path / "bundle.env"
    env.write_text("# Written by coreos-gpu\n" + "".join(
        f"K{n}={shlex.quote(v)}\n" for n, v in enumerate(values)))
    # lib.sh as a bundle carries it: its themes copied in by the build (node.py).
    lib = tmp_path / "lib.sh"
    lib.write_bytes(inline_sources((default_node_files() / "lib.sh").read_bytes(),
                                   default_node_files(), name="lib.sh"))
    script = f'. "{lib}"\n' + "".join(
        f'bundle_value K{n} "{env}"; echo "|"\n' for n in range(len(values)))
    out = subprocess.run([*shell.split(), "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.split("\n|\n")[:len(values)] == values
    assert not canary.exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_boot_and_doctor_never_source_bundle_env(tmp_path: Path, bundle: Path,
                                                 shell: str) -> None:
    node = installed(tmp_path, bundle, shell)
    env = node.root / "opt/nvidia/current/node/bundle.env"
    canary = tmp_path / "canary"
    env.write_text(env.read_text() + f"$(touch {canary})\nX=`touch {canary}`\n")
    node.add_gpu("0000:00:1e.0", 0)
    node.startup()
    node.doctor()
    assert not canary.exists()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("key", "value"), [
    ("AGENT_UNITS", "../../../../tmp/evil.service"),  # a drop-in outside --root
    ("AGENT_UNITS", "dcos-mesos-slave.service ;"),  # the real agents' drop-ins
    ("AGENT_UNITS", "*.service"),
    ("DRIVER_VERSION", "535.261.03 x"),  # never compared with payload/ again
    ("FLAVOUR", "nouveau"),
    ("ON_DRIVER_FAILURE", "sometimes"),
    ("REPOSITORY_URL", "ftp://repo.example/gpu"),
])
def test_every_bundle_env_value_is_checked_against_its_grammar(
        tmp_path: Path, bundle: Path, shell: str, key: str, value: str) -> None:
    """A bundle whose sums agree (resealed: what a hostile or hand-edited bundle does) but
    whose bundle.env holds a value the build side would never write is refused whole."""
    import shlex

    from .nodetree import reseal

    node = installed(tmp_path, bundle, shell)
    before = snapshot(node.root)
    bad = copy_of(bundle, tmp_path / "bad")
    env = bad / "node/bundle.env"
    env.write_text("".join(f"{key}={shlex.quote(value)}\n" if line.startswith(f"{key}=")
                           else line for line in env.read_text().splitlines(keepends=True)))
    # Another bundle id (the sha256 of SHA256SUMS), so it is not "installed already".
    (bad / "MANIFEST.json").write_text((bad / "MANIFEST.json").read_text() + " ")
    reseal(bad)
    result = node.install(bad)
    assert result.code == 4, result.stderr
    assert result.errors == [
        f"install_nvidia.sh: error: the bundle in {bad} is unsafe: node/bundle.env: "
        f"{key}={value} is not a valid value; rebuild it with coreos-gpu build"]
    assert snapshot(node.root) == before
    assert not (tmp_path / "tmp/evil.service.d").exists()
