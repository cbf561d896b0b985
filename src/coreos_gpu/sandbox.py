"""Run a command inside a root file system folder (the developer container), in a sandbox.

Callers describe the sandbox once (`SandboxSpec`: root, binds, tmpfs, workdir, env); each
backend translates it into its own command line. Every sandbox gets /proc, a minimal /dev,
an empty tmpfs on /tmp, no network, and only the environment the spec gives. Which backend
works here is probed in the root; run.run() starts the process, given a `Sandbox`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import re
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from coreos_gpu import ui
from coreos_gpu.config import Runtime
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.run import Progress, run

# The host's environment (locale, proxies, CC, MAKEFLAGS...) must not change a module build;
# LC_ALL=C also keeps gcc's messages in the log in English.
DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LC_ALL": "C"}
DETECTION_ORDER = (Runtime.PODMAN, Runtime.DOCKER, Runtime.BWRAP, Runtime.NSPAWN, Runtime.CHROOT)
ENGINES = (Runtime.PODMAN, Runtime.DOCKER)
NEEDS_ROOT = (Runtime.NSPAWN, Runtime.CHROOT)
TOOLS: Mapping[Runtime, Mapping[str, str]] = {  # tool -> Debian package
    Runtime.PODMAN: {"podman": "podman"}, Runtime.DOCKER: {"docker": "docker.io", "tar": "tar"},
    Runtime.BWRAP: {"bwrap": "bubblewrap"}, Runtime.NSPAWN: {"systemd-nspawn": "systemd-container"},
    Runtime.CHROOT: {"unshare": "util-linux", "mount": "mount", "chroot": "coreutils"}}


def _check_path(path: str | Path, what: str) -> None:
    # podman -v, docker -v and nspawn --bind split their argument at ':' (and options at ',').
    text = os.path.abspath(path) if isinstance(path, Path) else path
    bad_target = what == "mount point" and (text == "/" or posixpath.normpath(text) != text)
    if ":" in text or "," in text or not text.startswith("/") or bad_target:
        raise CoreosGpuError(f"cannot use {what} {text!r} in a sandbox: it must be a normalized "
                             "absolute path (not /) without ':' or ','", code=ExitCode.CONFIG)


@dataclass(frozen=True)
class Bind:
    source: Path
    target: str
    readonly: bool = False

    def __post_init__(self) -> None:
        _check_path(self.source, "host path")
        _check_path(self.target, "mount point")


@dataclass(frozen=True)
class Tmpfs:
    target: str

    def __post_init__(self) -> None:
        _check_path(self.target, "mount point")


Mount = Bind | Tmpfs


@dataclass(frozen=True)
class SandboxSpec:
    root: Path
    mounts: tuple[Mount, ...] = ()
    workdir: str = "/"
    env: Mapping[str, str] = field(default_factory=dict)  # set over DEFAULT_ENV
    # Builds never need the network; only CoreOS's emerge recipe downloads its sources.
    network: bool = False

    def __post_init__(self) -> None:
        _check_path(self.root, "root folder")
        for name in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise CoreosGpuError(f"bad sandbox variable name {name!r}", code=ExitCode.CONFIG)

    @property
    def environment(self) -> dict[str, str]:
        return {**DEFAULT_ENV, **self.env}


@dataclass(frozen=True)
class EngineOptions:
    """Extra podman/docker options some hosts need (e.g. `--storage-driver vfs`)."""

    global_args: tuple[str, ...] = ()  # between `podman` and `run`
    run_args: tuple[str, ...] = ()  # after `run`


def image_name(image_key: str) -> str:
    """The docker image holding the root; the key (e.g. the image digest) keeps it current."""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", image_key)[:128]
    if not tag:
        raise ValueError("the docker runtime needs an image_key naming the root's contents")
    return f"coreos-gpu-devroot:{tag}"


def _engine_argv(engine: str, spec: SandboxSpec, argv: Sequence[str], opts: EngineOptions,
                 image: str, interactive: bool, tty: bool, name: str) -> list[str]:
    # podman copies what the root has at a --tmpfs target into it unless told not to; docker
    # never does, and rejects the option.
    tmpfs = ":rw,notmpcopyup" if engine == "podman" else ""
    # label=disable: SELinux hosts deny binds of unlabelled folders, and relabelling the
    # user's folders (`:z`) would be worse than not confining the build.
    args = [engine, *opts.global_args, "run", *opts.run_args, "--rm", "--network",
            "host" if spec.network else "none",
            "--security-opt", "label=disable", "--tmpfs", "/tmp" + tmpfs]
    args += ["--name", name] if name else []
    for m in spec.mounts:
        if isinstance(m, Bind):
            args += ["-v", f"{m.source.absolute()}:{m.target}" + (":ro" if m.readonly else "")]
        else:
            args += ["--tmpfs", m.target + tmpfs]
    args += ["-w", spec.workdir, *(f"--env={k}={v}" for k, v in spec.environment.items())]
    args += (["-i", "-t"] if tty else ["-i"]) if interactive else []
    # podman runs a folder as it is; docker only runs images (see _import_root).
    return [*args, *(["--rootfs", str(spec.root.absolute())] if engine == "podman" else [image]),
            *argv]


def _bwrap_argv(spec: SandboxSpec, argv: Sequence[str], interactive: bool) -> list[str]:
    # --new-session stops a batch command from typing into our terminal (TIOCSTI); a shell
    # needs the terminal as its controlling one.
    args = ["bwrap", "--unshare-all", *(["--share-net"] if spec.network else []),
            "--die-with-parent",
            *([] if interactive else ["--new-session"]), "--bind", str(spec.root.absolute()),
            "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for m in spec.mounts:
        if isinstance(m, Bind):
            args += ["--ro-bind" if m.readonly else "--bind", str(m.source.absolute()), m.target]
        else:
            args += ["--tmpfs", m.target]
    args += ["--chdir", spec.workdir, "--clearenv"]
    for k, v in spec.environment.items():
        args += ["--setenv", k, v]
    return [*args, "--", *argv]


def _nspawn_argv(spec: SandboxSpec, argv: Sequence[str], interactive: bool,
                 tty: bool) -> list[str]:
    # --as-pid2: a stub init reaps make's orphans. The *-off options keep the cached root as
    # it is (no resolv.conf, localtime or journal link written into it).
    args = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--as-pid2",
            "-D", str(spec.root.absolute()),
            *([] if spec.network else ["--private-network"]), "--resolv-conf=off",
            "--timezone=off", "--link-journal=no",
            "--console=" + ("interactive" if interactive and tty else "pipe"), "--tmpfs=/tmp"]
    for m in spec.mounts:
        if isinstance(m, Bind):
            flag = "--bind-ro" if m.readonly else "--bind"
            args.append(f"{flag}={m.source.absolute()}:{m.target}")
        else:
            args.append(f"--tmpfs={m.target}")
    args.append(f"--chdir={spec.workdir}")
    return [*args, *(f"--setenv={k}={v}" for k, v in spec.environment.items()), "--", *argv]


def _chroot_argv(spec: SandboxSpec, argv: Sequence[str]) -> list[str]:
    # The mounts must be made inside the new mount namespace, so unshare runs a generated
    # script in which every value is quoted. Private propagation keeps the mounts off the host.
    q = shlex.quote
    lines = ["set -e", f"r={q(str(spec.root.absolute()))}", 'mkdir -p "$r/proc" "$r/dev" "$r/tmp"',
             'mount -t proc proc "$r/proc"', 'mount -t tmpfs -o mode=755 tmpfs "$r/dev"',
             'mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"', 'ln -s /proc/self/fd "$r/dev/fd"']
    lines += [f'touch "$r/dev/{n}" && mount --bind /dev/{n} "$r/dev/{n}"'
              for n in ("null", "zero", "full", "random", "urandom", "tty")]
    lines += [f'ln -s /proc/self/fd/{i} "$r/dev/{n}"' for i, n in enumerate(("stdin", "stdout",
                                                                            "stderr"))]
    for m in spec.mounts:
        dst = '"$r"' + q(m.target)
        if isinstance(m, Tmpfs):
            lines.append(f"mkdir -p {dst} && mount -t tmpfs tmpfs {dst}")
            continue
        src = q(str(m.source.absolute()))
        lines.append(f'if [ -d {src} ]; then mkdir -p {dst}; else mkdir -p "$(dirname {dst})"'
                     f" && touch {dst}; fi; mount --bind {src} {dst}")
        lines += [f"mount -o remount,bind,ro {dst}"] if m.readonly else []
    env = " ".join(q(f"{k}={v}") for k, v in spec.environment.items())
    enter = q('cd "$1" && shift && exec "$@"')
    lines.append(f'c=$(command -v chroot); exec env -i {env} "$c" "$r" /bin/sh -c {enter} sh '
                 f"{q(spec.workdir)} {shlex.join(argv)}")
    return ["unshare", "--mount", "--pid", *([] if spec.network else ["--net"]), "--ipc",
            "--uts", "--fork", "--kill-child",
            "--propagation", "private", "sh", "-c", "\n".join(lines)]


def sandbox_argv(spec: SandboxSpec, argv: Sequence[str], *, runtime: Runtime,
                 engine_options: EngineOptions = EngineOptions(), image: str = "",
                 interactive: bool = False, tty: bool = False, name: str = "") -> list[str]:
    """The backend's command line that runs argv in the sandbox (no side effects)."""
    if runtime in ENGINES:
        return _engine_argv(runtime, spec, argv, engine_options, image, interactive, tty, name)
    if runtime is Runtime.BWRAP:
        return _bwrap_argv(spec, argv, interactive)
    if runtime is Runtime.NSPAWN:
        return _nspawn_argv(spec, argv, interactive, tty)
    if runtime is Runtime.CHROOT:
        return _chroot_argv(spec, argv)
    raise ValueError(f"resolve {runtime} to a concrete runtime first")


