"""SIGKILL install_nvidia.sh at every external command it runs (before the command and
after it), then run it again; the same for the boot that fetches a driver from the bundle
repository (startup.sh -> node/fetch.sh -> the fetched bundle's install_nvidia.sh --stage ->
the switch -> its startup.sh) and for fetch.sh --update staging an OS update's driver.

Right after each kill the node has the old driver or the new one, complete — never a mix
and never a partial folder under a real name. After the re-run the node is exactly what an
uninterrupted install makes, with nothing left in temporary places.

The fetch tests kill before every command, and after only those that change the node
(CHANGING): after a command that only reads, the tree is the one the kill before it left.
That, rerunning as a node would (no wrappers) and only once per distinct tree a kill left,
keeps them at about 3 and 2 minutes on 2 busy cores (213 kill points and 36 reruns for the
boot, 130 and 20 for the staging). What the kills showed the scripts leave behind that a
rerun does not clear would go in KNOWN_BUGS (those tests xfail naming it until the scripts
are fixed); the three the first runs found are fixed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .bundletools import CLOUD, CLOUD_RELEASE, VERSION
from .nodetree import Node, NodeBundles, snapshot
from .test_node_fetch import Repository, node_with, publish_to

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="the install tests run as root")]
SH = shutil.which("sh") or "/bin/sh"  # by its path: the fetch tests' PATH is only the killers

# Every external command install_nvidia.sh may run; each call is a kill point.
COMMANDS = ("cp", "mv", "ln", "rm", "mkdir", "cmp", "rmdir", "mktemp", "sha256sum", "find", "sed",
            "awk", "sort", "head", "cut", "du", "df", "readlink", "dirname", "cat", "chmod",
            "chown", "stat", "xargs", "openssl", "nproc", "ls", "sync", "flock", "tr", "grep",
            "id", "uname", "ldconfig", "systemctl")
# A wrapper counts calls under a lock (pipelines run in parallel), logs each with its name,
# and at call KILL_AT kills its whole process group — the install and everything it
# started — before or after running the real command.
# The count is read and written by the wrapper's own shell under flock on a descriptor: one
# process more per call, not three (these tests run the install about 400 times).
KILLER = """#!/bin/sh
PATH=${PATH#*:}  # the wrappers' own folder is first
{ flock 7 && read -r n <"$KILL_STATE" && n=$((n + 1)) && echo "$n" >"$KILL_STATE" &&
	echo "$n ${0##*/}" >>"$KILL_STATE.log"; } 7>>"$KILL_STATE.lock"
[ "$n" = "$KILL_AT" ] && [ "$KILL_WHEN" = before ] && kill -s KILL 0
"${0##*/}" "$@"
rc=$?
[ "$n" = "$KILL_AT" ] && [ "$KILL_WHEN" = after ] && kill -s KILL 0
exit "$rc"
"""


@pytest.fixture(scope="module")
def bundles(node_bundles: NodeBundles) -> tuple[Path, Path]:
    return node_bundles.make("old"), node_bundles.make("new", tool_version="0.2.0")


def bundle_name(bundle: Path) -> str:
    return f"{VERSION}-{hashlib.sha256((bundle / 'SHA256SUMS').read_bytes()).hexdigest()[:12]}"


def complete(root: Path, name: str) -> bool:
    """The installed folder holds every file of its bundle, intact."""
    folder = root / "opt/nvidia" / name
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return False
    for line in sums.read_text().splitlines():
        digest, path = line.split("  ", 1)
        target = folder / path.removeprefix(f"payload/{VERSION}/")
        if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != digest:
            return False
    return True


class Killer:
    def __init__(self, folder: Path, node: Node) -> None:
        self.bin = folder / "killer-bin"
        self.state = folder / "killer-count"
        self.bin.mkdir()
        for name in COMMANDS:
            (self.bin / name).write_text(KILLER)
            (self.bin / name).chmod(0o755)
        self.node = node

    def install(self, bundle: Path, root: Path, *, at: int = 0, when: str = "") -> int:
        self.state.write_text("0\n")
        self.state.with_name(self.state.name + ".log").write_text("")
        env = {**self.node.env, "FAKE_ROOT": str(root), "KILL_STATE": str(self.state),
               "KILL_AT": str(at), "KILL_WHEN": when,
               "PATH": f"{self.bin}:{self.node.env['PATH']}"}
        proc = subprocess.Popen(["sh", bundle / "install_nvidia.sh", "--root", root], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the install and all it started
            raise

    def called(self) -> dict[int, str]:
        """The last run's calls: number -> command."""
        log = self.state.with_name(self.state.name + ".log").read_text().splitlines()
        return {int(n): name for n, name in (line.split(" ", 1) for line in log)}


def check_faults(tmp_path: Path, start: Path, bundle: Path, old: str | None) -> int:
    """Kill an install of bundle over the root `start` at every point; return how many.
    Before every command, and after those that change the node (CHANGING; after one that
    only reads, the tree is the one the kill before the next command leaves), as the fetch
    tests do; a rerun only once per distinct tree a kill left (it depends on nothing else).
    Points after the switch (ldconfig, the stale drop-ins, systemctl, the tidying) count
    as much as those before it: there must be some."""
    node = Node(tmp_path / "node")
    killer = Killer(tmp_path, node)
    new = bundle_name(bundle)
    reference = tmp_path / "reference"
    shutil.copytree(start, reference, symlinks=True)
    assert killer.install(bundle, reference) == 0
    expected = snapshot(reference)
    called = killer.called()
    points = after_switch = 0
    seen: set[tuple[tuple[str, str], ...]] = set()
    for at, when in [*((at, "before") for at in called),
                     *((at, "after") for at, name in called.items() if name in CHANGING)]:
        root = tmp_path / f"root-{at}-{when}"
        shutil.copytree(start, root, symlinks=True)
        code = killer.install(bundle, root, at=at, when=when)
        assert code == -signal.SIGKILL, (at, when, code)
        points += 1
        current = root / "opt/nvidia/current"
        # Right after the kill: the old driver or the new one, complete.
        if current.is_symlink():
            assert os.readlink(current) in (old, new), (at, when)
            assert complete(root, os.readlink(current)), (at, when)
            after_switch += os.readlink(current) == new
        else:
            assert old is None, (at, when)
        for entry in (root / "opt/nvidia").glob(f"{VERSION}-*"):
            assert complete(root, entry.name), (at, when, entry.name)
        # Then a run to the end gives what an uninterrupted install gives.
        tree = tuple(sorted((TEMPORARY.sub(r"\1*", path), value)
                            for path, value in snapshot(root).items()))
        if tree not in seen:
            seen.add(tree)
            assert killer.install(bundle, root) == 0, (at, when)
            assert snapshot(root) == expected, (at, when)
        shutil.rmtree(root)
    assert after_switch >= 10, after_switch
    return points


def test_killed_first_install(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    start = tmp_path / "empty"
    Node(start)  # the fake /sys, /proc, /dev
    points = check_faults(tmp_path, start / "root", bundles[0], old=None)
    assert points >= 50, points
    print(f"{points} kill points")


def test_killed_upgrade(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    node = Node(tmp_path / "before")
    assert node.install(bundles[0]).code == 0
    points = check_faults(tmp_path, node.root, bundles[1], old=bundle_name(bundles[0]))
    assert points >= 50, points
    print(f"{points} kill points")


# --- the boot-time fetch: startup.sh -> node/fetch.sh -> install_nvidia.sh --stage -------------

# Every external command startup.sh, node/fetch.sh (--kernel and --update) and the fetched
# bundle's install_nvidia.sh --stage run on these paths, the stand-ins for the kernel's and
# systemd's included; test_the_fetch_kill_points_are_every_command checks that none is
# missed. (wget runs only where curl is missing; xz and zstd only for other compressions.)
FETCH_COMMANDS = (
    "cp", "mv", "ln", "rm", "mkdir", "cmp", "rmdir", "mktemp", "sha256sum", "find", "sed", "awk",
    "sort", "head", "tail", "cut", "wc", "du", "df", "readlink", "dirname", "cat", "chmod", "chown",
    "stat", "xargs", "openssl", "nproc", "ls", "sync", "flock", "tr", "grep", "date", "timeout",
    "curl", "wget", "tar", "gzip", "id", "uname", "ldconfig", "systemctl", "insmod", "modprobe",
    "mknod", "nvidia-smi", "dmesg", "update_engine_client")
# Those that change the node or run what does (a download, an extraction, chmod under find):
# the only ones also killed after they ran. A kill after a command that only reads leaves
# the tree that the kill before it leaves.
CHANGING = frozenset({"cp", "mv", "ln", "rm", "mkdir", "rmdir", "mktemp", "chmod", "chown",
                      "timeout", "curl", "tar", "gzip", "find", "ldconfig", "insmod",
                      "modprobe", "mknod", "systemctl"})
# Here the wrappers are the whole PATH, so a command missing from the list is not found at
# all rather than run uncounted. Each runs the real command by its full path and leaves
# PATH as it is for the command's own children (curl under timeout, openssl under xargs,
# chmod under find -exec and gzip under tar are kill points too), except for a stand-in,
# whose inner workings are the fake kernel's, not the scripts'. timeout puts its child in
# a process group of its own: a kill takes the whole session, as systemd takes the unit's
# cgroup, and the killer's own group.
FETCH_KILLER = """#!/bin/sh
{{ {flock} 7 && read -r n <"$KILL_STATE" && n=$((n + 1)) && echo "$n" >"$KILL_STATE" &&
	echo "$n ${{0##*/}}" >>"$KILL_STATE.log"; }} 7>>"$KILL_STATE.lock"
kill_all() {{
	read -r _ _ _ _ _ session _ </proc/$$/stat
	kill -s KILL -- "-$session" 0
}}
[ "$n" = "$KILL_AT" ] && [ "$KILL_WHEN" = before ] && kill_all
{path}{real} "$@"
rc=$?
[ "$n" = "$KILL_AT" ] && [ "$KILL_WHEN" = after ] && kill_all
exit "$rc"
"""
NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
# The random or per-process part of a temporary name: mktemp's (.fetch.*, .stage.*), $$'s.
TEMPORARY = re.compile(r"(\.fetch\.|\.stage\.|\.undo\.|\.tmp\.)(?!lock$)[^/]+")
# What the kills show that the node scripts leave behind and a run after the kill does not
# clear: a tree whose only differences from an uninterrupted run's are these makes the test
# xfail, naming them, and each listed one must still show up, so that a fix takes its entry
# out. None now. The first runs of these tests found three, since fixed: a fetch's folder
# left when the kill came after the staged install (the next boot switches without fetch.sh),
# current.tmp.PID / previous.tmp.PID / staged.tmp.PID left by a kill inside replace_link or
# record_staged, and current still listed as staged after a kill between the switch and the
# tidying. lib.sh's clear_leftovers_in_opt (under the install lock, at each switch and before
# fetch.sh records a staged folder) and startup.sh's tidy of a current listed as staged
# clear them.
KNOWN_BUGS: dict[str, re.Pattern[str]] = {}


def known_bug(root: Path, path: str) -> str | None:
    for bug, pattern in KNOWN_BUGS.items():
        if pattern.fullmatch(path):
            return bug
    return None


@dataclass(frozen=True)
class Fetched:
    a: Path  # installed: KERNEL, with the repository's key
    b: Path  # in the repository: the same driver for CLOUD
    key: Path  # the repository's private key


@pytest.fixture(scope="module")
def fetched(node_bundles: NodeBundles) -> Fetched:
    trust = node_bundles.trust  # each test serves its own
    return Fetched(a=node_bundles.make("a", repository=trust),
                   b=node_bundles.make("b", kernels=(CLOUD,), repository=trust),
                   key=node_bundles.keys.private)


@pytest.fixture
def served(tmp_path: Path, fetched: Fetched) -> Iterator[Repository]:
    """A and B published, served over HTTP on 127.0.0.1; a download cut by a kill is not
    worth a traceback."""
    repository = Repository(tmp_path / "repository")
    repository.server.handle_error = lambda *_: None  # type: ignore[method-assign]
    publish_to(repository.root, fetched.key, fetched.a, fetched.b)
    try:
        yield repository
    finally:
        repository.close()


class FetchKiller:
    """Runs a node script with the FETCH_KILLER wrappers as its PATH, or as a node would."""

    def __init__(self, folder: Path, node: Node, env: dict[str, str]) -> None:
        self.bin = folder / "fetch-killer-bin"
        self.state = folder / "fetch-killer-count"
        self.log = folder / "fetch-killer-count.log"
        self.bin.mkdir()
        real_path = node.env["PATH"]
        flock = shutil.which("flock", path=real_path)
        for name in FETCH_COMMANDS:
            real = shutil.which(name, path=real_path)
            assert real is not None, name
            stand_in = Path(real).parent == node.bin
            (self.bin / name).write_text(FETCH_KILLER.format(
                flock=flock, real=real, path="PATH=$KILL_REAL_PATH " if stand_in else ""))
            (self.bin / name).chmod(0o755)
        self.plain = {**node.env, **env}
        self.env = {**self.plain, "PATH": str(self.bin), "KILL_REAL_PATH": real_path,
                    "KILL_STATE": str(self.state)}

    def run(self, argv: list[str | Path], root: Path, *, at: int = 0, when: str = "",
            prefix: tuple[str, ...] = ()) -> int:
        """Run argv over root; at the at-th command, kill it (when: before or after)."""
        self.state.write_text("0\n")
        self.log.write_text("")
        return self._wait(subprocess.Popen(
            [*prefix, SH, *argv], env={**self.env, "FAKE_ROOT": str(root), "KILL_AT": str(at),
                                       "KILL_WHEN": when},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    def run_plain(self, argv: list[str | Path], root: Path) -> int:
        """Run argv over root with the node's own PATH: no wrappers, as at the next boot."""
        return self._wait(subprocess.Popen(
            [SH, *argv], env={**self.plain, "FAKE_ROOT": str(root)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes]) -> int:
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise

    def called(self) -> dict[int, str]:
        """The last run's commands by number."""
        return {int(n): name for n, name in map(str.split, self.log.read_text().splitlines())}


def leftovers(root: Path) -> list[str]:
    """What a killed run left in temporary places (the fetch lock file stays: it is the
    lock, as .lock is install_nvidia.sh's)."""
    opt = root / "opt/nvidia"
    return sorted(str(p.relative_to(root)) for p in [
        *(p for p in opt.glob(".fetch.*") if p.name != ".fetch.lock"), *opt.glob(".stage.*"),
        *root.rglob("*.tmp.*")])


def check_whole(root: Path, currents: tuple[str, ...]) -> None:
    """Right after a kill: current is one of currents, complete; every folder under a real
    driver name, previous and each staged one are complete too."""
    opt = root / "opt/nvidia"
    assert os.readlink(opt / "current") in currents
    for entry in opt.glob(f"{VERSION}-*"):
        assert complete(root, entry.name), entry.name
    if (opt / "previous").is_symlink():
        assert complete(root, os.readlink(opt / "previous"))
    if (opt / "staged").exists():
        for line in (opt / "staged").read_text().splitlines():
            assert complete(root, line.split()[0]), line


@dataclass
class Faults:
    commands: int = 0
    points: int = 0
    reruns: int = 0
    known: dict[str, list[str]] = field(default_factory=dict)  # bug -> its kill points


def check_fetch_faults(tmp_path: Path, start: Path, killer: FetchKiller,
                       argv: Callable[[Path], list[str | Path]], currents: tuple[str, ...],
                       settled: Callable[[Path], None]) -> Faults:
    """Kill argv(root) over a copy of `start` at every kill point; check the tree; run it
    again as a node would; compare with an uninterrupted run's tree. Nothing legitimately
    differs: the fetch lock file, the install lock, the module list and device nodes the
    stand-ins keep are the same however often the boot ran. A rerun depends on nothing but
    the tree it starts from (temporary names aside: the scripts find them by pattern), so
    a tree seen after an earlier kill is not run again."""
    reference, plain = tmp_path / "reference", tmp_path / "plain"
    shutil.copytree(start, reference, symlinks=True)
    shutil.copytree(start, plain, symlinks=True)
    assert killer.run(argv(reference), reference) == 0
    called = killer.called()
    assert killer.run_plain(argv(plain), plain) == 0
    settled(reference)
    assert leftovers(reference) == []
    expected = snapshot(reference)
    assert snapshot(plain) == expected  # the wrappers change nothing
    faults = Faults(commands=len(called))
    seen: dict[tuple[tuple[str, str], ...], set[str]] = {}  # tree -> the bugs its rerun shows
    for at, when in [*((at, "before") for at in called),
                     *((at, "after") for at, name in called.items() if name in CHANGING)]:
        where = f"{when} {called[at]} (call {at})"
        faults.points += 1
        root = tmp_path / f"root-{at}-{when}"
        shutil.copytree(start, root, symlinks=True)
        code = killer.run(argv(root), root, at=at, when=when)
        assert code == -signal.SIGKILL, (where, code)
        check_whole(root, currents)
        tree = tuple(sorted((TEMPORARY.sub(r"\1*", path), value)
                            for path, value in snapshot(root).items()))
        if tree not in seen:
            faults.reruns += 1
            assert killer.run_plain(argv(root), root) == 0, where
            settled(root)
            got = snapshot(root)
            differ = {p for p in expected.keys() | got.keys() if expected.get(p) != got.get(p)}
            seen[tree] = set()
            for path in sorted(differ | set(leftovers(root))):
                bug = known_bug(root, path)
                assert bug is not None, (where, path, expected.get(path), got.get(path))
                seen[tree].add(bug)
        for bug in seen[tree]:
            faults.known.setdefault(bug, []).append(where)
        shutil.rmtree(root)
    return faults


def report(faults: Faults, bugs: set[str]) -> None:
    """Print the counts; xfail when the known bugs (exactly those this test shows) showed."""
    print(f"{faults.commands} commands, {faults.points} kill points, {faults.reruns} reruns")
    for bug, points in faults.known.items():
        print(f"{bug}: {len(points)} kill points: {', '.join(points)}")
    assert set(faults.known) == bugs, "fixed? then take it out of KNOWN_BUGS and bugs"
    if faults.known:
        pytest.xfail("; ".join(f"{bug} left after {len(found)} kill point(s), the first {found[0]}"
                               for bug, found in faults.known.items()))


def test_killed_boot_time_fetch(tmp_path: Path, fetched: Fetched, served: Repository) -> None:
    """startup.sh on a kernel no installed folder has modules for: fetch, verify, extract,
    install --stage, switch, load; killed at every command, then booted again."""
    node = node_with(tmp_path, fetched.a)
    node.add_update_engine()  # a Flatcar node has one, idle; the boot does not ask it
    a, b = bundle_name(fetched.a), bundle_name(fetched.b)
    killer = FetchKiller(tmp_path, node, {"FAKE_KERNEL": CLOUD,
                                          "NVIDIA_REPOSITORY_URL": served.url})

    def booted(root: Path) -> None:
        opt = root / "opt/nvidia"
        assert (os.readlink(opt / "current"), os.readlink(opt / "previous")) == (b, a)

    faults = check_fetch_faults(
        tmp_path, node.root, killer, lambda root: [root / "opt/nvidia/startup.sh", "--root", root],
        (a, b), booted)
    assert faults.points >= 150, faults
    report(faults, set())


def test_killed_staging_of_an_update(tmp_path: Path, fetched: Fetched,
                                     served: Repository) -> None:
    """fetch.sh --update with an OS update waiting for its reboot: B staged beside A, which
    stays current."""
    node = node_with(tmp_path, fetched.a)
    node.add_update_engine(NEED_REBOOT, CLOUD_RELEASE.version)
    a, b = bundle_name(fetched.a), bundle_name(fetched.b)
    killer = FetchKiller(tmp_path, node, {"NVIDIA_REPOSITORY_URL": served.url})

    def staged(root: Path) -> None:
        opt = root / "opt/nvidia"
        assert os.readlink(opt / "current") == a
        assert (opt / "staged").read_text() == f"{b} {CLOUD_RELEASE.version}\n"

    faults = check_fetch_faults(
        tmp_path, node.root, killer,
        lambda root: [root / "opt/nvidia/current/node/fetch.sh", "--root", root, "--update"],
        (a,), staged)
    assert faults.points >= 100, faults
    report(faults, set())


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace sees the PATH lookups")
@pytest.mark.parametrize("boot", [True, False], ids=["boot", "update"])
def test_the_fetch_kill_points_are_every_command(tmp_path: Path, fetched: Fetched,
                                                 served: Repository, boot: bool) -> None:
    """No command of these runs is looked up on PATH and missed: a missing wrapper is no
    kill point, and where its command may fail (nproc, dmesg) nothing else would tell."""
    node = node_with(tmp_path, fetched.a)
    if boot:
        node.add_update_engine()
        killer = FetchKiller(tmp_path, node, {"FAKE_KERNEL": CLOUD,
                                              "NVIDIA_REPOSITORY_URL": served.url})
        argv: list[str | Path] = [node.root / "opt/nvidia/startup.sh", "--root", node.root]
    else:
        node.add_update_engine(NEED_REBOOT, CLOUD_RELEASE.version)
        killer = FetchKiller(tmp_path, node, {"NVIDIA_REPOSITORY_URL": served.url})
        argv = [node.root / "opt/nvidia/current/node/fetch.sh", "--root", node.root, "--update"]
    traces = tmp_path / "traces"  # one file per process: no call split across lines
    traces.mkdir()
    assert killer.run(argv, node.root, prefix=(
        str(shutil.which("strace")), "-ff", "-qq", "-e", "trace=execve,stat,newfstatat,statx",
        "-o", str(traces / "t"))) == 0
    looked_up = [found for trace in traces.iterdir() for found in re.findall(
        rf'"{re.escape(str(killer.bin))}/([^"/]+)", .*= (-?\d+)', trace.read_text())]
    assert {name for name, rc in looked_up if rc != "0"} == set()
    assert {name for name, rc in looked_up if rc == "0"} >= set(killer.called().values())
