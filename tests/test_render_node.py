"""The acceptance test of `coreos-gpu render`: what a rendered Ignition config (or Terraform
block) does on a node gives the same node tree as the README's manual steps,

    tar xzf nvidia.tar.gz -C /tmp && sudo /tmp/install_nvidia.sh

The config is "unpacked" as Ignition does it (render_tools.ignite: the bundle downloaded
from an HTTP server on 127.0.0.1 and written only after its verification.hash matched,
every file with its mode, the unit enabled through Ignition's preset), then its unit's
ExecStart runs against a fake node tree (nodetree.Node) with the real install_nvidia.sh."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreos_gpu.keys import load_private_key, write_key_pair
from coreos_gpu.provision import DIR, UNIT
from coreos_gpu.publish import publish
from coreos_gpu.repository import load_trust
from coreos_gpu.stores import open_store

from .bundletools import CLOUD, VERSION
from .conftest import CliResult, Mirror
from .nodetree import Node, Result, make_bundle, snapshot
from .render_tools import HashMismatch, ignite, remote_exec_inline, unit_setting
from .test_node_install import STARTS, on_the_running_system

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
Cli = Callable[..., CliResult]
PRESET = "etc/systemd/system-preset/20-ignition.preset"
# What provisioning adds beside what the manual steps make.
EXTRAS = {"opt/coreos-gpu", "opt/coreos-gpu/provision.sh", "opt/coreos-gpu/provisioned",
          f"etc/systemd/system/{UNIT}", "etc/systemd/system-preset", PRESET}


@pytest.fixture(scope="module")
def extracted(bundle: Path) -> Path:
    """A real bundle extracted with tar, as the manual steps do; the archive beside it."""
    return bundle


def archive_of(extracted: Path) -> Path:
    return extracted.parent / "nvidia.tar.gz"


def a_node(folder: Path) -> Node:
    """A node as it boots: /opt and /etc/systemd/system are there on any real one."""
    node = Node(folder)
    for sub in ("opt", "etc/systemd/system"):
        (node.root / sub).mkdir(parents=True, exist_ok=True)
    return node


@pytest.fixture(scope="module")
def manual_tree(extracted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The README's manual steps: the extracted bundle's install_nvidia.sh."""
    node = a_node(tmp_path_factory.mktemp("manual"))
    result = node.install(extracted)
    assert result.code == 0, result.stderr
    return snapshot(node.root)


def boot(node: Node, env: dict[str, str] | None = None) -> Result:
    """The first boot: what the enabled unit's ExecStart runs (systemd would run it)."""
    unit = (node.root / "etc/systemd/system" / UNIT).read_text()
    assert f"enable {UNIT}" in (node.root / PRESET).read_text().splitlines()
    [exec_start] = unit_setting(unit, "ExecStart")
    return node.run(node.root / exec_start.lstrip("/"), "--root", str(node.root), env=env)


def same_tree(tree: dict[str, str], manual: dict[str, str], extras: set[str]) -> None:
    assert set(tree) - set(manual) == extras
    assert set(manual) - set(tree) == set()
    assert {k: v for k, v in tree.items() if k in manual} == manual


@pytest.mark.parametrize("flags", [(), ("--os", "flatcar", "--ignition-version", "2.2.0")],
                         ids=["spec 3.3.0", "spec 2.2.0"])
