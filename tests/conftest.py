from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from coreos_gpu.keys import write_key_pair
from testinputs.nvidia_run import VERSION as DRIVER  # the 535 test driver

if TYPE_CHECKING:  # imported where used: both import REPO from here
    from .nodetree import NodeBundles
    from .repotools import Bundles

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """The error and hint lines, without the step log lines before them."""
        return [line for line in self.stderr.splitlines() if line.startswith("coreos-gpu: ")]


def run_cli(*argv: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None,
            cache: Path | None = None, timeout: float = 600) -> CliResult:
    """Run the real `coreos-gpu` command (as `python -m coreos_gpu`) in cwd."""
    full_env = {**os.environ, **(env or {})}
    if cache is not None:
        full_env["XDG_CACHE_HOME"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "coreos_gpu", *map(str, argv)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path: Path):  # type: ignore[no-untyped-def]
    """run_cli in a fresh folder with a fresh cache."""
    cache = tmp_path / "cache"

    def invoke(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> CliResult:
        return run_cli(*argv, cwd=tmp_path, env=env, cache=cache)

    return invoke


def keygen(folder: Path, name: str = "repo.key") -> Path:
    done = run_cli("keygen", "--output", folder / name, cwd=folder)
    assert done.code == 0, done.stderr
    return folder / name


# --- small real bundles of the synthetic test driver (tests/bundletools.py), no compile --------

@pytest.fixture(scope="session")
def ko_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where make_ko compiles the fake .ko files: once a session, for every test."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to make ELF kernel modules")
    return tmp_path_factory.mktemp("ko")


@pytest.fixture
def key(tmp_path: Path) -> Path:
    """A new repository key pair: the private key (the public one beside it, key + ".pub")."""
    return write_key_pair(tmp_path / "keys" / "repo.key").private


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, ko_dir: Path) -> Bundles:
    """The repository and publish tests' archives (repotools.Bundles); a node test module
    that wants several bundles defines its own bundles from node_bundles."""
    from .repotools import make_bundles

    return make_bundles(tmp_path_factory.mktemp("repo-bundles"), ko_dir)


@pytest.fixture(scope="module")
def node_bundles(tmp_path_factory: pytest.TempPathFactory, ko_dir: Path,
                 request: pytest.FixtureRequest) -> NodeBundles:
    """Real bundles with the real node scripts, extracted (nodetree.make_bundle), for one
    test module: one folder and one repository key pair for the module's bundles."""
    from .nodetree import NodeBundles

    folder = tmp_path_factory.mktemp(request.module.__name__.rpartition(".test_")[2])
    return NodeBundles(folder, ko_dir, write_key_pair(folder / "keys" / "repo.key"))


@pytest.fixture(scope="module")
def bundle(node_bundles: NodeBundles) -> Path:
    """A node test module's bundle: the test driver for KERNEL with the defaults, extracted
    (its archive beside it: bundle.parent / "nvidia.tar.gz"). test_bundle.py has its own."""
    return node_bundles.make("b")


@dataclass(frozen=True)
class Site:
    """A sync host's folder: its config file, key pair, cache and a repository folder."""

    folder: Path
    repo: Path
    cache: Path

    def sync(self, *argv: str, mirror: str) -> CliResult:
        return run_cli("sync", "--mirror", mirror, *argv, cwd=self.folder, cache=self.cache,
                       timeout=2400)

    def plan(self, mirror: str) -> list[dict[str, str]]:
        done = self.sync("--plan", "--json", mirror=mirror)
        assert done.code == 0, done.stderr
        plan = json.loads(done.stdout)
        assert list(plan) == ["include"]  # GitHub takes any other key as a matrix axis
        return plan["include"]  # type: ignore[no-any-return]

    def listing(self) -> list[dict[str, object]]:
        done = run_cli("repository", "list", self.repo, "--key", self.folder / "repo.key.pub",
                       "--json", cwd=self.folder)
        assert done.code == 0, done.stderr
        return json.loads(done.stdout)["bundles"]  # type: ignore[no-any-return]



