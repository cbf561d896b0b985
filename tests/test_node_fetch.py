"""A node that follows its OS's updates: startup.sh fetching the bundle for a new kernel at
boot, fetch.sh --update staging the one for an update waiting for its reboot, the switch at
that boot and at a rollback, the retry, and what a node keeps. Against a real repository
(published by coreos-gpu's own publish, its index signed) served over HTTP on 127.0.0.1, or
read through file://; the node's side is the real scripts under bash, dash and busybox sh,
with curl, openssl and tar as a Flatcar node has them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from coreos_gpu.config import DriverFailurePolicy, KernelModuleType
from coreos_gpu.keys import load_private_key, write_key_pair
from coreos_gpu.publish import publish
from coreos_gpu.repository import load_trust
from coreos_gpu.stores import FolderStore

from .bundletools import CLOUD, CLOUD_RELEASE, KERNEL, RELEASE, VERSION
from .nodetree import SHELLS, UNREACHABLE, Node, NodeBundles, Result, make_bundle, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")
BUS = "0000:00:1e.0"


@dataclass(frozen=True)
class Made:
    a: Path  # extracted, KERNEL, with the repository key (its archive: a.parent/nvidia.tar.gz)
    b: Path  # the same driver for CLOUD
    a_later: Path  # KERNEL again, another tool version: another bundle id
    a_third: Path
    open_b: Path  # CLOUD, the open flavour
    key: Path  # the repository's private key
    other_key: Path  # a key no bundle trusts


def archive(bundle: Path) -> Path:
    return bundle.parent / "nvidia.tar.gz"


@pytest.fixture(scope="module")
def made(node_bundles: NodeBundles) -> Made:
    make, trust = node_bundles.make, node_bundles.trust  # at UNREACHABLE: never served
    return Made(
        a=make("a", repository=trust),
        b=make("b", kernels=(CLOUD,), repository=trust),
        a_later=make("a2", repository=trust, tool_version="0.2.0"),
        a_third=make("a3", repository=trust, tool_version="0.3.0"),
        open_b=make("ob", kernels=(CLOUD,), repository=trust, flavour=KernelModuleType.OPEN),
        key=node_bundles.keys.private,
        other_key=write_key_pair(node_bundles.folder / "other" / "repo.key").private)


def publish_to(repo: Path, key: Path, *bundles: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    publish([archive(b) for b in bundles], FolderStore(repo), load_private_key(key))


class Repository:
    """A folder repository served over HTTP on 127.0.0.1; paths under `stall` get no
    answer (the connection stays open), like a server that hangs; paths under `endless` get
    their file and then junk without end (no Content-Length), and `sent` counts the bytes
    that went out for them; paths under a key of `answer` get what its function sends (the
    hostile servers of test_node_hostile.py)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stall: set[str] = set()
        self.endless: set[str] = set()
        self.sent: dict[str, int] = {}
        self.requests: list[str] = []
        self.redirect: dict[str, str] = {}  # path -> Location of a 302 answer
        self.answer: dict[str, Callable[[SimpleHTTPRequestHandler], None]] = {}
        stall, endless, sent = self.stall, self.endless, self.sent
        requests, redirect, answer = self.requests, self.redirect, self.answer

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                requests.append(self.path)
                answer_with = next((f for p, f in answer.items() if self.path.startswith(p)),
                                   None)
                if answer_with is not None:
                    answer_with(self)
                    return
                if any(self.path.startswith(p) for p in stall):
                    time.sleep(30)
                    return
                if self.path in redirect:
                    self.send_response(302)
                    self.send_header("Location", redirect[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if any(self.path.startswith(p) for p in endless):
                    self.send_endless()
                    return
                super().do_GET()

            def send_endless(self) -> None:
                self.close_connection = True  # the end of the answer is the end of the stream
                self.send_response(200)
                self.end_headers()
                data = (root / self.path.lstrip("/")).read_bytes()
                junk = b"x" * 65536
                sent[self.path] = 0
                try:
                    self.wfile.write(data)
                    sent[self.path] += len(data)
                    while sent[self.path] < 4 << 30:  # stops only when the client does
                        self.wfile.write(junk)
                        sent[self.path] += len(junk)
                except OSError:
                    pass

        root.mkdir(parents=True, exist_ok=True)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    served = Repository(tmp_path / "repository")
    try:
        yield served
    finally:
        served.close()


def node_with(tmp_path: Path, bundle: Path, shell: str = "sh") -> Node:
    node = Node(tmp_path / "node", shell=shell)
    node.add_gpu(BUS, 0)
    (node.root / "etc/os-release").write_text(
        f"ID=flatcar\nVERSION={RELEASE.version}\nVERSION_ID={RELEASE.version}\n")
    installed = node.install(bundle)
    assert installed.code == 0, installed.stderr
    node.root.joinpath("proc/modules").write_text("drm 622592 0 - Live 0x0000000000000000\n")
    return node


def folders(node: Node) -> set[str]:
    return {p.name for p in (node.root / "opt/nvidia").iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")}


def link(node: Node, name: str) -> str:
    return os.readlink(node.root / "opt/nvidia" / name)


def name_of(bundle: Path) -> str:
    import hashlib
    return f"{VERSION}-{hashlib.sha256((bundle / 'SHA256SUMS').read_bytes()).hexdigest()[:12]}"


def one_error(result: Result, code: int) -> str:
    assert result.code == code, (result.code, result.stderr)
    assert len(result.errors) == 1, result.stderr
    return result.errors[0]


def without_locks(tree: dict[str, str]) -> dict[str, str]:
    """A tree without what a failed fetch may leave: the fetch lock file, and the memory of
    the index generation accepted (remembered once an index's signature is checked, even when
    the bundle then fails: as TUF keeps verified metadata; nothing of a driver)."""
    return {p: v for p, v in tree.items() if not p.endswith("/.fetch.lock")
            and not p.startswith("var/lib/coreos-gpu")}


# --- at boot: fetch the bundle for the running kernel -----------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_a_boot_into_a_new_kernel_fetches_its_bundle(tmp_path: Path, made: Made,
                                                       repo: Repository, shell: str) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    node = node_with(tmp_path, made.a, shell)
    booted = node.startup(env={"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": repo.url})
    assert booted.code == 0, booted.stderr
    assert link(node, "current") == name_of(made.b)
    assert link(node, "previous") == name_of(made.a)
    assert folders(node) == {name_of(made.a), name_of(made.b)}
    assert not (node.root / "opt/nvidia/staged").exists()  # in use now: no longer staged
    [insmod, *_] = node.calls("insmod")
    assert insmod[1] == f"{node.root}/opt/nvidia/{name_of(made.b)}/modules/{CLOUD}/nvidia.ko"
    assert f"fetching the driver for kernel {CLOUD}: {repo.url}/bundles/" in booted.stderr
    assert not list((node.root / "opt/nvidia").glob(".fetch.*[!k]")), "a fetch folder is left"
    # The fetched bundle went through install_nvidia.sh: root's, with the bundle's modes.
    installed = node.root / "opt/nvidia" / name_of(made.b)
    assert (installed / "bin/nvidia-smi").stat().st_mode & 0o777 == 0o755
    assert (installed / "install_nvidia.sh").is_file()


def test_the_bundle_s_own_file_url_and_etc_default_nvidia(tmp_path: Path, made: Made) -> None:
    """No environment: the URL comes from /etc/default/nvidia (a file:// repository)."""
    publish_to(tmp_path / "repository", made.key, made.a, made.b)
    node = node_with(tmp_path, made.a)
    (node.root / "etc/default").mkdir()
    (node.root / "etc/default/nvidia").write_text(
        f'NVIDIA_PERSISTENCE_MODE=0\nNVIDIA_REPOSITORY_URL="file://{tmp_path}/repository/"\n')
    booted = node.startup(env={"FAKE_KERNEL": CLOUD})
    assert booted.code == 0, booted.stderr
    assert link(node, "current") == name_of(made.b)


def test_none_turns_fetching_off(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    node = node_with(tmp_path, made.a)
    before = snapshot(node.root)
    booted = node.startup(env={"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": "none"})
    assert "kernel mismatch" in one_error(booted, 4)
    assert repo.requests == []
    assert snapshot(node.root) == before


def test_check_says_it_would_fetch(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    node = node_with(tmp_path, made.a)
    before = snapshot(node.root)
    checked = node.startup("--check", env={"FAKE_KERNEL": CLOUD,
                                           "NVIDIA_REPOSITORY_URL": repo.url})
    assert checked.code == 0, checked.stderr
    assert f"would fetch the driver for kernel {CLOUD} from {repo.url}" in checked.stderr
    assert repo.requests == [] and snapshot(node.root) == before


# --- when nothing matches: one line, its own code, nothing installed ---------------------------


def refused(tmp_path: Path, made: Made, url: str, code: int,
            env: dict[str, str] | None = None, shell: str = "sh") -> str:
    node = node_with(tmp_path, made.a, shell)
    before = snapshot(node.root)
    booted = node.startup(env={"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": url, **(env or {})})
    line = one_error(booted, code)
    assert without_locks(snapshot(node.root)) == before, "the node changed"
    assert node.calls("insmod") == []
    return line


def test_no_bundle_for_this_kernel(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a)
    line = refused(tmp_path, made, repo.url, 24)
    assert f"has no bundle for kernel {CLOUD}, driver {VERSION}, proprietary modules" in line


def test_no_bundle_of_this_flavour(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a, made.open_b)
    assert "has no bundle for kernel" in refused(tmp_path, made, repo.url, 24)


def test_an_index_signed_by_another_key(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.other_key, made.a, made.b)
    assert "does not match its signature by the key in" in refused(
        tmp_path, made, repo.url, 23)


def test_a_tampered_index(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    [text] = (repo.root / "index").glob("*.txt")
    text.write_text(text.read_text().replace(RELEASE.version, "9999.0.0"))
    assert "does not match its signature by the key in" in refused(
        tmp_path, made, repo.url, 23)


def test_not_a_repository(tmp_path: Path, made: Made, repo: Repository) -> None:
    (repo.root / "index.current").write_text("<html>a captive portal</html>\n")
    assert "is not a coreos-gpu repository" in refused(tmp_path, made, repo.url, 22)


def test_a_tampered_bundle(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    served = next(p for p in (repo.root / "bundles").glob("*/nvidia.tar.gz")
                  if p.read_bytes() == archive(made.b).read_bytes())
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, other bytes
    served.write_bytes(bytes(data))
    assert "does not match the sha256 and size the signed index gives" in refused(
        tmp_path, made, repo.url, 21)


def test_an_unreachable_repository(tmp_path: Path, made: Made) -> None:
    line = refused(tmp_path, made, UNREACHABLE, 22)
    assert f"cannot read {UNREACHABLE}/index.current" in line


def serve_signed(repo: Path, key: Path, kernel: str, data: bytes) -> None:
    """Make the repository's signed index list data (any bytes) as the bundle for kernel:
    what a key holder's mistake publishes. The node must still refuse to stage it."""
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    path = f"bundles/{sha}/nvidia.tar.gz"
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_bytes(data)
    old = (repo / "index.current").read_text().split()[2]
    lines = []
    for line in (repo / f"index/{old}.txt").read_text().splitlines():
        fields = line.split(" ")
        if fields[0] == "bundle" and fields[6] == kernel:
            fields[7:10] = [path, sha, str(len(data))]
        lines.append(" ".join(fields))
    text = ("\n".join(lines) + "\n").encode()
    text_sha = hashlib.sha256(text).hexdigest()
    (repo / f"index/{text_sha}.txt").write_bytes(text)
    subprocess.run(["openssl", "dgst", "-sha256", "-sign", key, "-out",
                    repo / f"index/{text_sha}.txt.sig", repo / f"index/{text_sha}.txt"],
                   check=True)
    (repo / "index.current").write_text(f"coreos-gpu-repository 1 {text_sha}\n")


def without_member(source: Path, name: str) -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(source) as old, tarfile.open(fileobj=out, mode="w:gz") as new:
        for member in old.getmembers():
            if member.name != name:
                new.addfile(member, old.extractfile(member) if member.isreg() else None)
    return out.getvalue()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("served", "says"), [
    # gzip's line names the problem; tar's last one ("Error is not recoverable") does not.
    ("truncated", "cannot extract "),
    ("no install_nvidia.sh", "has no executable install_nvidia.sh: it is not a coreos-gpu "
                             "bundle"),
    ("the other kernel's", f"has no modules for kernel {CLOUD}, which the signed index lists "
                           "it for"),
])
def test_a_signed_bundle_that_cannot_serve_is_not_staged(
        tmp_path: Path, made: Made, repo: Repository, shell: str, served: str,
        says: str) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    b = archive(made.b).read_bytes()
    data = {"truncated": b[:len(b) // 2],
            "no install_nvidia.sh": without_member(archive(made.b), "install_nvidia.sh"),
            "the other kernel's": archive(made.a).read_bytes()}[served]
    serve_signed(repo.root, made.key, CLOUD, data)
    node = node_with(tmp_path, made.a, shell)
    before = snapshot(node.root)
    result = node.fetch("--kernel", CLOUD, env={"NVIDIA_REPOSITORY_URL": repo.url})
    line = one_error(result, 25)
    assert says in line, line
    if served == "truncated":
        assert "unexpected end of file" in line and "not recoverable" not in line, line
    assert without_locks(snapshot(node.root)) == before
    assert "not found" not in result.stderr and "denied" not in result.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_a_redirected_index_is_followed(tmp_path: Path, made: Made, repo: Repository,
                                        shell: str) -> None:
    """S3 websites, CloudFront and http→https answer 302: curl without -L used to save the
    empty answer and call the repository "not a coreos-gpu repository" (wget followed)."""
    publish_to(repo.root, made.key, made.a, made.b)
    (repo.root / "moved").mkdir()
    shutil.copy(repo.root / "index.current", repo.root / "moved/index.current")
    repo.redirect["/index.current"] = f"{repo.url}/moved/index.current"
    node = node_with(tmp_path, made.a, shell)
    booted = node.startup(env={"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": repo.url})
    assert booted.code == 0, booted.stderr
    assert link(node, "current") == name_of(made.b)
    assert "/moved/index.current" in repo.requests


@pytest.mark.parametrize(("location", "says"), [
    ("/index.current", "Maximum (3) redirects followed"),  # a loop: bounded
    ("file:///etc/os-release", "not supported"),  # to another scheme than http(s)
])
def test_a_redirect_that_is_not_followed(tmp_path: Path, made: Made, repo: Repository,
                                         location: str, says: str) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    repo.redirect["/index.current"] = location if "://" in location else repo.url + location
    line = refused(tmp_path, made, repo.url, 22)
    assert f"cannot read {repo.url}/index.current: " in line
    assert says in line, line


@pytest.mark.parametrize("stalled", ["/index.current", "/bundles/"])
def test_a_server_that_stalls(tmp_path: Path, made: Made, repo: Repository,
                              stalled: str) -> None:
    """The timeout holds, for the index and for the bundle."""
    publish_to(repo.root, made.key, made.a, made.b)
    repo.stall.add(stalled)
    started = time.monotonic()
    line = refused(tmp_path, made, repo.url, 22, {"NVIDIA_FETCH_TIMEOUT": "3"})
    took = time.monotonic() - started
    assert "no answer within 3 s" in line
    assert took < 20, took


@pytest.mark.parametrize(("shell", "client"), [
    ("bash", "curl"), ("dash", "curl"), ("busybox sh", "curl"), ("dash", "wget")])
@pytest.mark.parametrize(("endless", "code", "says"), [
    ("/index.current", 22, "the answer is larger than 1024 bytes"),
    ("/index/", 22, "the answer is larger than 16777216 bytes"),
    ("/bundles/", 21, "is larger than the"),
])
def test_a_server_that_sends_without_end_is_cut_off(
        tmp_path: Path, made: Made, repo: Repository, shell: str, client: str, endless: str,
        code: int, says: str) -> None:
    """An index, or a bundle, followed by junk without end (a hostile mirror): the node stops
    reading a byte past what it may take (a fixed size for the index files, the signed size
    for a bundle), with either client, instead of filling its disk."""
    publish_to(repo.root, made.key, made.a, made.b)
    repo.endless.add(endless)
    node = node_with(tmp_path, made.a, shell)
    before = snapshot(node.root)
    env = {"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": repo.url, "NVIDIA_FETCH_TIMEOUT": "60"}
    if client == "wget":
        env["PATH"] = node.path_without("curl")
    started = time.monotonic()
    booted = node.startup(env=env)
    line = one_error(booted, code)
    assert says in line, line
    assert time.monotonic() - started < 60
    assert without_locks(snapshot(node.root)) == before
    [(path, sent)] = [(p, n) for p, n in repo.sent.items() if p.startswith(endless)]
    limit = {"/index.current": 1024, "/index/": 16 << 20}.get(endless) or (
        repo.root / path.lstrip("/")).stat().st_size
    # What was sent beyond the limit is what the sockets and pipes held when the node
    # stopped reading (a few MiB on loopback), not the 4 GiB on offer.
    assert sent < limit + (32 << 20), (sent, limit)


def test_a_file_repository_that_hangs(tmp_path: Path, made: Made) -> None:
    """file:// on a hung NFS mount (here: index.current is a FIFO nobody writes) is bounded
    like a download; a FIFO used to block past any NVIDIA_FETCH_TIMEOUT."""
    folder = tmp_path / "nfs"
    folder.mkdir()
    os.mkfifo(folder / "index.current")
    started = time.monotonic()
    line = refused(tmp_path, made, f"file://{folder}", 22, {"NVIDIA_FETCH_TIMEOUT": "10"})
    assert f"cannot read file://{folder}/index.current: no answer within 10 s" in line
    assert time.monotonic() - started < 40


def test_every_oneshot_unit_has_a_start_timeout() -> None:
    """A oneshot that hangs holds its locks forever; the defaults (90 s) would also cut a
    legitimate fetch short, so each says its own bound."""
    templates = Path(__file__).resolve().parent.parent / "src/coreos_gpu/resources/templates"
    units = sorted(templates.rglob("*.service"))
    assert units
    for unit in units:
        text = unit.read_text()
        if "Type=oneshot" in text:
            assert "\nTimeoutStartSec=" in text, unit.name


def test_a_bad_timeout_setting(tmp_path: Path, made: Made, repo: Repository) -> None:
    node = node_with(tmp_path, made.a)
    result = node.fetch("--kernel", CLOUD, env={"NVIDIA_REPOSITORY_URL": repo.url,
                                                "NVIDIA_FETCH_TIMEOUT": "soon"})
    assert "NVIDIA_FETCH_TIMEOUT=soon is not a number of seconds" in one_error(result, 2)


def test_no_repository_in_the_bundle(tmp_path: Path, made: Made) -> None:
    plain = make_bundle(tmp_path / "plain", tmp_path / "ko")
    node = node_with(tmp_path, plain)
    assert not (node.root / "opt/nvidia/current/node/repository.pub").exists()
    assert "was built without --repository" in one_error(node.fetch("--kernel", CLOUD), 3)
    # Not even a URL from /etc/default/nvidia makes it fetch: it has no key to trust.
    booted = node.startup(env={"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": UNREACHABLE})
    assert "kernel mismatch" in one_error(booted, 4)


# --- before the reboot: stage the update's bundle --------------------------------------------


NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"


@pytest.mark.parametrize("shell", SHELLS)
def test_staged_before_the_reboot_then_used_without_network(
        tmp_path: Path, made: Made, repo: Repository, shell: str) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    node = node_with(tmp_path, made.a, shell)
    node.add_update_engine(NEED_REBOOT, CLOUD_RELEASE.version)
    staged = node.fetch("--update", env={"NVIDIA_REPOSITORY_URL": repo.url})
    assert staged.code == 0, staged.stderr
    assert link(node, "current") == name_of(made.a)  # not switched
    assert folders(node) == {name_of(made.a), name_of(made.b)}
    assert (node.root / "opt/nvidia/staged").read_text() == (
        f"{name_of(made.b)} {CLOUD_RELEASE.version}\n")
    assert node.calls("insmod") == [] and node.calls("systemctl") == []
    # Again: nothing to do, not even the network.
    again = node.fetch("--update", env={"NVIDIA_REPOSITORY_URL": UNREACHABLE})
    assert again.code == 0 and "is staged already" in again.stderr, again.stderr

    # The reboot into the update: the staged folder, no network.
    booted = node.startup(env={"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": UNREACHABLE})
    assert booted.code == 0, booted.stderr
    assert "fetching" not in booted.stderr
    assert (link(node, "current"), link(node, "previous")) == (name_of(made.b), name_of(made.a))
    assert not (node.root / "opt/nvidia/staged").exists()

    # Flatcar falls back to the previous USR partition: its kernel's folder is still there.
    node.root.joinpath("proc/modules").write_text("")
    back = node.startup(env={"FAKE_KERNEL": KERNEL, "NVIDIA_REPOSITORY_URL": UNREACHABLE})
    assert back.code == 0, back.stderr
    assert (link(node, "current"), link(node, "previous")) == (name_of(made.a), name_of(made.b))
    assert folders(node) == {name_of(made.a), name_of(made.b)}


@pytest.mark.parametrize(("op", "version", "says"), [
    ("UPDATE_STATUS_IDLE", "0.0.0", "no OS update is waiting for a reboot"),
    ("UPDATE_STATUS_DOWNLOADING", CLOUD_RELEASE.version, "no OS update is waiting"),
    (NEED_REBOOT, RELEASE.version, f"OS release {RELEASE.version} is running already"),
])
def test_nothing_to_stage(tmp_path: Path, made: Made, op: str, version: str,
                          says: str) -> None:
    node = node_with(tmp_path, made.a)
    node.add_update_engine(op, version)
    before = snapshot(node.root)
    result = node.fetch("--update", env={"NVIDIA_REPOSITORY_URL": UNREACHABLE})
    assert result.code == 0 and says in result.stderr, result.stderr
    assert snapshot(node.root) == before


def test_no_bundle_yet_for_the_update(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a)
    node = node_with(tmp_path, made.a)
    node.add_update_engine(NEED_REBOOT, CLOUD_RELEASE.version)
    result = node.fetch("--update", env={"NVIDIA_REPOSITORY_URL": repo.url})
    assert f"has no bundle for OS release {CLOUD_RELEASE.version}" in one_error(result, 24)
    assert folders(node) == {name_of(made.a)}


def test_the_watcher_stages_when_update_engine_signals(tmp_path: Path, made: Made,
                                                       repo: Repository) -> None:
    """fetch.sh --watch (nvidia-stage.service): idle when it starts, then update-engine's
    status signal for the finished download, and the bundle is staged without a poll."""
    publish_to(repo.root, made.key, made.a, made.b)
    node = node_with(tmp_path, made.a)
    node.add_update_engine()  # idle
    idle = (node.root / ".update-engine-status").read_text()
    node.add_update_engine(NEED_REBOOT, CLOUD_RELEASE.version)
    waiting = (node.root / ".update-engine-status").read_text()
    signals = node.root / ".update-engine-signals"
    signal_lines = signals.read_text()
    signals.unlink()
    (node.root / ".update-engine-status").write_text(idle)
    watcher = subprocess.Popen(
        ["sh", node.root / "opt/nvidia/current/node/fetch.sh", "--root", node.root, "--watch"],
        env={**node.env, "NVIDIA_REPOSITORY_URL": repo.url}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(c[1:] == ["-watch_for_updates"] for c in node.calls("update_engine_client")):
            assert time.monotonic() < deadline and watcher.poll() is None
            time.sleep(0.1)
        assert folders(node) == {name_of(made.a)}  # idle: nothing staged
        # The download finished: update-engine's new state, then its signal.
        (node.root / ".update-engine-status").write_text(waiting)
        signals.write_text(signal_lines)
        while not (node.root / "opt/nvidia/staged").exists():
            assert time.monotonic() < deadline and watcher.poll() is None
            time.sleep(0.1)
        assert folders(node) == {name_of(made.a), name_of(made.b)}
        assert link(node, "current") == name_of(made.a)
    finally:
        os.killpg(watcher.pid, signal.SIGKILL)
        watcher.wait()


# --- what a node keeps ------------------------------------------------------------------------


def test_a_node_keeps_what_it_may_boot(tmp_path: Path, made: Made, repo: Repository) -> None:
    """The running kernel's folder, the previous release's and the staged update's; older
    ones go, at an install and at the boot that switches."""
    publish_to(repo.root, made.key, made.b)
    node = node_with(tmp_path, made.a)
    assert node.install(made.a_later).code == 0
    node.add_update_engine(NEED_REBOOT, CLOUD_RELEASE.version)
    assert node.fetch("--update", env={"NVIDIA_REPOSITORY_URL": repo.url}).code == 0
    a, a2, a3, b = (name_of(x) for x in (made.a, made.a_later, made.a_third, made.b))
    assert folders(node) == {a, a2, b}
    installed = node.install(made.a_third)
    assert installed.code == 0, installed.stderr
    assert folders(node) == {a2, a3, b}  # a: neither running, previous nor staged
    assert f"removed /opt/nvidia/{a}" in installed.stderr
    assert (node.root / "opt/nvidia/staged").read_text() == f"{b} {CLOUD_RELEASE.version}\n"
    booted = node.startup(env={"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": UNREACHABLE})
    assert booted.code == 0, booted.stderr
    assert folders(node) == {a3, b}  # the new previous, and the running one
    assert (link(node, "current"), link(node, "previous")) == (b, a3)
    assert not (node.root / "opt/nvidia/staged").exists()


def test_another_release_on_a_kernel_already_installed(tmp_path: Path, made: Made,
                                                       repo: Repository) -> None:
    """An update whose kernel is one the node has: nothing to download. The index names
    the kernel of each release; the installed folders say which kernels they have."""
    from .repotools import OTHER_RELEASE  # 3975.2.3, RELEASE's kernel

    both = make_bundle(tmp_path / "both", tmp_path / "ko", releases=(RELEASE, OTHER_RELEASE),
                       repository=load_trust(UNREACHABLE, str(made.key) + ".pub"))
    publish_to(repo.root, made.key, both)
    node = node_with(tmp_path, made.a)
    node.add_update_engine(NEED_REBOOT, OTHER_RELEASE.version)
    result = node.fetch("--update", env={"NVIDIA_REPOSITORY_URL": repo.url})
    assert result.code == 0, result.stderr
    assert f"for kernel {KERNEL} (OS release {OTHER_RELEASE.version}) is installed already" in (
        result.stderr)
    assert not any(p.startswith("/bundles/") for p in repo.requests)
    assert folders(node) == {name_of(made.a)} and not (node.root / "opt/nvidia/staged").exists()


# --- install_nvidia.sh --stage -----------------------------------------------------------------


def test_stage_by_hand(tmp_path: Path, made: Made) -> None:
    node = node_with(tmp_path, made.a)
    staged = node.install(made.b, "--stage", "--release", CLOUD_RELEASE.version)
    assert staged.code == 0, staged.stderr
    assert link(node, "current") == name_of(made.a)
    assert (node.root / "opt/nvidia/staged").read_text() == (
        f"{name_of(made.b)} {CLOUD_RELEASE.version}\n")
    assert node.calls("systemctl") == [] and node.calls("insmod") == []
    # The current one: nothing to stage.
    again = node.install(made.a, "--stage")
    assert again.code == 0 and "is the current one already" in again.stderr, again.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--release", "4081.2.0"], "--release names the OS release a --stage is for"),
    (["--stage", "--uninstall"], "--stage and --uninstall do not go together"),
    (["--stage", "--release", "4081 2"], "is not an OS release"),
])
def test_stage_command_line(tmp_path: Path, made: Made, args: list[str], says: str) -> None:
    node = node_with(tmp_path, made.a)
    before = snapshot(node.root)
    assert says in one_error(node.install(made.b, *args), 2)
    assert snapshot(node.root) == before


def test_stage_needs_an_installed_driver_of_the_same_kind(tmp_path: Path, made: Made) -> None:
    empty = Node(tmp_path / "empty")
    assert "none is installed" in one_error(empty.install(made.b, "--stage"), 2)
    assert not (empty.root / "opt").exists()
    node = node_with(tmp_path, made.a)
    before = snapshot(node.root)
    line = one_error(node.install(made.open_b, "--stage"), 2)
    assert "FLAVOUR is open, the installed driver's proprietary" in line
    assert snapshot(node.root) == before


# --- the units -------------------------------------------------------------------------------


def test_a_repository_bundle_brings_its_units_and_takes_them_away(tmp_path: Path,
                                                                   made: Made) -> None:
    node = Node(tmp_path / "node")
    before = snapshot(node.root)
    assert node.install(made.a).code == 0
    units = node.root / "etc/systemd/system"
    for unit in ("nvidia-retry.timer", "nvidia-retry.service", "nvidia-stage.service"):
        assert os.readlink(units / unit) == f"/opt/nvidia/current/node/{unit}"
    enabled = [c[2:] for c in node.calls("systemctl") if "enable" in c]
    assert enabled == [["enable", "nvidia.service"], ["enable", "nvidia-retry.timer"],
                       ["enable", "nvidia-stage.service"]]
    service = (node.root / "opt/nvidia/current/nvidia.service").read_text()
    assert "Wants=network-online.target\nAfter=network-online.target\n" in service
    # A bundle without a repository: its units go.
    plain = make_bundle(tmp_path / "plain", tmp_path / "ko")
    assert node.install(plain).code == 0
    assert not any((units / u).is_symlink() for u in ("nvidia-retry.timer",
                                                      "nvidia-stage.service"))
    assert "network-online" not in (node.root / "opt/nvidia/current/nvidia.service").read_text()
    # And --uninstall leaves the node as it was, staged folders, fetch lock and all.
    assert node.install(made.a).code == 0
    assert node.install(made.b, "--stage").code == 0
    (node.root / "opt/nvidia/.fetch.lock").write_text("")
    assert node.install(made.a, "--uninstall").code == 0
    assert snapshot(node.root) == before


# --- the retry timer -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(DriverFailurePolicy))
def test_retry_starts_the_driver_and_then_the_agent(tmp_path: Path, policy: DriverFailurePolicy,
                                                    made: Made) -> None:
    keys = write_key_pair(tmp_path / "k" / "repo.key")
    bundle = make_bundle(tmp_path / "b", tmp_path / "ko", policy=policy,
                         repository=load_trust(UNREACHABLE, str(keys.public)))
    node = node_with(tmp_path, bundle)
    env = {"FAKE_INACTIVE": "nvidia.service", "NVIDIA_REPOSITORY_URL": UNREACHABLE}
    result = node.fetch("--retry", env=env)
    assert result.code == 0, result.stderr
    calls = [c[1:] for c in node.calls("systemctl") if c[1] != "show"]  # how it failed: asked
    assert calls[:2] == [["is-active", "-q", "nvidia.service"], ["start", "nvidia.service"]]
    agents = ["start", "--no-block", "dcos-mesos-slave.service",
              "dcos-mesos-slave-public.service"]
    assert (agents in calls) == (policy is DriverFailurePolicy.WAIT), calls
    # Active: nothing to do.
    assert node.fetch("--retry", env={"NVIDIA_REPOSITORY_URL": UNREACHABLE}).code == 0
    assert [c[1:] for c in node.calls("systemctl")] == [["is-active", "-q", "nvidia.service"]]


def test_retry_backs_off(tmp_path: Path, made: Made) -> None:
    node = node_with(tmp_path, made.a)
    env = {"FAKE_INACTIVE": "nvidia.service", "FAKE_SYSTEMCTL_RC": "1",
           "NVIDIA_REPOSITORY_URL": UNREACHABLE}
    state = node.root / "run/coreos-gpu/retry"
    delays = []
    for _ in range(6):
        now = int(time.time())
        failed = node.fetch("--retry", env=env)
        assert failed.code == 1, failed.stderr
        assert "No such file" not in failed.stderr and "can't open" not in failed.stderr
        failures, after = map(int, state.read_text().split())
        delays.append(after - now)
        # Not yet: no attempt.
        waiting = node.fetch("--retry", env=env)
        assert "next attempt in" in waiting.stderr
        assert ["start", "nvidia.service"] not in [c[1:] for c in node.calls("systemctl")]
        state.write_text(f"{failures} 0\n")  # the time has come
    assert [round(d / 60) for d in delays] == [2, 4, 8, 16, 30, 30], delays
    node_ok = node.fetch("--retry", env={**env, "FAKE_SYSTEMCTL_RC": "0"})
    assert node_ok.code == 0 and not state.exists(), node_ok.stderr


def failed_with(node: Node, result: str, status: int, run: str) -> None:
    """What `systemctl show` says of nvidia.service's last run (the stand-in's files)."""
    unit = node.root / ".systemd/nvidia.service"
    unit.mkdir(parents=True, exist_ok=True)
    for name, value in (("Result", result), ("ExecMainStatus", status), ("InvocationID", run)):
        (unit / name).write_text(f"{value}\n")


def retried(node: Node, env: dict[str, str]) -> tuple[Result, bool, list[str]]:
    """One run of the timer's retry: its result, whether it started nvidia.service, and
    what it said of nvidia.service (not --update's words)."""
    result = node.fetch("--retry", env=env)
    started = ["start", "nvidia.service"] in [c[1:] for c in node.calls("systemctl")]
    return result, started, [line for line in result.stderr.splitlines()
                             if "nvidia.service" in line]


@pytest.mark.parametrize(("shell", "code"), [*((s, 8) for s in SHELLS),
                                             *(("sh", c) for c in (2, 4, 5, 6, 9))])
def test_retry_leaves_alone_a_failure_no_retry_can_fix(tmp_path: Path, made: Made, shell: str,
                                                       code: int) -> None:
    """No usable GPU, a module the kernel refused, another driver loaded: starting
    nvidia.service again fails the same way. Said once, exit 0 (a failed oneshot unit every
    2 minutes would only repeat it), nothing started, until the failure changes."""
    node = node_with(tmp_path, made.a, shell)
    env = {"FAKE_INACTIVE": "nvidia.service", "FAKE_SYSTEMCTL_RC": "1",
           "NVIDIA_REPOSITORY_URL": UNREACHABLE}
    failed_with(node, "exit-code", code, "0f3c")
    runs = [retried(node, env) for _ in range(3)]
    assert [(r.code, started) for r, started, _ in runs] == [(0, False)] * 3, runs[0][0].stderr
    assert [len(said) for _, _, said in runs] == [1, 0, 0], [said for _, _, said in runs]
    line = runs[0][2][0]
    assert line.startswith(f"fetch.sh: warning: nvidia.service failed (startup.sh exit {code}: ")
    assert "no retry can fix" in line and "nvidia-doctor" in line, line
    assert not (node.root / "run/coreos-gpu/retry").exists()
    # nvidia.service ran again (systemctl restart) and failed the same way: said once more.
    failed_with(node, "exit-code", code, "7a21")
    again = [retried(node, env) for _ in range(2)]
    assert [(r.code, started, len(said)) for r, started, said in again] == [(0, False, 1),
                                                                           (0, False, 0)]
    # A boot starts afresh (/run); so does another driver folder in current: started again.
    shutil.rmtree(node.root / "run/coreos-gpu")
    assert [len(retried(node, env)[2]) for _ in range(2)] == [1, 0]
    assert node.install(made.a_later, "--no-start").code == 0
    result, started, _ = retried(node, env)
    assert started and result.code == 1, result.stderr


@pytest.mark.parametrize(("result", "status"), [
    ("exit-code", 22), ("exit-code", 24), ("exit-code", 3), ("exit-code", 7),
    ("timeout", 9),  # killed by SIGKILL after its start timeout: 9 is the signal
    ("success", 8),  # systemctl reset-failed nvidia.service: the operator asks for a retry
])
def test_retry_backs_off_from_a_failure_a_retry_can_fix(tmp_path: Path, made: Made, result: str,
                                                         status: int) -> None:
    """The repository unreachable (22), no bundle published yet (24), an install's lock (3),
    nvidia-smi not answering (7), a timeout: started again, with the backoff."""
    node = node_with(tmp_path, made.a)
    env = {"FAKE_INACTIVE": "nvidia.service", "FAKE_SYSTEMCTL_RC": "1",
           "NVIDIA_REPOSITORY_URL": UNREACHABLE}
    failed_with(node, result, status, "0f3c")
    now = int(time.time())
    first, started, _ = retried(node, env)
    assert started and first.code == 1, first.stderr
    failures, after = map(int, (node.root / "run/coreos-gpu/retry").read_text().split())
    assert failures == 1 and 119 <= after - now <= 125
    waiting, started, _ = retried(node, env)
    assert not started and "next attempt in" in waiting.stderr


# --- nvidia-doctor ---------------------------------------------------------------------------


def doctor_lines(node: Node, env: dict[str, str]) -> dict[str, str]:
    result = node.doctor(env=env)
    return {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines()
            if line.startswith(("PASS ", "FAIL "))}


def test_doctor_checks_the_repository(tmp_path: Path, made: Made, repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    node = node_with(tmp_path, made.a)
    lines = doctor_lines(node, {"NVIDIA_REPOSITORY_URL": repo.url})
    head, kernels, tail = lines["repository"].split("; ")
    prefix = f"PASS repository: {repo.url}: generation 1 (valid until "
    assert head.startswith(prefix) and head.endswith("), signed by this bundle's key")
    # publish signs an index valid for 21 days (index_lifetime's default)
    expires = datetime.strptime(head[len(prefix):].split(")")[0], "%Y-%m-%dT%H:%M:%S%z")
    assert timedelta(0) <= datetime.now(UTC) + timedelta(days=21) - expires < timedelta(minutes=5)
    assert kernels.startswith("bundles of this driver for 2 kernel(s): ")
    assert set(kernels.split(": ")[1].split()) == {KERNEL, CLOUD}
    assert tail == f"one for the running kernel {KERNEL}"
    assert "next-boot" not in lines  # no update_engine_client here
    down = doctor_lines(node, {"NVIDIA_REPOSITORY_URL": UNREACHABLE})
    assert down["repository"].startswith(
        f"FAIL repository: cannot read {UNREACHABLE}/index.current")
    publish_to(tmp_path / "other", made.other_key, made.a)
    forged = doctor_lines(node, {"NVIDIA_REPOSITORY_URL": f"file://{tmp_path}/other"})
    assert "does not match its signature by the key in" in forged["repository"]
    plain = Node(tmp_path / "plain")
    assert plain.install(make_bundle(tmp_path / "p", tmp_path / "ko")).code == 0
    assert "repository" not in doctor_lines(plain, {"NVIDIA_REPOSITORY_URL": repo.url})


def test_doctor_says_whether_the_next_boot_keeps_its_gpus(tmp_path: Path, made: Made,
                                                          repo: Repository) -> None:
    publish_to(repo.root, made.key, made.a, made.b)
    node = node_with(tmp_path, made.a)
    env = {"NVIDIA_REPOSITORY_URL": repo.url}
    node.add_update_engine()
    assert doctor_lines(node, env)["next-boot"] == (
        "PASS next-boot: no OS update is waiting for a reboot")
    node.add_update_engine(NEED_REBOOT, CLOUD_RELEASE.version)
    assert doctor_lines(node, env)["next-boot"].startswith(
        f"FAIL next-boot: OS release {CLOUD_RELEASE.version} is waiting for its reboot, and no "
        f"driver is staged for it: the next boot must fetch one from {repo.url}")
    assert node.fetch("--update", env=env).code == 0
    result = node.doctor("--json", env=env)
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["next-boot"]["status"] == "PASS"
    assert checks["next-boot"]["detail"] == (
        f"OS release {CLOUD_RELEASE.version} is waiting for its reboot, and its driver is staged "
        f"in /opt/nvidia/{name_of(made.b)}: the next boot keeps its GPUs")
    assert checks["repository"]["status"] == "PASS"


def test_the_retry_loads_the_driver_once_its_bundle_appears(tmp_path: Path,
                                                             repo: Repository) -> None:
    """The boot found no bundle for its kernel (exit 24) and the agent stayed down (wait);
    once the bundle is published, the timer's retry starts nvidia.service (whose startup.sh
    fetches it, stages it and switches), then the agent units."""
    keys = write_key_pair(tmp_path / "k" / "repo.key")
    trust = load_trust(UNREACHABLE, str(keys.public))
    a = make_bundle(tmp_path / "a", tmp_path / "ko", policy=DriverFailurePolicy.WAIT,
                    repository=trust)
    b = make_bundle(tmp_path / "b", tmp_path / "ko", kernels=(CLOUD,),
                    policy=DriverFailurePolicy.WAIT, repository=trust)
    publish_to(repo.root, keys.private, a)
    node = node_with(tmp_path, a)
    env = {"FAKE_KERNEL": CLOUD, "NVIDIA_REPOSITORY_URL": repo.url,
           "FAKE_INACTIVE": "nvidia.service", "FAKE_START_RUNS_STARTUP": "1"}
    assert node.startup(env=env).code == 24
    early = node.fetch("--retry", env=env)
    assert early.code == 1 and "has no bundle for kernel" in early.stderr, early.stderr
    assert (node.root / "run/coreos-gpu/retry").read_text().split()[0] == "1"
    publish_to(repo.root, keys.private, b)
    (node.root / "run/coreos-gpu/retry").write_text("1 0\n")  # its time has come
    retried = node.fetch("--retry", env=env)
    assert retried.code == 0, retried.stderr
    assert link(node, "current") == name_of(b)
    assert [c[1:] for c in node.calls("systemctl")][-1] == [
        "start", "--no-block", "dcos-mesos-slave.service", "dcos-mesos-slave-public.service"]
    assert any(c[1].endswith(f"/modules/{CLOUD}/nvidia.ko") for c in node.calls("insmod"))
    assert not (node.root / "run/coreos-gpu/retry").exists()
