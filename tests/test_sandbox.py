"""Sandbox runners: argv translation (pure), and every backend that runs here, for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coreos_gpu import sandbox
from coreos_gpu.cache import link_tree
from coreos_gpu.config import Runtime
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.sandbox import (
    DEFAULT_ENV,
    Bind,
    EngineOptions,
    SandboxSpec,
    Tmpfs,
    check_runtime,
    choose_runtime,
    image_name,
    run_in_sandbox,
    sandbox_argv,
)

from .conftest import REPO, CliResult, make_busybox_root, run_cli
from .test_run import processes_with

# What podman needs on this machine kind (DESIGN "Recipes"): no CAP_SYS_RESOURCE, hybrid cgroups.
PODMAN_GLOBAL = ("--storage-driver", "vfs", "--cgroup-manager=cgroupfs",
                 "--events-backend=file", "--runtime", "runc")
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
PODMAN = EngineOptions(PODMAN_GLOBAL, ULIMITS)
# docker is podman behind a wrapper script (no Docker engine runs here), which adds the
# global options itself; the run options come through EngineOptions like a real user's would.
DOCKER = EngineOptions((), ULIMITS)
REAL = [Runtime.BWRAP, Runtime.PODMAN, Runtime.DOCKER, Runtime.NSPAWN, Runtime.CHROOT]
IMAGE_KEY = f"test-{uuid.uuid4().hex[:12]}"

# ---------------------------------------------------------------- pure: argv translation

SPEC = SandboxSpec(Path("/r"), (Bind(Path("/h/src"), "/src", readonly=True),
                                Bind(Path("/h/out"), "/out"), Tmpfs("/scratch")),
                   workdir="/src", env={"A": "1 2"})
ENV_E = [f"--env={k}={v}" for k, v in {**DEFAULT_ENV, "A": "1 2"}.items()]
ENV_SETENV = [a for k, v in {**DEFAULT_ENV, "A": "1 2"}.items() for a in ("--setenv", k, v)]
ENGINE_COMMON = ["--rm", "--network", "none", "--security-opt", "label=disable"]


@pytest.mark.parametrize(("runtime", "kwargs", "expected"), [
    (Runtime.BWRAP, {}, [
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--bind", "/r", "/",
        "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--ro-bind", "/h/src", "/src",
        "--bind", "/h/out", "/out", "--tmpfs", "/scratch", "--chdir", "/src", "--clearenv",
        *ENV_SETENV, "--", "make", "-j2"]),
    (Runtime.BWRAP, {"interactive": True, "tty": True}, [
        "bwrap", "--unshare-all", "--die-with-parent", "--bind", "/r", "/",
        "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--ro-bind", "/h/src", "/src",
        "--bind", "/h/out", "/out", "--tmpfs", "/scratch", "--chdir", "/src", "--clearenv",
        *ENV_SETENV, "--", "make", "-j2"]),
    (Runtime.PODMAN, {"engine_options": EngineOptions(("--g",), ("--r",)), "name": "n"}, [
        "podman", "--g", "run", "--r", *ENGINE_COMMON, "--tmpfs", "/tmp:rw,notmpcopyup",
        "--name", "n", "-v", "/h/src:/src:ro", "-v", "/h/out:/out",
        "--tmpfs", "/scratch:rw,notmpcopyup", "-w", "/src", *ENV_E, "--rootfs", "/r",
        "make", "-j2"]),
    (Runtime.PODMAN, {"interactive": True, "tty": True}, [
        "podman", "run", *ENGINE_COMMON, "--tmpfs", "/tmp:rw,notmpcopyup",
        "-v", "/h/src:/src:ro", "-v", "/h/out:/out", "--tmpfs", "/scratch:rw,notmpcopyup",
        "-w", "/src", *ENV_E, "-i", "-t", "--rootfs", "/r", "make", "-j2"]),
    (Runtime.DOCKER, {"image": "img:k", "interactive": True}, [
        "docker", "run", *ENGINE_COMMON, "--tmpfs", "/tmp", "-v", "/h/src:/src:ro",
        "-v", "/h/out:/out", "--tmpfs", "/scratch", "-w", "/src", *ENV_E, "-i", "img:k",
        "make", "-j2"]),
    (Runtime.NSPAWN, {}, [
        "systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--as-pid2", "-D", "/r",
        "--private-network", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
        "--console=pipe", "--tmpfs=/tmp", "--bind-ro=/h/src:/src", "--bind=/h/out:/out",
        "--tmpfs=/scratch", "--chdir=/src",
        *[f"--setenv={k}={v}" for k, v in {**DEFAULT_ENV, "A": "1 2"}.items()],
        "--", "make", "-j2"]),
])
def test_sandbox_argv(runtime: Runtime, kwargs: dict[str, object], expected: list[str]) -> None:
    assert sandbox_argv(SPEC, ["make", "-j2"], runtime=runtime, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("runtime", "isolated", "shared"), [
    (Runtime.BWRAP, None, "--share-net"),
    (Runtime.PODMAN, "none", "host"),
    (Runtime.NSPAWN, "--private-network", None),
    (Runtime.CHROOT, "--net", None),
])
def test_network_only_when_asked(runtime: Runtime, isolated: str | None,
                                 shared: str | None) -> None:
    off = sandbox_argv(SPEC, ["true"], runtime=runtime)
    on = sandbox_argv(SandboxSpec(Path("/r"), network=True), ["true"], runtime=runtime)
    for argv, present, absent in ((off, isolated, shared), (on, shared, isolated)):
        assert present is None or present in argv
        assert absent is None or absent not in argv


def test_chroot_argv_quotes_everything() -> None:
    spec = SandboxSpec(Path("/r o"), (Bind(Path("/h/it's"), "/in", readonly=True),),
                       workdir="/w d", env={"A": "$(reboot)"})
    argv = sandbox_argv(spec, ["sh", "-c", "echo $HOME"], runtime=Runtime.CHROOT)
    assert argv[:-1] == ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork",
                         "--kill-child", "--propagation", "private", "sh", "-c"]
    script = argv[-1]
    assert "r='/r o'" in script
    assert "mount --bind '/h/it'\"'\"'s' \"$r\"/in" in script
    assert 'mount -o remount,bind,ro "$r"/in' in script
    assert "'A=$(reboot)'" in script and "'echo $HOME'" in script and "'/w d'" in script


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: Bind(Path("/a"), "relative"), "absolute"),
    (lambda: Bind(Path("/a:b"), "/x"), "':'"),
    (lambda: Tmpfs("/"), "normalized"),
    (lambda: Tmpfs("/a/../b"), "normalized"),
    (lambda: SandboxSpec(Path("/r"), env={"A B": "1"}), "variable name"),
])
def test_bad_specs_are_config_errors(make: object, expected: str) -> None:
    with pytest.raises(CoreosGpuError, match=expected) as e:
        make()  # type: ignore[operator]
    assert e.value.code is ExitCode.CONFIG


def test_image_name_makes_a_valid_tag() -> None:
    assert image_name("sha256:0a1b") == "coreos-gpu-devroot:sha256-0a1b"
    with pytest.raises(ValueError, match="image_key"):
        image_name("")


# ---------------------------------------------------------------- preflight and detection

def _fake_tool(folder: Path, name: str, script: str = "exit 0") -> None:
    (folder / name).write_text(f"#!/bin/sh\n{script}\n")
    (folder / name).chmod(0o755)


def test_missing_tool_names_the_debian_package(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    for runtime, package in [(Runtime.BWRAP, "bubblewrap"), (Runtime.DOCKER, "docker.io"),
                             (Runtime.NSPAWN, "systemd-container"), (Runtime.PODMAN, "podman"),
                             (Runtime.CHROOT, "util-linux")]:
        with pytest.raises(CoreosGpuError) as e:
            check_runtime(runtime)
        assert e.value.code is ExitCode.TOOL and package in e.value.hint


@pytest.mark.parametrize("runtime", [Runtime.NSPAWN, Runtime.CHROOT])
def test_root_only_runtimes_refuse_users(runtime: Runtime, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for tool in ("systemd-nspawn", "unshare", "mount", "chroot"):
        _fake_tool(tmp_path, tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CoreosGpuError, match="needs root") as e:
        check_runtime(runtime)
    assert e.value.code is ExitCode.CONFIG


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test probes anew: the cache lasts one run, and PATH changes between tests."""
    monkeypatch.setattr(sandbox, "_PROBES", {})
    monkeypatch.setattr(sandbox, "_CHOICES", {})


