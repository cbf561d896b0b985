"""The part of a developer container's ROOT file system that a module build reads, found in
the ext4 and copied out of it, nothing mounted:

- the kernel build tree (`modules/<release>/build` and `source`), and wherever its links and
  its Makefile's absolute `include`s lead (Debian's split headers, linux-kbuild's scripts);
- every program on the sandbox's PATH, and what each symlink there points at;
- /etc (ld.so.conf, passwd: what the loader and the shell read);
- the compiler's own folders and include path, as the compiler itself reports them
  (`-print-search-dirs`, `-print-prog-name=cc1`, `-E -v`), asked in the sandbox;
- the ELF closure of all of that: each file's interpreter and DT_NEEDED libraries, looked up
  as ld.so does (RPATH, RUNPATH with $ORIGIN, ld.so.conf, the default folders).

A real developer container is ~6 GB (Flatcar's devguide); this is the part of it that
compilers, binutils, make and kbuild open, a few hundred MB. What stays behind (the
Portage tree, documentation, locales, other toolchains' libraries, /var) no module build
reads. A library the closure looks for and the image lacks is named in the build log's
preparation note: it would be missing from the full image too.

debugfs reads the ext4 in batches, one process per round of lookups: listing folders
(`ls -p`) and copying entries (`rdump`, which keeps modes, owners and links as links).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from coreos_gpu import ui
from coreos_gpu.config import Runtime
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.kconfig import read_kconfig, wanted_compiler
from coreos_gpu.run import run
from coreos_gpu.sandbox import DEFAULT_ENV, EngineOptions, SandboxSpec, run_in_sandbox

# Kernel build trees: /usr/lib/modules on current Flatcar, /usr/lib64/modules up to 3115.0.0.
MODULE_DIRS = ("usr/lib/modules", "usr/lib64/modules", "lib/modules")
PATH_DIRS = tuple(DEFAULT_ENV["PATH"].split(":"))
# glibc's own search folders after ld.so.conf's (x86_64: /lib64 and /usr/lib64; Debian's
# multiarch folders come from its ld.so.conf.d).
DEFAULT_LIBRARY_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib")
MAX_LINK_HOPS = 40  # as the kernel's path lookup


class _Blocked:
    """A lookup that waits for the next debugfs round."""


BLOCKED = _Blocked()
Lookup = str | None | _Blocked  # a real path in the image, None (not there), or BLOCKED


def image_error(message: str) -> CoreosGpuError:
    return CoreosGpuError(message, hint="the image is damaged or not a developer container; "
                          "delete it from the cache and download it again",
                          code=ExitCode.IMAGE)


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _quoted(path: str | Path) -> str:
    text = str(path)
    if '"' in text or "\n" in text:
        raise image_error(f"the ROOT file system has a path debugfs cannot be asked for: "
                           f"{text!r}")
    return f'"{text}"'


class _Debugfs:
    """One ext4 image, asked in batches: `debugfs -f` runs a list of commands in one go."""

    _ECHO = "debugfs: "

    def __init__(self, filesystem: str, scratch: Path) -> None:
        self.filesystem = filesystem  # a path, or `DISK?offset=N` (a partition of a disk)
        self.scratch = scratch  # where the command files go
        self.rounds = 0

    def batch(self, commands: list[str]) -> list[str]:
        """Each command's output (stdout), in order."""
        self.rounds += 1
        with tempfile.NamedTemporaryFile("w", prefix=".debugfs-", suffix=".cmds",
                                         dir=self.scratch) as script:
            script.write("\n".join(commands) + "\n")
            script.flush()
            done = run(["debugfs", "-f", script.name, self.filesystem], stderr_apart=True,
                       what="reading the ROOT file system")
        # debugfs exits 0 even when a command fails; its complaints go to stderr. Only its
        # banner, and (not as root) failing to chown what it copies, are expected there.
        problems = [line for line in done.stderr.splitlines()
                    if line.strip() and not line.startswith("debugfs ")
                    and "while changing ownership" not in line]
        if problems:
            raise image_error(f"debugfs could not read the ROOT file system: {problems[0]}")
        outputs: list[list[str]] = []
        for line in done.stdout.splitlines():
            if line.startswith(self._ECHO):
                outputs.append([])
            elif outputs:
                outputs[-1].append(line)
        if len(outputs) != len(commands):
            raise image_error(f"debugfs answered {len(outputs)} of {len(commands)} requests")
        return ["\n".join(lines) for lines in outputs]