def make_site(folder: Path, flatcar_release, nvidia_run: Path, *,  # type: ignore[no-untyped-def]
              key_folder: Path | None = None, cache: Path | None = None) -> Site:
    folder.mkdir(parents=True, exist_ok=True)
    if key_folder is None:
        keygen(folder)
    else:
        for name in ("repo.key", "repo.key.pub"):
            shutil.copy2(key_folder / name, folder / name)
    repo = folder / "repo"
    # Beta first: its bundle is built (and its kernel compiled) before stable's release.
    (folder / "coreos-gpu.toml").write_text(
        f'signing_key_fingerprint = "{flatcar_release.key_fingerprint}"\n'
        f'driver_url = "{nvidia_run}"\ndriver_version = "{DRIVER}"\nruntime = "bwrap"\n'
        f'repository = "file://{repo}"\nrepository_key = "repo.key.pub"\n'
        'publish_key = "repo.key"\nsync_channels = ["beta", "stable"]\n')
    return Site(folder, repo, cache or folder / "cache")


@pytest.fixture(scope="session")
def nvidia_run() -> Path:
    """The real-format NVIDIA-Linux-x86_64-535.261.03.run built from Debian's packages."""
    from testinputs.nvidia_run import build_nvidia_run

    return build_nvidia_run()


@pytest.fixture(scope="session")
def nvidia_run_470() -> Path:
    """NVIDIA-Linux-x86_64-470.256.02.run, the second driver generation (legacy, Kepler)."""
    from testinputs.nvidia_branches import R470
    from testinputs.nvidia_run import build_nvidia_run

    return build_nvidia_run(R470)


class MirrorHandler(SimpleHTTPRequestHandler):
    """Serves a folder with HTTP Range support; can cut chosen files short, like a bad link."""

    cut_after: dict[str, int]  # URL path -> bytes to send before closing the connection
    cut_once: dict[str, int]  # the same, for the next response only
    ranges_seen: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "File not found")
            return
        data = path.read_bytes()
        start, status = 0, 200
        if (header := self.headers.get("Range", "")).startswith("bytes="):
            self.ranges_seen.append(header)
            start, status = int(header[6:].split("-")[0]), 206
            if start >= len(data):
                self.send_error(416)
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        limit = self.cut_once.pop(self.path, None) or self.cut_after.get(self.path)
        self.wfile.write(body if limit is None else body[:limit])
        if limit is not None:
            self.close_connection = True