RLIMIT_ERROR = ('echo "Error: crun: setrlimit \\`RLIMIT_NPROC\\`: Operation not permitted: '
                'OCI permission denied" >&2; exit 126')
TAR = shutil.which("tar") or "/usr/bin/tar"
NO_ENGINE = 'echo "Cannot connect to the Docker daemon at unix:///x.sock" >&2; exit 1'


def _recording_tool(folder: Path, name: str, script: str) -> None:
    _fake_tool(folder, name, f'printf "%s\\n" "$*" >> {folder}/{name}.calls\n{script}')


def _calls(folder: Path, name: str) -> list[str]:
    path = folder / f"{name}.calls"
    return path.read_text().splitlines() if path.exists() else []


def test_auto_takes_the_first_runtime_that_passes_its_probe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tools, root = tmp_path / "bin", tmp_path / "root"
    tools.mkdir()
    root.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # rules out nspawn and chroot
    with pytest.raises(CoreosGpuError, match="no sandbox works here") as e:
        choose_runtime(Runtime.AUTO, root)
    assert e.value.code is ExitCode.TOOL
    assert "podman: the podman sandbox needs podman, which is not on PATH" in e.value.message
    assert "nspawn: the nspawn sandbox needs systemd-nspawn" in e.value.message

    monkeypatch.setattr(sandbox, "_PROBES", {})
    monkeypatch.setattr(sandbox, "_CHOICES", {})
    _recording_tool(tools, "podman", RLIMIT_ERROR)  # installed, `podman info` would answer
    _recording_tool(tools, "docker", NO_ENGINE)
    (tools / "tar").symlink_to(TAR)  # docker imports the root with it
    _recording_tool(tools, "bwrap", "exit 0")
    capsys.readouterr()
    options = EngineOptions(("--g",), ("--r",))
    choice = choose_runtime(Runtime.AUTO, root, options, image_key="k")
    assert choice.runtime is Runtime.BWRAP and choice.requested is Runtime.AUTO
    podman, docker, bwrap = choice.probes
    assert (podman.runtime, podman.ok, docker.ok, bwrap.ok) == (Runtime.PODMAN, False, False,
                                                                True)
    assert "exit code 126" in podman.reason and "RLIMIT_NPROC" in podman.reason
    assert "podman_options / podman_run_options" in podman.reason
    assert "Cannot connect to the Docker daemon" in docker.reason
    # The probe is a trivial command in the root, with the options the build gets.
    [probed] = _calls(tools, "podman")
    assert probed.startswith("--g run --r --rm --network none")
    assert probed.endswith(f"--rootfs {root} /bin/sh -c exec \"$@\" 2>&1 sh sh -c :")
    assert _calls(tools, "bwrap")[0].endswith("-- sh -c :")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"    sandbox: podman skipped: {podman.reason}",
                     f"    sandbox: docker skipped: {docker.reason}",
                     "    sandbox: bwrap (runtime auto: the first of podman, docker, bwrap, "
                     "nspawn, chroot that runs sh -c : in the root)"]
    assert choice.to_json() == {"requested": "auto", "runtime": "bwrap", "probes": [
        {"runtime": "podman", "ok": False, "reason": podman.reason},
        {"runtime": "docker", "ok": False, "reason": docker.reason},
        {"runtime": "bwrap", "ok": True, "reason": ""}]}

    # Once per run: every later sandbox uses the choice without probing again, and says so.
    engine_calls = _calls(tools, "podman") + _calls(tools, "docker")
    for n in range(2):
        taken = run_in_sandbox(SandboxSpec(root), ["make"], runtime=Runtime.AUTO,
                               log_file=tmp_path / f"{n}.log", what="x",
                               engine_options=options, image_key="k")
        assert taken == choice
    assert _calls(tools, "podman") + _calls(tools, "docker") == engine_calls
    assert [c.endswith("-- sh -c :") for c in _calls(tools, "bwrap")] == [True, False, False]
    assert capsys.readouterr().err == ""