def test_an_ignition_config_gives_the_manual_steps_node(
        cli: Cli, http_dir: Mirror, tmp_path: Path, extracted: Path,
        manual_tree: dict[str, str], flags: tuple[str, ...]) -> None:
    archive = archive_of(extracted)
    shutil.copy(archive, http_dir.root / "nvidia.tar.gz")
    result = cli("render", "ignition", "--bundle", archive, "--bundle-url",
                 f"{http_dir.url}/nvidia.tar.gz", *flags)
    assert result.code == 0, result.stderr
    node = a_node(tmp_path / "node")
    ignite(json.loads(result.stdout), node.root)
    written = node.root / DIR.lstrip("/")
    assert (written / "nvidia.tar.gz").read_bytes() == archive.read_bytes()
    assert (written / "nvidia.tar.gz").stat().st_mode & 0o777 == 0o600
    assert written.stat().st_mode & 0o777 == 0o700
    # provision.sh passes install_nvidia.sh the bundle file's contents sha256 (of SHA256SUMS).
    contents = hashlib.sha256((extracted / "SHA256SUMS").read_bytes()).hexdigest()
    assert f"\nCONTENTS_SHA256={contents}\n" in (written / "provision.sh").read_text()
    # Flatcar's own nvidia.service is masked from the first boot on; the install writes ours
    # over the mask (same_tree below: the manual steps' unit file).
    assert os.readlink(node.root / "etc/systemd/system/nvidia.service") == "/dev/null"
    booted = boot(node)
    assert booted.code == 0, booted.stderr
    tree = snapshot(node.root)
    same_tree(tree, manual_tree, EXTRAS)
    sha = subprocess.run(["sha256sum", archive], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    assert (written / "provisioned").read_text() == f"{sha}\n"
    assert tree["opt/coreos-gpu/provision.sh"].startswith("file 700 ")
    # The download is gone once installed; a second boot does nothing.
    again = boot(node)
    assert again.code == 0 and "installed before" in again.stderr
    assert snapshot(node.root) == tree
    assert not node.calls("systemctl")


def test_ignition_refuses_a_bundle_that_is_not_the_one_rendered(
        cli: Cli, http_dir: Mirror, tmp_path: Path, extracted: Path) -> None:
    """The hash in the config is the file's: one byte more on the server and Ignition
    writes nothing."""
    archive = archive_of(extracted)
    result = cli("render", "ignition", "--bundle", archive, "--bundle-url",
                 f"{http_dir.url}/nvidia.tar.gz")
    (http_dir.root / "nvidia.tar.gz").write_bytes(archive.read_bytes() + b"\0")
    node = a_node(tmp_path / "node")
    before = snapshot(node.root)
    with pytest.raises(HashMismatch):
        ignite(json.loads(result.stdout), node.root)
    assert snapshot(node.root) == before


def ignited(cli: Cli, http_dir: Mirror, tmp_path: Path, extracted: Path) -> Node:
    """A node that Ignition gave the config render wrote for the served bundle, not booted."""
    archive = archive_of(extracted)
    shutil.copy(archive, http_dir.root / "nvidia.tar.gz")
    result = cli("render", "ignition", "--bundle", archive, "--bundle-url",
                 f"{http_dir.url}/nvidia.tar.gz")
    node = a_node(tmp_path / "node")
    ignite(json.loads(result.stdout), node.root)
    return node


def test_a_bundle_changed_on_disk_is_refused_before_it_is_read(
        cli: Cli, http_dir: Mirror, tmp_path: Path, extracted: Path) -> None:
    node = ignited(cli, http_dir, tmp_path, extracted)
    other = tmp_path / "other.tar.gz"
    subprocess.run(["tar", "czf", other, "-C", extracted, "install_nvidia.sh"], check=True)
    shutil.copy(other, node.root / "opt/coreos-gpu/nvidia.tar.gz")
    booted = boot(node)
    assert booted.code == 21, booted.stderr
    assert "does not match sha256" in booted.stderr
    assert not (node.root / "opt/nvidia").exists()
    assert not (node.root / "opt/coreos-gpu/provisioned").exists()  # tried again next boot


def test_provision_has_the_install_check_the_contents_it_copies(
        cli: Cli, http_dir: Mirror, tmp_path: Path, extracted: Path) -> None:
    """install_nvidia.sh gets --expect-sha256: contents other than the ones rendered (here,
    a provision.sh that expects others) are refused, and nothing is installed."""
    node = ignited(cli, http_dir, tmp_path, extracted)
    script = node.root / DIR.lstrip("/") / "provision.sh"
    contents = hashlib.sha256((extracted / "SHA256SUMS").read_bytes()).hexdigest()
    script.write_text(script.read_text().replace(f"\nCONTENTS_SHA256={contents}\n",
                                                 f"\nCONTENTS_SHA256={'0' * 64}\n"))
    booted = boot(node)
    assert booted.code == 4, booted.stderr
    assert f"its SHA256SUMS has sha256 {contents}, not {'0' * 64}" in booted.stderr
    assert not (node.root / "opt/nvidia").exists()
    assert not (node.root / "opt/coreos-gpu/provisioned").exists()  # tried again next boot


def test_the_first_boot_starts_the_watcher_and_the_retry_timer_in_that_boot(
        cli: Cli, http_dir: Mirror, tmp_path: Path) -> None:
    """The unit's ExecStart as systemd runs it, on the node (no --root): the install it runs
    starts the units it enables (a bundle built with a repository), after nvidia.service, so
    an OS update downloaded in the first boot is staged before its reboot."""
    (tmp_path / "ko").mkdir()
    keys = write_key_pair(tmp_path / "keys" / "repo.key")
    archive = archive_of(make_bundle(tmp_path / "b", tmp_path / "ko", repository=load_trust(
        "https://repository.example/gpu", str(keys.public))))
    shutil.copy(archive, http_dir.root / "nvidia.tar.gz")
    result = cli("render", "ignition", "--bundle", archive, "--bundle-url",
                 f"{http_dir.url}/nvidia.tar.gz")
    assert result.code == 0, result.stderr
    node = a_node(tmp_path / "node")
    ignite(json.loads(result.stdout), node.root)
    [exec_start] = unit_setting((node.root / "etc/systemd/system" / UNIT).read_text(),
                                "ExecStart")
    booted = on_the_running_system(node, Path(exec_start))
    assert booted.code == 0, booted.stderr
    assert (node.root / "opt/coreos-gpu/provisioned").exists()
    started = [c[1:] for c in node.calls("systemctl") if c[1] in ("start", "restart")]
    assert started == [["start", "nvidia.service"], *STARTS], started


# --- from a repository ---------------------------------------------------------------------

@dataclass(frozen=True)
class Repo:
    url: str
    root: Path  # the folder served at url
    pub: Path
    key: Path  # the private key that signs its index


PIN = ("--driver-version", VERSION)  # the test bundle's driver (the default is another)


@pytest.fixture
def repository(http_dir: Mirror, extracted: Path, tmp_path: Path) -> Repo:
    """The bundle published into a signed repository served on 127.0.0.1."""
    pair = write_key_pair(tmp_path / "keys" / "repo.key")
    publish([archive_of(extracted)], open_store(str(http_dir.root / "repo")),
            load_private_key(pair.private))
    return Repo(f"{http_dir.url}/repo", http_dir.root / "repo", pair.public, pair.private)


def provisioned_node(cli: Cli, repo: Repo, tmp_path: Path, *flags: str) -> Node:
    """A node that Ignition wrote a repository config onto, not booted yet."""
    result = cli("render", "ignition", "--repository", repo.url, "--repository-key", repo.pub,
                 *flags)
    assert result.code == 0, result.stderr
    node = a_node(tmp_path / "node")
    ignite(json.loads(result.stdout), node.root)
    return node


def test_a_repository_config_fetches_the_kernels_bundle_and_gives_the_same_node(
        cli: Cli, repository: Repo, tmp_path: Path, manual_tree: dict[str, str]) -> None:
    node = provisioned_node(cli, repository, tmp_path, *PIN)
    booted = boot(node)
    assert booted.code == 0, booted.stderr
    # The repository's index generation the node accepted (node/repository.sh, README
    # "Freshness"): the one file a repository adds beyond the manual steps' node.
    memory = {p for p in snapshot(node.root) if p.startswith("var/lib/coreos-gpu/generation.")}
    assert len(memory) == 1
    same_tree(snapshot(node.root), manual_tree,
              EXTRAS | {"opt/coreos-gpu/repository.pub", "var/lib/coreos-gpu", *memory})
    assert not [p for p in (node.root / "opt/coreos-gpu").iterdir()
                if p.name.startswith(("fetch.", "bundle."))]


def test_an_index_that_fails_its_signature_installs_nothing(
        cli: Cli, repository: Repo, tmp_path: Path) -> None:
    node = provisioned_node(cli, repository, tmp_path, *PIN)
    [index] = (repository.root / "index").glob("*.txt")
    with index.open("a") as f:
        f.write(index.read_text().splitlines()[-1].replace(" 535.261.03 ", " 999.1.1 ") + "\n")
    booted = boot(node)
    assert booted.code == 23, booted.stderr
    assert "does not match its signature" in booted.stderr
    assert not (node.root / "opt/nvidia").exists()


def test_no_bundle_for_the_nodes_kernel_installs_nothing(
        cli: Cli, repository: Repo, tmp_path: Path) -> None:
    node = provisioned_node(cli, repository, tmp_path, *PIN)
    booted = boot(node, env={"FAKE_KERNEL": CLOUD})
    assert booted.code == 24, booted.stderr
    assert (f"lists no flatcar bundle for kernel {CLOUD} of driver {VERSION}, proprietary "
            "modules, compute profile: build and publish one") in booted.stderr
    assert not (node.root / "opt/nvidia").exists()


def relist(repo: Repo, lines: list[str]) -> None:
    """Sign a new index whose bundle lines are these, in this order (its header kept): what a
    publisher's index may say. Only the signed lines decide what a node takes."""
    current = (repo.root / "index.current").read_text().split()[2]
    head = [line for line in (repo.root / f"index/{current}.txt").read_text().splitlines()
            if not line.startswith("bundle ")]
    text = ("\n".join([*head, *lines]) + "\n").encode()
    sha = hashlib.sha256(text).hexdigest()
    (repo.root / f"index/{sha}.txt").write_bytes(text)
    subprocess.run(["openssl", "dgst", "-sha256", "-sign", repo.key, "-out",
                    repo.root / f"index/{sha}.txt.sig", repo.root / f"index/{sha}.txt"],
                   check=True)
    (repo.root / "index.current").write_text(f"coreos-gpu-repository 1 {sha}\n")


def not_a_bundle(repo: Repo) -> tuple[str, str, str]:
    """Path, sha256 and size of a file the index may list, which no node can install."""
    data = b"not a bundle\n"
    sha = hashlib.sha256(data).hexdigest()
    path = f"bundles/{sha}/nvidia.tar.gz"
    (repo.root / path).parent.mkdir(parents=True)
    (repo.root / path).write_bytes(data)
    return path, sha, str(len(data))


OLDER, NEWER = "2025-06-01T12:00:00Z", "2025-06-02T12:00:00Z"
# What the index lists the test bundle as, and the bundles it lists beside it (each a file no
# node can install, published after it or before it: the order must not matter), with the
# settings render takes them from. Bundle line fields: 1 driver, 2 flavour, 3 profile.
PINNED = {
    "open by flag, proprietary published after": (
        (*PIN, "--kernel-module-type", "open"), "", {2: "open"}, [{2: "proprietary"}], NEWER),
    "open by flag, proprietary published before": (
        (*PIN, "--kernel-module-type", "open"), "", {2: "open"}, [{2: "proprietary"}], OLDER),
    "the driver's own flavour, open published after": (PIN, "", {}, [{2: "open"}], NEWER),
    "the config file's driver and flavour, another driver and flavour published after": (
        (), 'driver_version = "535.261.03"\nkernel_module_type = "open"\n', {2: "open"},
        [{1: "999.1.1", 2: "open"}, {2: "proprietary"}], NEWER),
}


@pytest.mark.parametrize(("flags", "config", "listed_as", "others", "when"),
                         list(PINNED.values()), ids=list(PINNED))
def test_a_node_takes_the_pinned_bundle_whatever_was_published_when(
        cli: Cli, repository: Repo, tmp_path: Path, flags: tuple[str, ...], config: str,
        listed_as: dict[int, str], others: list[dict[int, str]], when: str) -> None:
    """Bundles of other flavours and drivers for the same kernel, published after (or
    before) the one render pinned, never take its place: not the newest, not the last."""
    [index] = (repository.root / "index").glob("*.txt")
    [published] = [line.split(" ") for line in index.read_text().splitlines()
                   if line.startswith("bundle ")]
    junk = not_a_bundle(repository)
    ours = [*published[:10], OLDER if when == NEWER else NEWER]
    for field, value in listed_as.items():
        ours[field] = value
    theirs = []
    for changes in others:
        other = [*ours[:7], *junk, when]
        for field, value in changes.items():
            other[field] = value
        theirs.append(" ".join(other))
    relist(repository, [" ".join(ours), *theirs] if when == NEWER else [*theirs, " ".join(ours)])
    (tmp_path / "coreos-gpu.toml").write_text(config)  # where render runs (cli's cwd)
    node = provisioned_node(cli, repository, tmp_path, *flags)
    booted = boot(node)
    assert booted.code == 0, booted.stderr
    assert f"downloading {repository.url}/{ours[7]} " in booted.stderr
    assert (node.root / "opt/coreos-gpu/provisioned").read_text() == f"{ours[8]}\n"


# --- Terraform -------------------------------------------------------------------------------

SUDO = """#!/bin/sh
# Runs as is (the test runs as root), but the install acts on the fake node's tree.
case $1 in */install_nvidia.sh) exec "$@" --root "$FAKE_ROOT" ;; esac
exec "$@"
"""


@pytest.fixture
def var_tmp() -> Iterator[None]:
    before = set(Path("/var/tmp").glob("coreos-gpu.*"))
    yield
    for path in set(Path("/var/tmp").glob("coreos-gpu.*")) - before:
        shutil.rmtree(path)


def run_terraform_block(cli: Cli, node: Node, archive: Path, url: str,
                        tmp_path: Path) -> Result:
    """The block's inline commands, joined as Terraform's remote-exec joins them."""
    result = cli("render", "terraform", "--bundle", archive, "--bundle-url", url)
    assert result.code == 0, result.stderr
    script = tmp_path / "terraform_123.sh"
    script.write_text("\n".join(remote_exec_inline(result.stdout)) + "\n")
    (node.bin / "sudo").write_text(SUDO)
    (node.bin / "sudo").chmod(0o755)
    return node.run(script)


@pytest.mark.usefixtures("var_tmp")
def test_the_terraform_block_gives_the_manual_steps_node(
        cli: Cli, http_dir: Mirror, tmp_path: Path, extracted: Path,
        manual_tree: dict[str, str]) -> None:
    archive = archive_of(extracted)
    shutil.copy(archive, http_dir.root / "nvidia.tar.gz")
    node = a_node(tmp_path / "node")
    ran = run_terraform_block(cli, node, archive, f"{http_dir.url}/nvidia.tar.gz", tmp_path)
    assert ran.code == 0, ran.stderr
    assert snapshot(node.root) == manual_tree
    assert node.calls("systemctl")[-1] == ["systemctl", "is-enabled", "--quiet",
                                           "nvidia.service"]


@pytest.mark.usefixtures("var_tmp")
def test_the_terraform_block_checks_the_download_before_anything_runs(
        cli: Cli, http_dir: Mirror, tmp_path: Path, extracted: Path) -> None:
    archive = archive_of(extracted)
    (http_dir.root / "nvidia.tar.gz").write_bytes(archive.read_bytes()[:-1] + b"\1")
    node = a_node(tmp_path / "node")
    before = snapshot(node.root)
    ran = run_terraform_block(cli, node, archive, f"{http_dir.url}/nvidia.tar.gz", tmp_path)
    assert ran.code != 0
    assert "FAILED" in ran.stdout + ran.stderr  # sha256sum -c
    assert snapshot(node.root) == before
    assert not node.calls("systemctl")  # install_nvidia.sh never ran
    assert not [c for c in node.calls() if c[0] == "sudo" and "tar" in c]


# --- the unit under systemd's own check ---------------------------------------------------

@pytest.mark.parametrize("mode", ["bundle", "repository"])
def test_the_provision_unit_passes_systemd_analyze_verify(
        cli: Cli, tmp_path: Path, extracted: Path, mode: str) -> None:
    pub = write_key_pair(tmp_path / "k" / "repo.key").public
    source = (("--bundle", str(archive_of(extracted)), "--bundle-url",
               "https://gpu.example.com/nvidia.tar.gz") if mode == "bundle"
              else ("--repository", "https://gpu.example.com/repo", "--repository-key",
                    str(pub)))
    result = cli("render", "ignition", *source)
    node = a_node(tmp_path / "node")
    config = json.loads(result.stdout)
    config["storage"]["files"] = [f for f in config["storage"]["files"]
                                  if f["contents"]["source"].startswith("data:")]
    ignite(config, node.root)
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(node.root / "etc/systemd/system" / UNIT, units)
    (units / "dcos-mesos-slave.service").write_text(
        "[Unit]\nDescription=DC/OS agent stand-in\n[Service]\nExecStart=/bin/true\n")
    verified = subprocess.run(
        ["bwrap", "--dev-bind", "/", "/", "--bind", node.root / "opt", "/opt",
         "env", f"SYSTEMD_UNIT_PATH={units}:", "systemd-analyze", "verify",
         units / UNIT, units / "dcos-mesos-slave.service"],
        capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and not verified.stdout + verified.stderr, (
        verified.stdout + verified.stderr)