def check_runtime(runtime: Runtime) -> None:
    """Preflight: the backend's tools are installed and we may use it."""
    missing = {t: p for t, p in TOOLS[runtime].items() if shutil.which(t) is None}
    if missing:
        raise CoreosGpuError(
            f"the {runtime} sandbox needs {', '.join(missing)}, which is not on PATH",
            hint=f"install it (Debian: apt-get install {' '.join(missing.values())}) or "
            "choose another --runtime", code=ExitCode.TOOL)
    if runtime in NEEDS_ROOT and os.geteuid() != 0:
        raise CoreosGpuError(f"the {runtime} sandbox needs root", code=ExitCode.CONFIG,
                             hint="run as root, or use --runtime bwrap or podman")


# --- running in it (run.run takes a Sandbox) ---------------------------------------------

# podman and docker exit 125 (their own error) or 126 (the OCI runtime's) when they may not
# set the container's rlimits or use the host's cgroups: inside containers, on hybrid cgroup
# hosts, without CAP_SYS_RESOURCE. Their extra options fix that; the reproduce line does not.
_LIMITS_ERROR = re.compile(r"rlimit|cgroup", re.IGNORECASE)
ENGINE_SETTINGS_HINT = (
    "podman (or docker) may not set rlimits or use cgroups here: set podman_options (e.g. "
    '["--cgroup-manager=cgroupfs", "--runtime=runc"]) and podman_run_options (e.g. '
    '["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"]) in the config file, or '
    "--podman-option=... and --podman-run-option=... flags")