@dataclass
class Mirror:
    root: Path
    url: str
    cut_after: dict[str, int]
    cut_once: dict[str, int]
    ranges_seen: list[str]


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[Mirror]:
    """An HTTP server on 127.0.0.1 serving a fresh folder."""
    root = tmp_path / "www"
    root.mkdir()
    mirror = Mirror(root, "", {}, {}, [])
    handler = type("Handler", (MirrorHandler,), {"cut_after": mirror.cut_after,
                                                  "cut_once": mirror.cut_once,
                                                  "ranges_seen": mirror.ranges_seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield mirror
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def flatcar_release():  # type: ignore[no-untyped-def]
    """The Flatcar test release (developer container, DIGESTS, sig, feed) in mirror layout."""
    from testinputs.flatcar import build_flatcar_release

    if os.geteuid() != 0:
        pytest.skip("building the Flatcar test release needs root (debootstrap)")
    return build_flatcar_release()


def make_busybox_root(root: Path) -> Path:
    """A tiny root file system: busybox (and the libraries it links), like a dev container."""
    import shutil

    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (scripts/test installs it)")
    for folder in ("bin", "usr/bin", "proc", "dev", "tmp", "etc"):  # nspawn wants /usr
        (root / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin/busybox")
    ldd = subprocess.run(["ldd", busybox], capture_output=True, text=True, check=False)
    for library in [w for w in ldd.stdout.split() if w.startswith("/")]:
        (root / library[1:]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(library, root / library[1:])
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    return root


@pytest.fixture(scope="session")
def vm_image():  # type: ignore[no-untyped-def]
    """The Debian VM image with kernels 6.1.0-50-amd64 and -cloud-amd64 (tests/vm.py boots it)."""
    import shutil

    from testinputs.vm import build_vm_image

    if os.geteuid() != 0:
        pytest.skip("building the VM image needs root (debootstrap)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/test installs qemu-system-x86)")
    return build_vm_image()


@dataclass(frozen=True)
class Synced:
    site: Site
    result: CliResult  # of the first `sync --json`, on an empty repository and cache


@pytest.fixture(scope="session")
def synced(tmp_path_factory: pytest.TempPathFactory, flatcar_release,  # type: ignore[no-untyped-def]
           nvidia_run: Path) -> Synced:
    """The first `coreos-gpu sync` of the test server's three releases into an empty
    repository with an empty cache: the session's compiles of the proprietary 535 modules
    for both test kernels (tests/test_sync.py checks it made exactly those two)."""
    from testinputs.serve import serve_folder

    site = make_site(tmp_path_factory.mktemp("sync"), flatcar_release, nvidia_run)
    with serve_folder(flatcar_release.server_root) as mirror:
        return Synced(site, site.sync("--json", mirror=mirror))


@dataclass(frozen=True)
class BuiltBundle:
    archive: Path
    result: CliResult  # of `coreos-gpu build --json`
    cache: Path  # the XDG_CACHE_HOME it was built with, for rebuilds from the same cache


def _seed_modules(cache: Path, synced: Synced) -> None:
    """Hard-link the module sets the first sync compiled into cache (a module set is only
    ever replaced whole, never written in place), so that no (driver, flavour, kernel)
    compiles twice in a session."""
    source = synced.site.cache / "coreos-gpu/modules"
    target = cache / "coreos-gpu/modules"
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir() and not (target / entry.name).exists():
            shutil.copytree(entry, target / entry.name, symlinks=True, copy_function=os.link)


@pytest.fixture(scope="session")
def build_bundle(tmp_path_factory: pytest.TempPathFactory, flatcar_release,  # type: ignore[no-untyped-def]
                 nvidia_run: Path, request: pytest.FixtureRequest):
    """`coreos-gpu build` of the test inputs (a real compile: minutes), once per release,
    driver and set of extra flags in a session, into one cache: the build and the VM tests
    share the bundles, and each (driver, flavour, kernel) compiles once in the session: a
    proprietary 535 build takes the modules the first sync compiled (the synced fixture).
    The release is the first test release unless release names another (say
    flatcar_release.update.version, the one on the cloud kernel); an extra `--release` in
    extra would add a kernel to the same bundle instead. The driver is 535.261.03 unless
    driver is "470.256.02"."""
    from testinputs.serve import serve_folder

    folder = tmp_path_factory.mktemp("builds")
    built: dict[tuple[str, ...], BuiltBundle] = {}

    def build(*extra: str, release: str | None = None,
              driver: str = DRIVER) -> BuiltBundle:
        release = release or flatcar_release.version
        key = (release, driver, *extra)
        run = nvidia_run if driver == DRIVER else request.getfixturevalue(
            f"nvidia_run_{driver.split('.')[0]}")
        if key not in built:
            if driver == DRIVER and "open" not in extra:
                _seed_modules(folder / "cache", request.getfixturevalue("synced"))
            archive = folder / f"nvidia-{len(built)}.tar.gz"
            with serve_folder(flatcar_release.server_root) as mirror:
                result = run_cli(
                    "build", "--mirror", mirror, "--release", release,
                    "--signing-key-fingerprint", flatcar_release.key_fingerprint,
                    "--driver-url", run, "--driver-version", driver,
                    "--runtime", "bwrap", "--output", archive, "--json", *extra,
                    # A compile takes minutes, many more on a machine busy with other tests.
                    cwd=folder, cache=folder / "cache", timeout=1800)
            assert result.code == 0, result.stderr
            built[key] = BuiltBundle(archive, result, folder / "cache")
        return built[key]

    return build


# Tests that share the session's compiles (build_bundle, synced): one xdist group, so that
# with `-n` they all run in one worker, and no worker compiles what another already has.
COMPILE_FIXTURES = frozenset({"build_bundle", "synced"})
COMPILE_GROUP = "compiles"


@pytest.hookimpl(tryfirst=True)  # before xdist names the groups in the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if COMPILE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(COMPILE_GROUP))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Under --dist loadgroup, xdist tells its scheduler a test's group by a suffix on the
    test's id; where it cannot (pytest 9.2, pytest-xdist#1386) the groups are silently
    spread over the workers and each compiles everything again: stop instead."""
    if not session.config.getoption("loadgroup", default=False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and not item.nodeid.endswith(
                f"@{COMPILE_GROUP}"):
            raise pytest.UsageError(
                f"pytest-xdist did not put {item.nodeid} in its group: this pytest and "
                "pytest-xdist do not group (see pyproject.toml); run with -n 0")


# The time each kind of work took, summed over its tests' setup, call and teardown: the
# compile group runs in one worker, so its sum is that worker's wall time; the README's
# Test section budgets both.
GROUP_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    group = "the compile group" if "xdist_group" in report.keywords else "the rest"
    GROUP_SECONDS[group] = GROUP_SECONDS.get(group, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for group, seconds in sorted(GROUP_SECONDS.items()):
        terminalreporter.write_line(f"tests: {group}: {seconds / 60:.1f} min of test time")
