"""A hostile repository (issue 22): one server on 127.0.0.1 that drips, answers 500 or 416,
gzips what nobody asked it to, lies in Content-Length, closes mid-answer and redirects where
a node must not follow. Whatever it does, node/fetch.sh ends with one of its documented
codes (docs/reference/exit-codes.md, fetch.sh: 21 bundle, 22 download, 23 signature), within its
timeouts, writes no file past its bound (repository.sh's REPO_MAX_* for the index files, the
signed size for a bundle, each plus the byte that tells it was more) and installs, stages and
switches nothing. test_node_fetch.py has the servers that stall, send without end and
redirect the index; these are the rest.

Each case runs curl and wget at once (two nodes, one server): the clients are what differs,
and a case asserts that both reach the same verdict. The shells take turns (case i: curl
under SHELLS[i], wget under SHELLS[i + 1]), so each test runs every shell with each client
at a third of the cost of the whole cross.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from .bundletools import CLOUD
from .nodetree import SHELLS, Node, NodeBundles, snapshot
from .test_node_fetch import Repository, node_with, publish_to, without_locks

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")

Answer = Callable[[SimpleHTTPRequestHandler], None]
CLIENTS = ("curl", "wget")
BUNDLE = "bundle"  # a case's target: the bundle the node fetches, whatever its path
# NVIDIA_FETCH_TIMEOUT of the cases that must not wait for it: 20 s for the bundle, 10 s for
# each index file; a case that ends in less than 10 s waited out none of them.
TIMEOUT = 20
QUICK = 10

# --- the server's ways ---------------------------------------------------------------------


def served(handler: SimpleHTTPRequestHandler) -> bytes:
    return Path(handler.translate_path(handler.path)).read_bytes()


def send(handler: SimpleHTTPRequestHandler, body: bytes, *, code: int = 200,
         length: int | None = None, headers: dict[str, str] | None = None) -> None:
    """An answer with the Content-Length given (the body's by default); the connection closes
    after it, so that a Content-Length past the body ends in a short read, not a wait."""
    handler.close_connection = True
    handler.send_response(code)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    with contextlib.suppress(OSError):
        handler.wfile.write(body)


def drip(handler: SimpleHTTPRequestHandler) -> None:
    """The file a byte every 0.1 s (the 56 KB bundle: an hour and a half), each byte well
    within wget's 10 s read timeout, until the client goes."""
    data = served(handler)
    handler.close_connection = True
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    with contextlib.suppress(OSError):
        for i in range(len(data)):
            handler.wfile.write(data[i:i + 1])
            handler.wfile.flush()
            time.sleep(0.1)


def status(code: int) -> Answer:
    """An error page with that status, to a GET with or without Range."""
    def answer(handler: SimpleHTTPRequestHandler) -> None:
        headers = {}
        if code == 416:  # as nginx says it: the range asked for is past the end
            headers["Content-Range"] = f"bytes */{len(served(handler))}"
        send(handler, f"<html><body>{code}</body></html>\n".encode(), code=code,
             headers=headers)
    return answer


def gzipped(asked: list[str]) -> Answer:
    """Compressed on the way, Content-Encoding: gzip, whatever the client accepts (a
    misconfigured gzip_static, a CDN); asked gets each request's Accept-Encoding."""
    def answer(handler: SimpleHTTPRequestHandler) -> None:
        asked.append(handler.headers.get("Accept-Encoding", ""))
        send(handler, gzip.compress(served(handler), mtime=0),
             headers={"Content-Encoding": "gzip"})
    return answer


def misstated(length: Callable[[int], int]) -> Answer:
    """The whole file, with the Content-Length length(its size)."""
    def answer(handler: SimpleHTTPRequestHandler) -> None:
        data = served(handler)
        send(handler, data, length=length(len(data)))
    return answer


def cut(handler: SimpleHTTPRequestHandler) -> None:
    """The right Content-Length, half the file, then the connection closes."""
    data = served(handler)
    send(handler, data[:len(data) // 2], length=len(data))


def cut_then_416(handler: SimpleHTTPRequestHandler) -> None:
    """cut, and 416 to the Range of a client that resumes (wget does, curl does not)."""
    (status(416) if "Range" in handler.headers else cut)(handler)


def appended(handler: SimpleHTTPRequestHandler) -> None:
    """The file and one byte more, Content-Length and all: the node's bound, exactly."""
    send(handler, served(handler) + b"x")


# --- one repository, one server and one installed node for the module ------------------------


@dataclass(frozen=True)
class Published:
    root: Path  # the repository's folder
    bundle: str  # CLOUD's bundle as the server's path: /bundles/<sha256>/nvidia.tar.gz
    size: int  # its size, as the signed index gives it
    node: Path  # a node with the bundle for KERNEL installed, to copy: it fetches CLOUD's
    without_curl: Path  # the system's commands, curl left out: a node's PATH after its own


@pytest.fixture(scope="module")
def published(node_bundles: NodeBundles) -> Published:
    folder, trust = node_bundles.folder, node_bundles.trust
    a = node_bundles.make("a", repository=trust)
    b = node_bundles.make("b", kernels=(CLOUD,), repository=trust)
    root = folder / "repository"
    publish_to(root, node_bundles.keys.private, a, b)
    sha = (root / "index.current").read_text().split()[2]
    [(path, size)] = [(f[7], int(f[9])) for f in map(str.split, (
        root / f"index/{sha}.txt").read_text().splitlines()) if f[0] == "bundle" and f[6] == CLOUD]
    # Installed once (a third of a second, more on a busy machine), copied for each run: the
    # tree holds no path of the folder it is in. And one PATH without curl for all (links to
    # the thousands of commands on the system's: seconds to make).
    node = node_with(folder / "template", a)
    shutil.move(node.path_without("curl"), folder / "without-curl")
    return Published(root, f"/{path}", size, node.root.parent, folder / "without-curl")


@pytest.fixture(scope="module")
def server(published: Published) -> Iterator[Repository]:
    served = Repository(published.root)  # serves the module's folder, never writes to it
    try:
        yield served
    finally:
        served.close()  # half a second: once, not at every test


@pytest.fixture
def repo(server: Repository) -> Repository:
    """The module's server with no hostile answer yet (a drip of an earlier test may still
    be sending: until its client goes)."""
    server.answer.clear()
    server.redirect.clear()
    server.requests.clear()
    return server


def path_of(target: str, published: Published) -> str:
    return published.bundle if target == BUNDLE else target


# --- the node's side: curl and wget at once ------------------------------------------------


# "cannot read URL: REASON; check …" (an index file), "cannot download URL: REASON; nothing …"
FAILED = re.compile(r"cannot (?:read|download) (?P<url>\S+): (?P<reason>.*?)"
                    r"(?:; check the repository URL and the network|; nothing was installed)?$")


@dataclass(frozen=True)
class Refusal:
    client: str
    shell: str
    code: int
    line: str  # its one error line
    seconds: float

    def failed(self, url: str) -> str | None:
        """The reason the line gives for a download of url that failed (the client's own
        words, maybe none), or None where it says something else."""
        said = FAILED.search(self.line)
        return said["reason"] if said and said["url"].startswith(url) else None


def bounds_of(repository_sh: Path, bundle_size: int) -> dict[str, int]:
    """The most each file the node downloads may be, and the byte that says it was more:
    repository.sh's REPO_MAX_* (from the node's own copy) and the signed size."""
    limits = dict(re.findall(r"^REPO_MAX_([A-Z]+)=([0-9]+)", repository_sh.read_text(), re.M))
    return {"pointer": int(limits["POINTER"]) + 1, "index": int(limits["INDEX"]) + 1,
            "signature": int(limits["SIGNATURE"]) + 1, "bundle": bundle_size + 1}


def kind_of(name: str) -> str:
    if name.endswith((".rc", ".err")):  # the client's exit status and complaint
        return "note"
    return ("pointer" if name == "index.current" else "signature" if name.endswith(".sig")
            else "index" if name.endswith(".txt") else "bundle" if name.startswith("nvidia.tar.")
            else name)


def watch_fetch_folders(opt: Path, largest: dict[str, int], done: threading.Event) -> None:
    """Sample, every 5 ms until done, the size of each file in the node's fetch folders
    (/opt/nvidia/.fetch.*/, gone when fetch.sh exits): the largest seen, by name."""
    while not done.wait(0.005):
        for folder in opt.glob(".fetch.*"):
            for entry in os.scandir(folder) if folder.is_dir() else ():
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                largest[entry.name] = max(size, largest.get(entry.name, 0))


def refuse(tmp_path: Path, published: Published, url: str, shell: str, client: str,
           timeout: int, within: float) -> Refusal:
    """fetch.sh --kernel CLOUD from url (NVIDIA_FETCH_TIMEOUT=timeout) on a node of its own;
    it must refuse within `within` seconds, and leave the node as it was (nothing installed,
    staged or switched, no fetch folder left), no file it downloaded past its bound."""
    shutil.copytree(published.node, tmp_path / client, symlinks=True)
    node = Node(tmp_path / client, shell=shell)
    before = snapshot(node.root)
    env = {"NVIDIA_REPOSITORY_URL": url, "NVIDIA_FETCH_TIMEOUT": str(timeout)}
    if client == "wget":
        env["PATH"] = f"{node.bin}:{published.without_curl}"
    largest: dict[str, int] = {}
    done = threading.Event()
    watcher = threading.Thread(target=watch_fetch_folders,
                               args=(node.root / "opt/nvidia", largest, done))
    watcher.start()
    started = time.monotonic()
    try:
        result = node.fetch("--kernel", CLOUD, env=env)
    finally:
        seconds = time.monotonic() - started
        done.set()
        watcher.join()
    where = f"{client} under {shell}"
    assert result.code != 0, f"{where} staged what a hostile server sent: {result.stderr}"
    assert seconds < within, f"{where} took {seconds:.1f} s: {result.stderr}"
    assert len(result.errors) == 1, f"{where}: {result.code} {result.stderr}"
    assert without_locks(snapshot(node.root)) == before, f"{where} changed the node"
    assert node.calls("insmod") == [] and node.calls("systemctl") == [], where
    bounds = bounds_of(node.root / "opt/nvidia/current/node/repository.sh", published.size)
    bounds["note"] = 65536  # curl's one line; wget -q says nothing
    for name, size in largest.items():
        assert size <= bounds[kind_of(name)], f"{where} wrote {size} bytes to {name}"
    return Refusal(client, shell, result.code, result.errors[0], seconds)


def refuse_both(tmp_path: Path, published: Published, repo: Repository, case: int, *,
                timeout: int = TIMEOUT, within: float = QUICK) -> dict[str, Refusal]:
    """refuse with curl under SHELLS[case] and with wget under the next shell, at once."""
    shells = {client: SHELLS[(case + i) % len(SHELLS)] for i, client in enumerate(CLIENTS)}
    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        runs = {c: pool.submit(refuse, tmp_path, published, repo.url, shells[c], c, timeout,
                               within) for c in CLIENTS}
        return {c: run.result() for c, run in runs.items()}


def judge(refusals: dict[str, Refusal], meets: Callable[[Refusal], bool]) -> None:
    """Both clients meet the case's verdict."""
    for refusal in refusals.values():
        assert meets(refusal), refusal


def cases(*rows: tuple[object, ...]) -> list[Any]:
    """pytest parameters, each row with its number first (it picks the row's shells) and an
    id of its first two values."""
    return [pytest.param(i, *row, id="-".join(map(str, row[:2]))) for i, row in enumerate(rows)]


# --- the cases -----------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "target", "timeout"), cases(
    ("/index.current", 1),
    (BUNDLE, 2),
))
def test_a_server_that_drips_is_cut_off_at_the_timeout(
        tmp_path: Path, published: Published, repo: Repository, case: int, target: str,
        timeout: int) -> None:
    """A byte at a time, each well within wget's read timeout (-T 10): only the node's bound
    on the whole download (timeout) ends it. The index files before the bundle take
    milliseconds; a few seconds more leave room for a busy CI machine."""
    path = path_of(target, published)
    repo.answer[path] = drip
    judge(refuse_both(tmp_path, published, repo, case, timeout=timeout, within=timeout + 5),
          lambda r: r.code == 22 and r.failed(repo.url + path) == f"no answer within {timeout} s")


@pytest.mark.parametrize(("case", "code", "target"), cases(
    (500, "/index.current"),
    (500, "/index/"),  # its .txt, the first of the two
    (500, BUNDLE),
    (416, "/index.current"),
    (416, "/index/"),
    (416, BUNDLE),
))
def test_an_error_status_is_a_failed_download(
        tmp_path: Path, published: Published, repo: Repository, case: int, code: int,
        target: str) -> None:
    """500 (curl tries twice more, a second apart) and 416 (to a GET without Range: the node
    never resumes): exit 22, the line naming the file and the status."""
    path = path_of(target, published)
    repo.answer[path] = status(code)
    judge(refuse_both(tmp_path, published, repo, case),
          # wget takes a 416 for "complete" and says nothing: the node names the empty answer
          lambda r: r.code == 22 and re.search(
              rf"\b{code}\b" if (code, r.client) != (416, "wget") else
              r"^the server answered with no data$", r.failed(repo.url + path) or ""
          ) is not None)


@pytest.mark.parametrize(("case", "target", "code", "says"), cases(
    ("/index.current", 22, "is not 'coreos-gpu-repository 1 <sha256>'"),
    ("/index/", 23, "does not match its signature by the key in"),
    (BUNDLE, 22, "bytes the signed index gives arrived (the transfer stopped, or the server"),
))
def test_an_uninvited_gzip_is_refused_alike_by_both_clients(
        tmp_path: Path, published: Published, repo: Repository, case: int, target: str,
        code: int, says: str) -> None:
    """Content-Encoding: gzip though the client asked for none. curl (without --compressed)
    and wget (1.21 here; --compression defaults to none) both keep the bytes as sent, and the
    signature or the signed size refuses them. A client that decoded them (wget 1.19.2 could)
    would get the signed file back and go on: either way, both clients must agree."""
    asked: list[str] = []
    repo.answer[path_of(target, published)] = gzipped(asked)
    refusals = refuse_both(tmp_path, published, repo, case)
    assert set(asked) <= {"", "identity"}, asked  # nobody asked for gzip
    assert len({r.code for r in refusals.values()}) == 1, refusals
    judge(refusals, lambda r: r.code == code and says in r.line)


@pytest.mark.parametrize(("case", "target", "how", "answer", "code", "says"), cases(
    ("/index.current", "shorter", misstated(lambda n: n // 2), 22, "is not 'coreos-gpu-"),
    (BUNDLE, "shorter", misstated(lambda n: n // 2), 22, "bytes the signed index gives arrived"),
    (BUNDLE, "longer", misstated(lambda n: n + 1000), 22, "cannot download"),
    (BUNDLE, "cut", cut, 22, "cannot download"),
    (BUNDLE, "cut then 416", cut_then_416, 22, "cannot download"),
    (BUNDLE, "one byte more", appended, 21, "is larger than the"),
))
def test_a_lying_length_or_a_broken_connection(
        tmp_path: Path, published: Published, repo: Repository, case: int, target: str,
        how: str, answer: Answer, code: int, says: str) -> None:
    """A Content-Length shorter or longer than the body, a connection closed mid-file (wget
    tries twice more, 1 and 2 s apart, asking for the rest with a Range; curl does not), one
    byte past the signed size: a failed download (22) or a bundle that is not the signed one
    (21), never staged."""
    repo.answer[path_of(target, published)] = answer
    judge(refuse_both(tmp_path, published, repo, case),
          lambda r: r.code == code and says in r.line)


@pytest.mark.parametrize(("case", "target", "location", "timeout"), cases(
    (BUNDLE, "itself", TIMEOUT),  # a loop: 3 redirects, then no more
    (BUNDLE, "file:///etc/os-release", TIMEOUT),
    (BUNDLE, "ftp://127.0.0.1:9/nvidia.tar.gz", TIMEOUT),  # nothing listens: refused at once
    # wget follows ftp:// (README: it cannot be held to http(s)), here to a server that never
    # greets it (this HTTP one): the timeout ends it. curl does not follow.
    ("/index.current", "ftp://127.0.0.1:{port}/index.current", 2),
))
def test_a_redirect_that_is_not_followed(
        tmp_path: Path, published: Published, repo: Repository, case: int, target: str,
        location: str, timeout: int) -> None:
    """Beyond test_node_fetch's (curl, for index.current): the bundle's, ftp://, and wget.
    Exit 22, and no more than 3 redirects."""
    path = path_of(target, published)
    port = repo.url.rsplit(":", 1)[1]
    repo.redirect[path] = repo.url + path if location == "itself" else location.format(port=port)
    judge(refuse_both(tmp_path, published, repo, case, timeout=timeout,
                      within=min(timeout + 5, QUICK)),
          lambda r: r.code == 22 and r.failed(repo.url + path) is not None)
    assert repo.requests.count(path) <= 2 * 4, repo.requests  # each client: 1 + 3 redirects