def test_an_explicit_runtime_is_never_replaced(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tools, root = tmp_path / "bin", tmp_path / "root"
    tools.mkdir()
    root.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    _recording_tool(tools, "podman", RLIMIT_ERROR)
    _recording_tool(tools, "docker", NO_ENGINE)
    (tools / "tar").symlink_to(TAR)
    _recording_tool(tools, "bwrap", "exit 0")
    log = tmp_path / "build.log"
    with pytest.raises(CoreosGpuError) as e:
        run_in_sandbox(SandboxSpec(root), ["make"], runtime=Runtime.PODMAN, log_file=log,
                       what="x", image_key="k")
    assert e.value.code is ExitCode.COMMAND
    assert e.value.message.startswith(f"the podman sandbox cannot run a command in {root}: "
                                      "sh -c : in the root failed with exit code 126")
    assert e.value.hint.startswith('bwrap passes the same probe here: use --runtime bwrap (or '
                                   'runtime = "auto"); or: ')
    assert "podman_options" in e.value.hint and "podman_run_options" in e.value.hint
    assert not log.exists() and not any(c.endswith(" make") for c in _calls(tools, "bwrap"))
    _fake_tool(tools, "bwrap", "exit 1")
    monkeypatch.setattr(sandbox, "_PROBES", {})
    with pytest.raises(CoreosGpuError) as e:
        choose_runtime(Runtime.PODMAN, root, image_key="k")
    assert e.value.hint.startswith("no other installed sandbox passes it either; or: ")


def test_each_root_is_probed_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe runs in the root: a root without a working sh fails it, whatever another
    # root did, and each root's answer is kept for that root only.
    tools, good, bad = tmp_path / "bin", tmp_path / "good", tmp_path / "bad"
    for folder in (tools, good, bad):
        folder.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    _recording_tool(tools, "bwrap", f'case "$*" in *" {bad} / "*) echo "no sh" >&2; exit 1;; '
                    "esac")
    assert choose_runtime(Runtime.BWRAP, good).runtime is Runtime.BWRAP
    with pytest.raises(CoreosGpuError, match="no sh") as e:
        choose_runtime(Runtime.BWRAP, bad)
    assert e.value.message.startswith(f"the bwrap sandbox cannot run a command in {bad}: ")
    assert choose_runtime(Runtime.BWRAP, good).runtime is Runtime.BWRAP
    probed = _calls(tools, "bwrap")
    assert len(probed) == 2 and f" {good} / " in probed[0] and f" {bad} / " in probed[1]


@pytest.mark.parametrize(("failure", "settings"), [
    (RLIMIT_ERROR, True),
    ('echo "error setting rlimit type 7: operation not permitted" >&2; exit 125', True),
    ('echo "Error: OCI runtime error: crun: cannot set cgroup limit" >&2; exit 126', True),
    ('echo "kernel/cgroup/cgroup.c: error: expected ;" >&2; exit 2', False),  # the build's own
])
def test_an_engine_limits_error_names_the_settings(failure: str, settings: bool, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "root").mkdir()
    # It passes the probe; the build itself then fails as given.
    _fake_tool(tmp_path, "podman", f'case "$*" in *" sh -c :") exit 0;; esac\n{failure}')
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CoreosGpuError) as e:
        run_in_sandbox(SandboxSpec(tmp_path / "root"), ["make"], runtime=Runtime.PODMAN,
                       log_file=tmp_path / "log", what="compiling")
    assert e.value.message.startswith("compiling failed with exit code")
    assert "to reproduce: podman run " in e.value.hint
    assert ("podman_options" in e.value.hint and "podman_run_options" in e.value.hint) is settings