class RootCopy:
    """A copy of parts of the image's tree at `dest`, with the same paths, links as links.

    Lookups follow links the way the build will see them (an absolute target means the
    image's root). A folder copied whole is known from the copy; any other folder from its
    listing. Work that needs the image waits for the next round (`flush`)."""

    def __init__(self, filesystem: str | Path, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self.debugfs = _Debugfs(str(filesystem), dest.parent)
        self.dest = dest
        self._listings: dict[str, dict[str, int]] = {}  # folder → name → st_mode
        self._whole: set[str] = set()  # folders copied with everything in them
        self._queued: dict[str, str] = {}  # debugfs command → what to do after it
        self._merges: list[tuple[Path, Path]] = []  # (staged copy, where it belongs)
        self._stages = 0
        self.copied: list[str] = []  # real paths copied since the caller last took them

    # -- the image's tree --------------------------------------------------------------

    def local(self, real: str) -> Path:
        return self.dest / real.lstrip("/")

    def _in_whole(self, real: str) -> bool:
        parts = _split(real)
        return any("/" + "/".join(parts[:n]) in self._whole for n in range(len(parts) + 1))

    def listing(self, folder: str) -> dict[str, int] | _Blocked:
        """The entries of a real folder of the image, name → mode."""
        if self._in_whole(folder):
            local = self.local(folder)
            return {entry.name: entry.stat(follow_symlinks=False).st_mode
                    for entry in os.scandir(local)}
        if folder not in self._listings:
            self._queued.setdefault(f"ls -p {_quoted(folder)}", "list:" + folder)
            return BLOCKED
        return self._listings[folder]

    def _mode(self, folder: str, name: str) -> int | _Blocked | None:
        entries = self.listing(folder)
        return entries if isinstance(entries, _Blocked) else entries.get(name)

    def resolve(self, path: str) -> Lookup:
        """The real path `path` leads to in the image, copying the links on the way."""
        todo = _split(path)
        parts: list[str] = []
        hops = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                parts = parts[:-1]
                continue
            folder = "/" + "/".join(parts)
            mode = self._mode(folder, name)
            if mode is None or isinstance(mode, _Blocked):
                return mode
            real = f"{folder.rstrip('/')}/{name}"
            if stat.S_ISLNK(mode):
                local = self.local(real)
                if not local.is_symlink():
                    self._copy_entry(real, "link")
                    return BLOCKED
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise image_error(f"too many links resolving {path} in the image")
                target = os.readlink(local)
                if target.startswith("/"):
                    parts = []
                todo = _split(target) + todo
                continue
            if todo and not stat.S_ISDIR(mode):
                return None  # a file where the path needs a folder
            if stat.S_ISDIR(mode) and not self._in_whole(real):
                self.local(real).mkdir(mode=stat.S_IMODE(mode) or 0o755, exist_ok=True)
            parts.append(name)
        return "/" + "/".join(parts)

    # -- copying -----------------------------------------------------------------------

    def _copy_entry(self, real: str, kind: str = "copy") -> None:
        """Queue an entry's copy; "link": a link on the way to what is wanted, whose target
        the lookup copies (not a link whose target the copy must hold, as one in a folder
        copied whole)."""
        parent = self.local(real).parent
        parent.mkdir(parents=True, exist_ok=True)
        self._queued.setdefault(f"rdump {_quoted(real)} {_quoted(parent)}", f"{kind}:{real}")

    def _copy_whole(self, real: str) -> None:
        local = self.local(real)
        if not local.exists():
            self._copy_entry(real)
            return
        # Already there as a folder on the way to something else: copy beside, then merge.
        self._stages += 1
        stage = self.dest / ".stage" / str(self._stages)
        stage.mkdir(parents=True)
        self._queued.setdefault(f"rdump {_quoted(real)} {_quoted(stage)}", "copy:" + real)
        self._merges.append((stage / local.name, local))

    def copy(self, real: str, *, whole: bool) -> bool:
        """Whether real (a file, or a folder: whole, or only made) is in the copy; if not
        yet, it is queued for the next round."""
        if self._in_whole(real):
            return True
        local = self.local(real)
        if real == "/":
            return True
        folder, name = real.rsplit("/", 1)
        mode = self._mode(folder or "/", name)
        if mode is None:
            raise image_error(f"{real} vanished from the image while being copied")
        if isinstance(mode, _Blocked):
            return False
        if stat.S_ISDIR(mode):
            if not whole:
                local.mkdir(parents=True, exist_ok=True)
                return True
            self._copy_whole(real)
            return False
        if local.is_symlink() or local.exists():
            return True
        self._copy_entry(real)
        return False

    def flush(self) -> None:
        if not self._queued:
            raise AssertionError("a lookup is waiting with nothing asked of debugfs")
        commands = list(self._queued)
        answers = self.debugfs.batch(commands)
        merges, self._merges = self._merges, []
        for command, answer in zip(commands, answers, strict=True):
            kind, _, real = self._queued[command].partition(":")
            if kind == "list":
                self._listings[real] = _parse_listing(answer)
        for staged, local in merges:
            _merge(staged, local)
        shutil.rmtree(self.dest / ".stage", ignore_errors=True)
        for command in commands:
            kind, _, real = self._queued[command].partition(":")
            if kind in ("copy", "link"):
                if not (self.local(real).is_symlink() or self.local(real).exists()):
                    raise image_error(f"debugfs did not copy {real} out of the image")
                if self.local(real).is_dir() and not self.local(real).is_symlink():
                    self._whole.add(real)
                if kind == "copy":
                    self.copied.append(real)
        self._queued.clear()

    # -- many at once ------------------------------------------------------------------

    def settle(self, step: Callable[[], bool]) -> None:
        """Run rounds until step() says it is done."""
        while not step():
            self.flush()

    def resolve_all(self, paths: Iterable[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        todo = list(dict.fromkeys(paths))

        def step() -> bool:
            nonlocal todo
            waiting = []
            for path in todo:
                real = self.resolve(path)
                if isinstance(real, _Blocked):
                    waiting.append(path)
                else:
                    found[path] = real
            todo = waiting
            return not todo

        self.settle(step)
        return found

    def provide(self, paths: Iterable[str], *, whole: bool,
                keep: Callable[[str, str], bool] = lambda path, real: True,
                ) -> dict[str, str | None]:
        """Copy what each path leads to (folders whole, or only made); path → real path,
        None where the image has nothing there (or keep() said no)."""
        paths = list(paths)
        found = {path: real for path, real in self.resolve_all(paths).items()
                 if real is not None and keep(path, real)}
        self.settle(lambda: all([self.copy(real, whole=whole) for real in found.values()]))
        return {path: found.get(path) for path in paths}

    def take_copied(self) -> list[str]:
        copied, self.copied = self.copied, []
        return copied


def _parse_listing(answer: str) -> dict[str, int]:
    """`ls -p` lines: /inode/mode/uid/gid/name/size/ (a name holds no slash)."""
    entries = {}
    for line in answer.splitlines():
        fields = line.split("/")
        if len(fields) >= 7 and fields[5] not in (".", ".."):
            entries[fields[5]] = int(fields[2], 8)
    return entries


def _merge(staged: Path, local: Path) -> None:
    """Move a staged copy's entries into the folder where they belong (what is already
    there came from the same image)."""
    for entry in os.scandir(staged):
        there = local / entry.name
        if not there.is_symlink() and not there.exists():
            os.rename(entry.path, there)
        elif entry.is_dir(follow_symlinks=False) and there.is_dir() and not there.is_symlink():
            _merge(Path(entry.path), there)


# -- what the build needs ------------------------------------------------------------------


def _walk(copy: RootCopy, reals: Iterable[str]) -> Iterator[tuple[str, os.DirEntry[str] | None]]:
    """Every entry copied under reals: (real path, its DirEntry; None for reals themselves
    that are files)."""
    for real in reals:
        local = copy.local(real)
        if local.is_dir() and not local.is_symlink():
            stack = [real]
            while stack:
                folder = stack.pop()
                for entry in os.scandir(copy.local(folder)):
                    path = f"{folder.rstrip('/')}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(path)
                    yield path, entry
        else:
            yield real, None


class _Needs:
    """What the ELF files and links copied so far ask for next."""

    def __init__(self) -> None:
        self.links: list[str] = []
        self.interpreters: set[str] = set()
        self.libraries: dict[tuple[str, tuple[str, ...]], str] = {}  # (name, dirs) → by whom


def _elf_needs(path: Path) -> tuple[str, list[str], list[str]] | None:
    """(interpreter, DT_NEEDED names, RPATH/RUNPATH folders) of an ELF file; None if it is
    not one."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            interpreter, needed, rpath, runpath = "", [], [], []
            for segment in elf.iter_segments():
                if isinstance(segment, InterpSegment):
                    interpreter = segment.get_interp_name()
                elif isinstance(segment, DynamicSegment):
                    for each in segment.iter_tags():
                        tag: Any = each  # pyelftools names the value's attribute by the kind
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(tag.needed)
                        elif tag.entry.d_tag == "DT_RPATH":
                            rpath += tag.rpath.split(":")
                        elif tag.entry.d_tag == "DT_RUNPATH":
                            runpath += tag.runpath.split(":")
    except (ELFError, OSError, ValueError, KeyError):
        return None  # damaged or unusual: whatever runs it fails as it would in the image
    # ld.so: DT_RPATH counts only without DT_RUNPATH.
    return interpreter, needed, runpath or rpath


def _library_dirs(copy: RootCopy) -> tuple[str, ...]:
    """ld.so.conf's folders (its `include` globs followed), then glibc's defaults."""
    folders: list[str] = []

    def read(conf: Path) -> None:
        try:
            lines = conf.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            words = line.split("#", 1)[0].split()
            if len(words) >= 2 and words[0] == "include":
                for pattern in words[1:]:
                    base = pattern if pattern.startswith("/") else f"/etc/{pattern}"
                    for found in sorted(copy.dest.glob(base.lstrip("/"))):
                        read(found)
            elif words and words[0].startswith("/"):
                folders.append(words[0])

    read(copy.local("/etc/ld.so.conf"))
    return tuple(dict.fromkeys(folders + list(DEFAULT_LIBRARY_DIRS)))


def _scan(copy: RootCopy, reals: list[str], needs: _Needs, library_dirs: tuple[str, ...],
          seen: set[str]) -> None:
    for real, entry in _walk(copy, reals):
        if real in seen:
            continue
        seen.add(real)
        local = copy.local(real)
        if local.is_symlink():
            needs.links.append(real)
            continue
        if not (entry.is_file(follow_symlinks=False) if entry else local.is_file()):
            continue
        found = _elf_needs(local)
        if found is None:
            continue
        interpreter, needed, search = found
        if interpreter:
            needs.interpreters.add(interpreter)
        origin = real.rsplit("/", 1)[0] or "/"
        own = tuple(d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                    .replace("$LIB", "lib64").replace("${LIB}", "lib64")
                    for d in search if d)
        for name in needed:
            needs.libraries.setdefault((name, own + library_dirs), real)


def _is_ancestor(folder: str, path: str) -> bool:
    return folder == "/" or path == folder or path.startswith(folder.rstrip("/") + "/")


def close_over(copy: RootCopy, library_dirs: tuple[str, ...], seen: set[str],
               missing: dict[str, str]) -> None:
    """Copy what the copied files ask for (link targets, interpreters, libraries), and what
    those ask for, until nothing new is asked. missing: library → the first file that
    needed it, for the libraries the image does not have."""
    done_libraries: set[tuple[str, tuple[str, ...]]] = set()
    while copied := copy.take_copied():
        needs = _Needs()
        _scan(copy, copied, needs, library_dirs, seen)
        # A link to a folder that holds it (a loop, or `root -> /`) would copy everything.
        copy.provide(needs.links, whole=True,
                     keep=lambda path, real: not _is_ancestor(real, path))
        copy.provide(sorted(needs.interpreters), whole=False)
        wanted = [(key, by) for key, by in needs.libraries.items() if key not in done_libraries]
        done_libraries.update(key for key, _ in wanted)
        candidates = {key: [f"{d.rstrip('/')}/{key[0]}" if "/" not in key[0] else key[0]
                            for d in key[1]] for key, _ in wanted}
        found = copy.resolve_all(path for paths in candidates.values() for path in paths)
        first = []
        for key, by in wanted:
            real = next((found[p] for p in candidates[key] if found.get(p)), None)
            if real is None:
                missing.setdefault(key[0], by)
            else:
                first.append(real)
        copy.provide(first, whole=False)


# The compiler says where its parts are; kbuild asks it the same (-print-file-name=include).
# gcc names a part by its path only once it is there to find, so this runs until nothing new
# comes: first -print-search-dirs (its install folder and programs path, named whether they
# exist or not), then cc1 and the rest, then the include path, which `-E -v` says once cc1
# runs.
_PROBE_SCRIPT = r"""
for cc in "$@"; do
    command -v "$cc" >/dev/null 2>&1 || continue
    "$cc" -print-search-dirs | while IFS= read -r line; do echo "coreos-gpu-said $line"; done
    for part in cc1 collect2 lto-wrapper as ld; do
        echo "coreos-gpu-part $("$cc" -print-prog-name="$part")"
    done
    echo "coreos-gpu-folder $("$cc" -print-file-name=include)"
    "$cc" -xc -E -v /dev/null 2>&1 >/dev/null | while IFS= read -r line; do
        echo "coreos-gpu-said $line"
    done
    exit 0
done
exit 3
"""
_PROBE_LINE = re.compile(r"coreos-gpu-(part|folder) (/\S+)")
# `-E -v` lists the include path, one folder a line after a space, and names the folders it
# skips as absent (all but gcc's own, until they are copied).
_INCLUDE_LINE = re.compile(r'coreos-gpu-said (?: (/\S+)|ignoring nonexistent directory "(/[^"]+)")')
_SEARCH_LINE = re.compile(r"coreos-gpu-said (install|programs): =?(/.*)")


def _versioned(folder: str, version: str) -> bool:
    """Whether a folder of gcc's path is its version's (…/13): its other folders hold every
    version's (…/x86_64-pc-linux-gnu/)."""
    return bool(version) and folder.rsplit("/", 1)[-1] == version


def compiler_parts(copy: RootCopy, compilers: tuple[str, ...], *, runtime: Runtime,
                   engine: EngineOptions, log_file: Path, image_key: str,
                   ) -> tuple[list[str], list[str]]:
    """(files, folders) the kernel's compiler reports as its own, asked in the sandbox: its
    install folder and the programs path's folders named by its version whole, the
    assembler and linker it would take from the programs path, the parts it names, and the
    include path."""
    try:
        run_in_sandbox(SandboxSpec(root=copy.dest),
                       ["sh", "-c", _PROBE_SCRIPT, "sh", *compilers], runtime=runtime,
                       log_file=log_file, what="asking the compiler for its parts",
                       engine_options=engine, image_key=image_key)
    except CoreosGpuError as e:
        raise CoreosGpuError(
            f"the developer container has none of the kernel's compilers "
            f"({', '.join(compilers)}) on its PATH", hint=f"what it said: {log_file}",
            code=ExitCode.IMAGE) from e
    files: list[str] = []
    folders: list[str] = []
    programs: list[str] = []
    install = ""
    for line in log_file.read_text(errors="replace").splitlines():
        if include := _INCLUDE_LINE.fullmatch(line):
            folders.append(include.group(1) or include.group(2))
        elif search := _SEARCH_LINE.fullmatch(line):
            if search.group(1) == "install":
                install = search.group(2).rstrip("/")
            else:
                programs = [d.rstrip("/") for d in search.group(2).split(":") if d]
        elif found := _PROBE_LINE.fullmatch(line.strip()):
            kind, path = found.groups()
            (files if kind == "part" else folders).append(path)
    version = install.rsplit("/", 1)[-1]
    folders += [install] * bool(install) + [d for d in programs if _versioned(d, version)]
    files += [f"{d}/{tool}" for d in programs for tool in ("as", "ld")]
    return files, folders


def _makefile_includes(makefile: Path) -> list[str]:
    """Absolute paths a Makefile includes (Debian's per-flavour headers include the common
    tree's Makefile by its absolute path)."""
    try:
        text = makefile.read_text(errors="replace")
    except OSError:
        return []
    return [word for line in text.splitlines() if re.match(r"-?include\s", line)
            for word in line.split()[1:] if word.startswith("/")]


def find_kernel_trees(copy: RootCopy) -> list[str]:
    """The image's `modules/<release>/build` and `source` paths, copied whole."""
    folders = {real: d for d, real in copy.resolve_all("/" + d for d in MODULE_DIRS).items()
               if real is not None}
    listings: dict[str, dict[str, int]] = {}
    copy.settle(lambda: all(not isinstance(copy.listing(f), _Blocked) for f in folders))
    for folder in folders:
        entries = copy.listing(folder)
        assert not isinstance(entries, _Blocked)
        listings[folder] = entries
    trees = [f"{folder}/{kernel}/{part}" for folder, entries in listings.items()
             for kernel, mode in entries.items() if stat.S_ISDIR(mode)
             for part in ("build", "source")]
    provided = copy.provide(trees, whole=True)
    found = [path for path, real in provided.items() if real]
    includes = [include for path in found
                for include in _makefile_includes(copy.local(str(provided[path])) / "Makefile")]
    copy.provide([os.path.dirname(p) for p in includes], whole=True)
    return found


def copy_build_root(filesystem: str | Path, dest: Path, *, runtime: Runtime, engine: EngineOptions,
                    log_file: Path, image_key: str) -> None:
    """Copy what a module build reads out of the ext4 `filesystem` (a file, or what debugfs
    opens: `DISK?offset=N`) into dest."""
    copy = RootCopy(filesystem, dest)
    copy.settle(lambda: not isinstance(copy.listing("/"), _Blocked))
    top = copy.listing("/")
    assert not isinstance(top, _Blocked)
    # The top-level folders (empty) and links: /tmp, /proc, /dev are where the sandbox mounts.
    for name, mode in top.items():
        if stat.S_ISDIR(mode):
            copy.local(f"/{name}").mkdir(mode=stat.S_IMODE(mode), exist_ok=True)
    copy.provide([f"/{n}" for n, mode in top.items() if stat.S_ISLNK(mode)], whole=False)
    trees = find_kernel_trees(copy)
    copy.provide(["/etc", *PATH_DIRS], whole=True)
    library_dirs = _library_dirs(copy)
    seen: set[str] = set()
    missing: dict[str, str] = {}
    close_over(copy, library_dirs, seen, missing)
    compilers = _kernel_compilers(copy, trees)
    asked: set[str] = set()
    for _ in range(4):
        files, folders = compiler_parts(copy, compilers, runtime=runtime, engine=engine,
                                        log_file=log_file, image_key=image_key)
        copy.provide(files, whole=False)
        copy.provide(folders, whole=True)
        close_over(copy, library_dirs, seen, missing)
        if asked.issuperset(files + folders):
            break
        asked.update(files + folders)
    if missing:
        ui.log(f"    note: {len(missing)} libraries the image's programs name are not in it "
               f"(first: {next(iter(missing))}, for {next(iter(missing.values()))}); a build "
               "that runs those programs fails as it would in the full image")
    ui.log(f"    copied {len(seen)} files and links of the image "
           f"({copy.debugfs.rounds} debugfs rounds)")


def _kernel_compilers(copy: RootCopy, trees: list[str]) -> tuple[str, ...]:
    """The compilers the kernel's .config names, best first (gcc when it names none)."""
    for real in copy.resolve_all(f"{tree}/.config" for tree in trees).values():
        if real and copy.local(real).is_file():
            wanted = wanted_compiler(read_kconfig(copy.local(real).read_text(errors="replace")))
            if wanted.cc:
                return wanted.cc
    return ("gcc", "cc")