def _engine_limits(runtime: Runtime, code: int, tail: str) -> bool:
    return runtime in ENGINES and code in (125, 126) and bool(_LIMITS_ERROR.search(tail))


@dataclass(frozen=True)
class Sandbox:
    """A concrete sandbox for one command: what run.run() takes to run argv in it."""

    runtime: Runtime  # never auto
    spec: SandboxSpec
    options: EngineOptions = EngineOptions()
    image: str = ""  # docker's image of the root (_import_root)
    # An engine's container is named: killing its client would leave it running.
    name: str = field(default_factory=lambda: f"coreos-gpu-{os.getpid()}-{os.urandom(4).hex()}")

    def command(self, argv: Sequence[str], *, terminal: bool) -> list[str]:
        spec, engine = self.spec, self.runtime in ENGINES
        if terminal:
            # TERM: the one host variable a shell needs.
            if "TERM" in os.environ and "TERM" not in spec.env:
                spec = dataclasses.replace(spec, env={**spec.env, "TERM": os.environ["TERM"]})
            return sandbox_argv(spec, argv, runtime=self.runtime, engine_options=self.options,
                                image=self.image, interactive=True, tty=sys.stdin.isatty())
        if engine:
            # An engine carries stdout and stderr over separate streams, which reorders them:
            # a compiler error would land thousands of lines before the end of the log.
            argv = ["/bin/sh", "-c", 'exec "$@" 2>&1', "sh", *argv]
        return sandbox_argv(spec, argv, runtime=self.runtime, engine_options=self.options,
                            image=self.image, name=self.name if engine else "")

    def stop(self, pid: int) -> bool:
        if self.runtime in ENGINES:
            with contextlib.suppress(CoreosGpuError):  # already gone
                run([self.runtime, *self.options.global_args, "kill", self.name], timeout=60)
            return True
        if self.runtime is Runtime.NSPAWN:  # SIGKILLed it leaves its container running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            return True
        return False  # bwrap and unshare go with their process group

    def advice(self, code: int, output: str) -> str:
        return ENGINE_SETTINGS_HINT if _engine_limits(self.runtime, code, output) else ""