# ---------------------------------------------------------------- real sandboxes

@pytest.fixture(scope="session")
def devroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny root file system: busybox (and the libraries it links), like a dev container."""
    root = make_busybox_root(tmp_path_factory.mktemp("devroot"))
    (root / "marker").write_text("devroot\n")
    (root / "tmp/stale").write_text("must not show through the tmpfs\n")
    return root


@pytest.fixture(scope="session")
def docker_wrapper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("fake-docker")
    (folder / "calls").touch()
    _fake_tool(folder, "docker", f'echo "$*" >> {folder}/calls\n'
               f'exec podman {" ".join(PODMAN_GLOBAL)} "$@"')
    yield folder
    if shutil.which("podman"):
        subprocess.run(["podman", *PODMAN_GLOBAL, "rmi", "-f", image_name(IMAGE_KEY)],
                       capture_output=True, check=False)


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
            docker_wrapper: Path) -> Runtime:
    runtime: Runtime = request.param
    if runtime is Runtime.DOCKER:
        if shutil.which("podman") is None:
            pytest.skip("the docker test runs podman behind a docker wrapper: no podman")
        monkeypatch.setenv("PATH", f"{docker_wrapper}{os.pathsep}{os.environ['PATH']}")
    try:
        check_runtime(runtime)
    except CoreosGpuError as e:
        pytest.skip(f"{e} ({e.hint})")
    return runtime


def _run(spec: SandboxSpec, argv: list[str], runtime: Runtime, log: Path,
         **kwargs: object) -> None:
    options = DOCKER if runtime is Runtime.DOCKER else PODMAN
    run_in_sandbox(spec, argv, runtime=runtime, log_file=log, what="the test command",
                   engine_options=options, image_key=IMAGE_KEY, **kwargs)  # type: ignore[arg-type]


PROBE = r"""
echo "marker=$(cat /marker)"
echo "pwd=$(pwd)"
echo "var=$COREOS_GPU_VAR"
echo "leak=${COREOS_GPU_HOST_ONLY-unset}"
echo "path=$PATH"
echo "tmp=$(ls -A /tmp)"
touch /tmp/probe && echo tmp_writable=yes
echo written > /out/from-sandbox
touch /in/probe 2>/dev/null && echo ro=writable || echo ro=readonly
echo "ifaces=$(sed -n 's/^ *\([^:|]*\):.*/\1/p' /proc/net/dev | tr '\n' ' ')"
test -c /dev/null && echo devnull=yes
"""


@pytest.mark.parametrize("backend", REAL, indirect=True)
def test_sandbox_isolates(backend: Runtime, devroot: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("COREOS_GPU_HOST_ONLY", "leaked")
    spec = SandboxSpec(devroot, (Bind(tmp_path / "in", "/in", readonly=True),
                                 Bind(tmp_path / "out", "/out")),
                       workdir="/out", env={"COREOS_GPU_VAR": "a b"})
    lines: list[str] = []
    _run(spec, ["sh", "-c", PROBE], backend, tmp_path / "log" / "build.log",
         progress=lines.append)
    log = (tmp_path / "log" / "build.log").read_text()
    found = {m[1]: m[2] for m in re.finditer(r"^([a-z_]+)=(.*)$", log, re.MULTILINE)}
    assert found["marker"] == "devroot"
    assert found["pwd"] == "/out"
    assert found["var"] == "a b"
    assert found["leak"] == "unset"
    assert found["path"] == DEFAULT_ENV["PATH"]
    assert found["tmp"] == "" and found["tmp_writable"] == "yes"
    assert (tmp_path / "out/from-sandbox").read_text() == "written\n"
    assert found["ro"] == "readonly" and not (tmp_path / "in/probe").exists()
    assert found["ifaces"].split() == ["lo"]
    assert found["devnull"] == "yes"
    assert "marker=devroot" in lines and "pwd=/out" in lines


@pytest.mark.parametrize("backend", REAL, indirect=True)
def test_failure_shows_tail_and_keeps_full_log(backend: Runtime, devroot: Path,
                                               tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    with pytest.raises(CoreosGpuError) as e:
        _run(SandboxSpec(devroot), ["sh", "-c", "seq 1 5000; echo oops >&2; exit 3"],
             backend, log)
    message = str(e.value)
    assert e.value.code is ExitCode.COMMAND
    assert "the test command failed with exit code 3" in message
    assert f"full log: {log}" in message and "oops" in message
    assert "5000" in message.splitlines() and "4970" not in message.splitlines()
    assert e.value.hint.startswith("to reproduce: ")
    lines = log.read_text().splitlines()
    assert [str(n) for n in range(1, 5001)] == [x for x in lines if x.isdigit()]


@pytest.mark.parametrize("backend", REAL, indirect=True)
def test_timeout_stops_everything(backend: Runtime, devroot: Path, tmp_path: Path) -> None:
    seconds = str(40000 + uuid.uuid4().int % 9999)  # a sleep no one else runs
    start = time.monotonic()
    with pytest.raises(CoreosGpuError, match="did not finish within 1 s"):
        _run(SandboxSpec(devroot), ["sh", "-c", f"echo started; sleep {seconds}"], backend,
             tmp_path / "log", timeout=1)
    assert time.monotonic() - start < 20
    for _ in range(50):
        if not processes_with(f"sleep\0{seconds}"):
            break
        time.sleep(0.1)
    assert processes_with(f"sleep\0{seconds}") == []


@pytest.mark.parametrize("backend", REAL, indirect=True)
def test_interactive_gets_the_terminal(backend: Runtime, devroot: Path, tmp_path: Path) -> None:
    options = DOCKER if backend is Runtime.DOCKER else PODMAN
    (tmp_path / "shell.py").write_text(
        "import sys\nfrom pathlib import Path\nfrom coreos_gpu.config import Runtime\n"
        "from coreos_gpu.sandbox import EngineOptions, SandboxSpec, run_interactive\n"
        f"sys.exit(run_interactive(SandboxSpec(Path({str(devroot)!r})), ['sh', '-c', "
        "'test -t 0 && echo TTY; read x; echo got=$x; exit 7'], "
        f"runtime=Runtime.{backend.name}, engine_options={options!r}, "
        f"image_key={IMAGE_KEY!r}))\n")
    # `script` gives the child a pseudo-terminal, as a user's shell would have.
    proc = subprocess.run(["script", "-qec", f"{sys.executable} {tmp_path}/shell.py",
                           "/dev/null"], input="hello\n", capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO)
    assert "TTY" in proc.stdout and "got=hello" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 7


@pytest.mark.parametrize("backend", [Runtime.DOCKER], indirect=True)
def test_docker_imports_the_root_once(backend: Runtime, devroot: Path, tmp_path: Path,
                                      docker_wrapper: Path) -> None:
    for n in range(2):
        _run(SandboxSpec(devroot), ["cat", "/marker"], backend, tmp_path / f"{n}.log")
    imports = [c for c in (docker_wrapper / "calls").read_text().splitlines()
               if c.startswith("import ")]
    assert imports == [f"import - {image_name(IMAGE_KEY)}"]


def test_chroot_refuses_mount_points_through_symlinks(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("chroot needs root and unshare")
    (tmp_path / "root").mkdir()
    (tmp_path / "root/work").symlink_to("/tmp")  # on the host this is the host's /tmp
    spec = SandboxSpec(tmp_path / "root", (Bind(tmp_path, "/work/out"),))
    with pytest.raises(CoreosGpuError, match="crosses a symlink") as e:
        run_in_sandbox(spec, ["true"], runtime=Runtime.CHROOT, log_file=tmp_path / "log",
                       what="x")
    assert e.value.code is ExitCode.CONFIG and not (tmp_path / "log").exists()


# ---------------------------------------------------------------- auto on a real developer root

# A real kbuild build of a one-file module, inside the developer container's /tmp.
HELLO_MODULE = r"""set -e
mkdir /tmp/hello && cd /tmp/hello
printf '#include <linux/module.h>\nMODULE_LICENSE("GPL");\n' > hello.c
echo 'obj-m := hello.o' > Kbuild
make -s -C /usr/lib/modules/*/build M=/tmp/hello CC=gcc-12 modules 2>&1
echo "vermagic=$(modinfo -F vermagic hello.ko)"
"""


@pytest.mark.slow
def test_auto_skips_a_podman_that_cannot_start_and_builds(  # type: ignore[no-untyped-def]
        http_dir, flatcar_release, tmp_path: Path) -> None:
    link_tree(flatcar_release.server_root, http_dir.root)
    # Only podman is faked: it fails as it does where it may not set rlimits.
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    _recording_tool(wrapper, "podman", RLIMIT_ERROR)
    env = {"PATH": f"{wrapper}{os.pathsep}{os.environ['PATH']}"}
    source = ("--mirror", http_dir.url, "--release", flatcar_release.version,
              "--signing-key-fingerprint", flatcar_release.key_fingerprint)
    work = tmp_path / "work"
    work.mkdir()

    def cli(*argv: str) -> CliResult:
        return run_cli(*argv, cwd=work, env=env, cache=tmp_path / "cache")

    prepared = cli("devcontainer", "prepare", *source)
    assert prepared.code == 0, prepared.stderr
    # The preparation asks the compiler in the sandbox: it probed podman once too.
    assert len(_calls(wrapper, "podman")) == 1
    (wrapper / "podman.calls").unlink()
    built = cli("devcontainer", "run", *source, "--", "sh", "-c", HELLO_MODULE)
    assert built.code == 0, built.stdout + built.stderr
    assert "vermagic=6.1.0-50-amd64 SMP" in built.stdout
    lines = built.stderr.splitlines()
    skipped = [line for line in lines if line.startswith("    sandbox: podman skipped: ")]
    assert len(skipped) == 1 and "RLIMIT_NPROC" in skipped[0], built.stderr
    [chosen] = [line for line in lines if "(runtime auto: the first of" in line]
    taken = chosen.split()[1]
    assert taken in {"docker", "bwrap", "nspawn", "chroot"}
    assert len(_calls(wrapper, "podman")) == 1  # the probe only: podman ran nothing else

    # An explicit podman is not replaced: it fails, and says which runtime works here.
    refused = cli("devcontainer", "run", *source, "--runtime", "podman", "--", "true")
    assert refused.code == ExitCode.COMMAND
    [error, hint] = refused.error_lines
    assert error.startswith("coreos-gpu: error: the podman sandbox cannot run a command in ")
    assert "RLIMIT_NPROC" in error
    assert f"use --runtime {taken} " in hint
    assert "podman_options" in hint and "podman_run_options" in hint


@pytest.mark.slow
def test_build_says_which_sandbox_it_used(build_bundle) -> None:  # type: ignore[no-untyped-def]
    # The build test's open bundle, which compiles in the session (the proprietary one takes
    # the first sync's modules, and a build that compiles nothing starts no sandbox): its
    # JSON names the sandbox.
    shown = json.loads(build_bundle("--kernel-module-type", "open").result.stdout)
    assert shown["sandbox"] == {"requested": "bwrap", "runtime": "bwrap", "probes": [
        {"runtime": "bwrap", "ok": True, "reason": ""}]}