def _import_root(spec: SandboxSpec, image_key: str, opts: EngineOptions,
                 log: BinaryIO | None) -> str:
    """docker has no --rootfs: import the root as an image, once per key; return its name."""
    image = image_name(image_key)
    with contextlib.suppress(CoreosGpuError):
        run(["docker", *opts.global_args, "image", "inspect", image])
        return image
    # Numeric owners: names would map through the host's /etc/passwd. /tmp is a tmpfs anyway.
    tar = ["tar", "--numeric-owner", "--exclude=./tmp/*", "-C", str(spec.root.absolute()),
           "-cf", "-", "."]
    done = run(["docker", *opts.global_args, "import", "-", image], log=log,
               terminal=log is None, feed=tar, check=False)
    if done.returncode != 0:
        raise CoreosGpuError(f"importing {spec.root} as docker image {image} failed with exit "
                             f"code {done.returncode}\n{done.stdout}", code=ExitCode.COMMAND)
    return image


def open_sandbox(runtime: Runtime, spec: SandboxSpec, opts: EngineOptions, image_key: str,
                 log: BinaryIO | None) -> Sandbox:
    """The concrete runtime's Sandbox for spec (docker's needs its image: log gets its
    import's output; None: the terminal does)."""
    image = _import_root(spec, image_key, opts, log) if runtime is Runtime.DOCKER else ""
    return Sandbox(runtime, spec, opts, image)


# --- which sandbox works here -----------------------------------------------------------

# What a probe runs in the root: a sandbox that cannot start this cannot run the build.
PROBE_COMMAND = ("sh", "-c", ":")
PROBE_TIMEOUT = 60


@dataclass(frozen=True)
class Probe:
    """Whether a runtime ran PROBE_COMMAND in the root; if not, why, in one line."""

    runtime: Runtime
    ok: bool
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"runtime": self.runtime.value, "ok": self.ok, "reason": self.reason}


@dataclass(frozen=True)
class RuntimeChoice:
    """The sandbox a run uses: the one asked for (auto or a name), the one taken, the probes."""

    requested: Runtime
    runtime: Runtime
    probes: tuple[Probe, ...]  # in DETECTION_ORDER, the one taken last

    def to_json(self) -> dict[str, object]:
        return {"requested": self.requested.value, "runtime": self.runtime.value,
                "probes": [p.to_json() for p in self.probes]}


# A probe starts a container: each runtime is probed once per process for what its answer
# depends on: the root it runs in, the engine options, docker's image of the root, and the
# host's PATH and user (check_runtime). The choice is made once for the same.
_Key = tuple[Runtime, Path, EngineOptions, str, str, int]
_PROBES: dict[_Key, Probe] = {}
_CHOICES: dict[_Key, RuntimeChoice] = {}


def _key(runtime: Runtime, root: Path, opts: EngineOptions, image_key: str) -> _Key:
    return runtime, root.absolute(), opts, image_key, os.environ.get("PATH", ""), os.geteuid()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _probe(runtime: Runtime, root: Path, opts: EngineOptions, image_key: str) -> Probe:
    try:
        check_runtime(runtime)
        with tempfile.TemporaryFile() as log:
            sandbox = open_sandbox(runtime, SandboxSpec(root=root), opts, image_key, log)
            done = run(PROBE_COMMAND, sandbox=sandbox, log=log, timeout=PROBE_TIMEOUT,
                       check=False)
    except CoreosGpuError as e:  # not installed, not allowed, or docker cannot import the root
        return Probe(runtime, ok=False, reason=_last_line(e.message))
    if done.returncode == 0 and not done.timed_out:
        return Probe(runtime, ok=True)
    command = shlex.join(PROBE_COMMAND)
    if done.timed_out:
        return Probe(runtime, ok=False, reason=f"{command} did not finish within "
                     f"{PROBE_TIMEOUT} s")
    settings = (" (podman_options / podman_run_options)"
                if _engine_limits(runtime, done.returncode, done.stdout) else "")
    return Probe(runtime, ok=False, reason=f"{command} in the root failed with exit code "
                 f"{done.returncode}: {_last_line(done.stdout)}{settings}")


def probe_runtime(runtime: Runtime, root: Path, opts: EngineOptions = EngineOptions(),
                  image_key: str = "") -> Probe:
    """Whether runtime runs a trivial command in root, as the build will run it (cached)."""
    key = _key(runtime, root, opts, image_key)
    if key not in _PROBES:
        _PROBES[key] = _probe(runtime, root, opts, image_key)
    return _PROBES[key]


def choose_runtime(requested: Runtime, root: Path, opts: EngineOptions = EngineOptions(),
                   image_key: str = "") -> RuntimeChoice:
    """The sandbox to use in root: for auto, the first in DETECTION_ORDER that passes its
    probe; otherwise the one requested, which is never replaced: if it fails its probe, the
    error names the installed ones that pass."""
    key = _key(requested, root, opts, image_key)
    if key in _CHOICES:
        return _CHOICES[key]
    if requested is Runtime.AUTO:
        probes: list[Probe] = []
        for runtime in DETECTION_ORDER:
            probes.append(probe_runtime(runtime, root, opts, image_key))
            if probes[-1].ok:
                break
        else:
            raise CoreosGpuError(
                "no sandbox works here: " + "; ".join(f"{p.runtime}: {p.reason}" for p in probes),
                hint="install one (Debian: apt-get install bubblewrap, or podman); nspawn and "
                "chroot need root", code=ExitCode.TOOL)
        choice = RuntimeChoice(requested, probes[-1].runtime, tuple(probes))
        for p in probes[:-1]:
            ui.log(f"    sandbox: {p.runtime} skipped: {p.reason}")
        ui.log(f"    sandbox: {choice.runtime} (runtime auto: the first of "
               f"{', '.join(DETECTION_ORDER)} that runs {shlex.join(PROBE_COMMAND)} in the root)")
    else:
        probe = probe_runtime(requested, root, opts, image_key)
        if not probe.ok:
            raise _unusable(probe, root, opts, image_key)
        choice = RuntimeChoice(requested, requested, (probe,))
    _CHOICES[key] = choice
    return choice


def _unusable(probe: Probe, root: Path, opts: EngineOptions, image_key: str) -> CoreosGpuError:
    working = [r for r in DETECTION_ORDER
               if r is not probe.runtime and probe_runtime(r, root, opts, image_key).ok]
    passes = "pass" if len(working) > 1 else "passes"
    hint = (f"{', '.join(working)} {passes} the same probe here: use --runtime {working[0]} (or "
            "runtime = \"auto\")" if working else "no other installed sandbox passes it either")
    if probe.runtime in ENGINES and _LIMITS_ERROR.search(probe.reason):
        hint += f"; or: {ENGINE_SETTINGS_HINT}"
    return CoreosGpuError(f"the {probe.runtime} sandbox cannot run a command in {root}: "
                          f"{probe.reason}", hint=hint, code=ExitCode.COMMAND)


def _check_mount_points(runtime: Runtime, spec: SandboxSpec) -> None:
    # chroot resolves mount points on the host: a symlink in the root (often absolute) would
    # put the mount, and mkdir -p, outside the root.
    for m in spec.mounts if runtime is Runtime.CHROOT else ():
        parts = Path(m.target).parts[1:]
        if any(spec.root.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts) + 1)):
            raise CoreosGpuError(f"cannot mount on {m.target} with chroot: it crosses a symlink",
                                 hint="choose another --runtime", code=ExitCode.CONFIG)


def _resolve(runtime: Runtime, spec: SandboxSpec, opts: EngineOptions,
             image_key: str) -> RuntimeChoice:
    if not spec.root.is_dir():
        raise CoreosGpuError(f"root folder {spec.root} does not exist")
    if runtime is not Runtime.AUTO:  # what the user asked for is refused before it is probed
        check_runtime(runtime)
        _check_mount_points(runtime, spec)
    choice = choose_runtime(runtime, spec.root, opts, image_key)
    _check_mount_points(choice.runtime, spec)
    return choice


# --- the two ways callers run a command in a sandbox ------------------------------------

def run_in_sandbox(spec: SandboxSpec, argv: Sequence[str], *, runtime: Runtime, log_file: Path,
                   what: str, engine_options: EngineOptions = EngineOptions(),
                   image_key: str = "", timeout: float | None = None,
                   progress: Progress | None = None) -> RuntimeChoice:
    """Run argv in the sandbox, its whole output going to log_file (and each line to progress);
    return the sandbox it took (for auto: as probed once for this root and these options).

    `what` names the step in the error ("building nvidia.ko for 6.1.0-50-amd64").
    """
    choice = _resolve(runtime, spec, engine_options, image_key)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("wb") as log:
        sandbox = open_sandbox(choice.runtime, spec, engine_options, image_key, log)
        run(argv, sandbox=sandbox, log=log, what=what, timeout=timeout, progress=progress)
    return choice


def run_interactive(spec: SandboxSpec, argv: Sequence[str] = ("/bin/sh",), *,
                    runtime: Runtime, engine_options: EngineOptions = EngineOptions(),
                    image_key: str = "") -> int:
    """Run argv in the same sandbox with our terminal (`devcontainer shell`, --debug-shell)."""
    choice = _resolve(runtime, spec, engine_options, image_key)
    sandbox = open_sandbox(choice.runtime, spec, engine_options, image_key, None)
    # Ctrl-C belongs to the program in the sandbox (a shell ignores it), not to us.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return run(argv, sandbox=sandbox, terminal=True, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
