"""Writes the man pages in man/ from what they describe, so that they cannot drift from it:

- coreos-gpu(1) from the argument parser (`coreos_gpu.cli.build_parser`), with argparse-manpage;
- coreos-gpu-node(8) from the node programs' own `--help` text, run under sh;
- both pages' EXIT STATUS from the one table of exit codes (coreos_gpu.errors reads
  src/coreos_gpu/resources/exit-codes.toml, which docs/reference/exit-codes.md's tables come
  from too), with the paragraphs that follow a table on that page.

    python scripts/manpages.py

The pages are committed (as mkosi commits its generated man page) and the wheel installs them
under share/man (pyproject.toml's shared-data); tests/test_manpages.py fails when they differ
from what this makes now. The output has no date and does not depend on the terminal's width,
so a rerun writes the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

from coreos_gpu import __version__
from coreos_gpu.cli import build_parser
from coreos_gpu.config import SETTINGS
from coreos_gpu.exit_codes import exit_code_rows
from coreos_gpu.node import default_node_files, inline_sources

REPO = Path(__file__).resolve().parent.parent
MAN_DIR = REPO / "man"
EXIT_CODES = REPO / "docs/reference/exit-codes.md"
MKDOCS = REPO / "mkdocs.yml"
REGENERATE = "python scripts/manpages.py"

# The node's programs, as the exit-code tables name them, with where each lives on a node and
# what it is for (their --help says how, not what).
NODE_PROGRAMS: tuple[tuple[str, str, str], ...] = (
    ("install_nvidia.sh", "install_nvidia.sh",
     "Installs the driver bundle it came in: run it from the extracted archive "
     "(tar xzf nvidia.tar.gz -C /tmp && sudo /tmp/install_nvidia.sh). It checks the bundle in "
     "a root-owned copy under /opt/nvidia, then makes it current in one rename; a run that "
     "fails leaves the node as it was. Installed, it stays as nvidia-uninstall (the driver "
     "folder's copy, which can only uninstall)."),
    ("startup.sh", "startup.sh",
     "What nvidia.service runs at every boot (/opt/nvidia/startup.sh): loads the driver for "
     "the running kernel, makes the device nodes and writes the CDI spec. When the current "
     "driver has no modules for the kernel, it switches to an installed or staged one that "
     "has, or fetches one from the bundle repository."),
    ("fetch.sh", "node/fetch.sh",
     "Fetches from the bundle repository the bundle for another kernel or OS release and "
     "stages it beside current (/opt/nvidia/current/node/fetch.sh), trusting only an index "
     "signed by the bundle's key. nvidia-stage.service runs it with --watch, "
     "nvidia-retry.timer with --retry."),
    ("nvidia-doctor", "nvidia-doctor",
     "Checks each point of the node contract (/opt/bin/nvidia-doctor): one PASS or FAIL line "
     "per point, each FAIL with its fix. It changes nothing."),
)


# --- troff -------------------------------------------------------------------------------


def escape(text: str) -> str:
    """Plain text as troff source: a backslash and a hyphen-minus print as themselves (an
    option pasted from the page must work), and anything past ASCII is a \\[uXXXX] escape,
    since groff reads its input as Latin-1 unless preconv runs before it."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)


def text_line(troff: str) -> str:
    """A line of text that troff does not take for a request, whatever it starts with."""
    return "\\&" + troff if troff.startswith((".", "'")) else troff


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def markdown_inline(text: str) -> str:
    """A line of the docs' markdown as troff: `code` and **bold** bold, [text](link) its text."""
    text = text.replace("\\|", "|")  # a pipe escaped in a table cell
    out = []
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if i % 2:
            out.append(bold(part))
            continue
        part = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", part)
        out.extend(bold(p) if j % 2 else escape(p)
                   for j, p in enumerate(re.split(r"\*\*(.+?)\*\*", part)))
    return text_line("".join(out))


def synopsis_markup(usage: str) -> str:
    """A usage line as troff: options bold, the words to replace (DIR, VERSION) italic."""
    out = []
    for i, part in enumerate(re.split(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*|[A-Z][A-Z0-9_]+\b)",
                                      usage)):
        if i % 2 == 0:
            out.append(escape(part))
        else:
            out.append(bold(part) if part.startswith("-") else italic(part))
    return text_line("".join(out))


def definition(term: str, body: list[str]) -> list[str]:
    """A tagged paragraph: term (already troff) above its indented body lines."""
    return [".TP", term, *body]


def header(name: str, section: int, manual: str) -> str:
    # No date (as systemd's pages): the page must come out the same on every run, and the
    # version says which it is.
    source = escape(f"coreos-gpu {__version__}")
    return f'.TH {escape(name.upper())} {section} "" "{source}" "{manual}"'


# --- exit codes --------------------------------------------------------------------------


def read_exit_codes(program: str, markdown: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The program's (code, meaning) rows, from the one table of exit codes, and the
    paragraphs after its table on docs/reference/exit-codes.md (in the `## \\`PROGRAM\\``
    section, after the line that asks the MkDocs hook for the table)."""
    lines = iter(markdown.splitlines())
    for line in lines:
        if re.match(rf"## `{re.escape(program)}`( |$)", line):
            break
    else:
        raise SystemExit(f"{EXIT_CODES}: no '## `{program}`' heading")
    marker = f"<!-- generated: exit-codes {program} -->"
    section = list(_until_heading(lines))
    if marker not in section:
        raise SystemExit(f"{EXIT_CODES}: no '{marker}' under '## `{program}`'")
    after = section[section.index(marker) + 1:]
    paragraphs = [" ".join(p.split()) for p in "\n".join(after).split("\n\n") if p.strip()]
    return exit_code_rows(program), paragraphs


def _until_heading(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("#"):
            return
        yield line


def exit_status(program: str, markdown: str) -> list[str]:
    rows, paragraphs = read_exit_codes(program, markdown)
    out: list[str] = []
    for code, meaning in rows:
        out += definition(f"\\fB{escape(code)}\\fR", [markdown_inline(meaning)])
    for paragraph in paragraphs:
        out += [".PP", markdown_inline(paragraph)]
    return out


def docs_pointer(*pages: str) -> list[str]:
    """Where the documentation is: the site, when mkdocs.yml names its address, else the
    source's docs/ folder."""
    site = re.search(r"^site_url:\s*['\"]?([^'\"\s]+)", MKDOCS.read_text(encoding="utf-8"),
                     re.MULTILINE) if MKDOCS.exists() else None
    where = (f"at {escape(site.group(1))}" if site else
             "in the docs/ folder of coreos\\-gpu's source (mkdocs build makes the site of it)")
    return [".PP", f"The documentation, {where}; for this page: "
            + ", ".join(escape(p) for p in pages) + "."]


# --- coreos-gpu(1) -----------------------------------------------------------------------


def render_coreos_gpu(markdown: str) -> str:
    parser = build_parser()
    summary = (parser.description or "").rstrip(".")
    takers = _shape_for_page(parser)
    # One subsection per verb under COMMANDS: its usage, and the options only it has.
    page = Manpage(parser, format="single-commands-section")
    # argparse-manpage escapes these itself; no date, as in header().
    page.description = summary
    page.date = ""
    page.source = f"coreos-gpu {__version__}"
    page.manual = "User Commands"
    page.add_section("synopsis", "=", "\n".join([
        ".SY coreos\\-gpu",
        synopsis_markup("[--config FILE] [--debug] VERB [ACTION] [OPTION ...]"),
        ".YS",
        ".SY coreos\\-gpu",
        synopsis_markup("--version"),
        ".YS",
    ]))
    page.add_section("description", "=", "\n".join([
        text_line(bold("coreos-gpu") + " builds NVIDIA's kernel modules for the kernels of "
                  "Flatcar or CoreOS Container Linux releases, in each release's own developer "
                  "container, and packs them with the driver's userspace into a bundle, "
                  + bold("nvidia.tar.gz") + ", that a node installs with "
                  + bold("install_nvidia.sh") + " (see " + bold("coreos-gpu-node") + "(8)). It "
                  "publishes bundles to a signed repository that nodes fetch from when their OS "
                  "updates, and renders the provisioning that installs one."),
        ".PP",
        "Each command is a " + italic("VERB") + ", some with an " + italic("ACTION") + " ("
        + bold("coreos-gpu repository list") + "). A verb takes the settings it needs (see "
        + bold("SETTINGS") + ") as flags or from the config file; most take " + bold("--json")
        + " to print JSON instead of text.",
    ]))
    page.add_section("settings", ">", "\n".join(_settings_section(takers)))
    page.add_section("exit status", ">", "\n".join([
        "Each failure has its own code, so that scripts, systemd and CI can act on it.",
        *exit_status("coreos-gpu", markdown),
    ]))
    page.add_section("files", ">", "\n".join([
        *definition(bold("./coreos-gpu.toml"), [
            "The config file, read from the current folder when there is one (" + bold("--config")
            + " " + italic("FILE") + " names another): each key a setting (see "
            + bold("SETTINGS") + ")."]),
        *definition(bold("~/.cache/coreos-gpu"), [
            "The cache: downloads, developer containers, module builds (" + bold("$XDG_CACHE_HOME")
            + "/coreos\\-gpu when that is set; the " + bold("cache_dir") + " setting moves it). "
            + bold("coreos-gpu cache list") + " shows it, " + bold("coreos-gpu cache prune")
            + " trims it."]),
    ]))
    page.add_section("see also", ">", "\n".join([
        ".BR coreos\\-gpu\\-node (8)",
        *docs_pointer("reference/cli.md", "reference/settings.md", "reference/exit-codes.md"),
    ]))
    return no_hyphenation(str(page))


def no_hyphenation(page: str) -> str:
    """The page with words never split and lines not stretched: an option split at a hyphen,
    or spread over a justified line, reads as another option. (.YS turns hyphenation back on
    to the HY register's mode: 0 keeps it off.)"""
    th, rest = page.split("\n", 1)
    return f"{th}\n.nh\n.nr HY 0\n.ad l\n{rest}"


def _shape_for_page(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Shapes this parser (built for the page alone) for argparse-manpage, and returns which
    verbs take each setting, by flag ("": the verbs that take none).

    Every parser formats at a fixed width too wide to wrap: argparse wraps usage and help to
    the terminal's width, which would put line breaks that differ between machines into the
    page, and which man then fills again around them. A verb's settings, and the options it
    shares with coreos-gpu itself (--config, --debug), leave its option list (its usage still
    shows them): each is described once, under SETTINGS or OPTIONS, not once per verb. A
    verb's description that repeats its one-line help goes."""
    takers: dict[str, list[str]] = {}
    top_options = {tuple(a.option_strings) for a in parser._actions if a.option_strings}
    for sub, help_line in _walk(parser, None):
        sub.formatter_class = functools.partial(argparse.HelpFormatter, width=10_000)
        if sub is parser:
            continue
        if sub.description == help_line:
            sub.description = None
        verb = sub.prog.removeprefix(parser.prog + " ")
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
        if leaf and not any(_is_setting(a) for a in sub._actions):
            takers.setdefault("", []).append(verb)
        for group in list(sub._action_groups):
            for action in list(group._group_actions):
                if _is_setting(action):
                    takers.setdefault(action.option_strings[0], []).append(verb)
                elif tuple(action.option_strings) not in top_options:
                    continue
                group._group_actions.remove(action)
            if not group._group_actions:
                sub._action_groups.remove(group)
        if any(_is_setting(a) for a in sub._actions):
            sub.description = ((sub.description or "") + " Its settings are under SETTINGS."
                               ).strip()
    # The verbs' list comes after coreos-gpu's own options, under its own name.
    for group in list(parser._action_groups):
        if any(isinstance(a, argparse._SubParsersAction) for a in group._group_actions):
            group.title = "commands"
            parser._action_groups.remove(group)
            parser._action_groups.append(group)
    parser.description = None  # NAME has it; DESCRIPTION says more
    return takers


def _is_setting(action: argparse.Action) -> bool:
    """Whether this is a setting's own flag (config.add_setting_flags), not a verb's flag of
    the same name that means something of its own there (render --os, keygen --output)."""
    setting = _SETTINGS_BY_KEY.get(action.dest)
    return (setting is not None and action.option_strings[:1] == [setting.flag]
            and action.help == setting.help)


_SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}


def _walk(
    parser: argparse.ArgumentParser, help_line: str | None
) -> Iterator[tuple[argparse.ArgumentParser, str | None]]:
    yield parser, help_line
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias names the same parser again
                    seen.add(id(sub))
                    yield from _walk(sub, helps.get(name))


def _settings_section(takers: dict[str, list[str]]) -> list[str]:
    out = [
        "Each setting is a flag of the verbs that take it and a key of the config file; a flag "
        "wins over the config file, which wins over the default. "
        + bold("coreos-gpu config show") + " prints the values in effect and where each came "
        "from.",
    ]
    all_verbs = {v for verbs in takers.values() for v in verbs}
    for s in SETTINGS:
        verbs = takers.get(s.flag)
        if not verbs:
            continue
        others = sorted(all_verbs - set(verbs))
        if len(others) >= len(verbs):
            which = ", ".join(verbs)
        else:
            which = "every verb" + (f" but {', '.join(others)}" if others else "")
        if s.boolean:
            term = f"{bold(s.flag)}, {bold('--no-' + s.flag.removeprefix('--'))}"
        else:
            term = f"{bold(s.flag)} {italic(s.metavar)}"
        out += definition(term, [
            text_line(escape(s.help)),
            ".br",
            f"Config key: {bold(s.key)}. Verbs: {escape(which)}.",
        ])
    return out


# --- coreos-gpu-node(8) ------------------------------------------------------------------


def read_usage(script: Path) -> tuple[str, list[tuple[str, str]]]:
    """A node program's synopsis and its (option, description) pairs, from its own --help."""
    result = subprocess.run(["sh", str(script), "--help"], capture_output=True, text=True,
                            check=False, env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
                            timeout=60)
    if result.returncode != 0 or not result.stdout.startswith("usage: "):
        raise SystemExit(f"sh {script} --help: exit {result.returncode}, no usage:\n"
                         + result.stdout + result.stderr)
    lines = result.stdout.splitlines()
    synopsis = [lines[0].removeprefix("usage: ")]
    options: list[tuple[str, str]] = []
    for line in lines[1:]:
        # An option starts two spaces in, its text two spaces after it; deeper lines go on.
        option = re.fullmatch(r"  (-\S+(?: [^ -]\S*)?)(?: {2,}(.*))?", line)
        if option:
            options.append((option.group(1), option.group(2) or ""))
        elif options:
            options[-1] = (options[-1][0], f"{options[-1][1]} {line.strip()}".strip())
        else:
            synopsis.append(line.strip())
    return " ".join(synopsis), options


def render_node(markdown: str) -> str:
    node = default_node_files()
    usages = {}
    with tempfile.TemporaryDirectory() as folder:
        for script, _, _ in NODE_PROGRAMS:
            # As a bundle ships it: its parts joined (install_nvidia.sh reads its options with
            # options.sh's helper, copied in by the build).
            path = Path(folder) / Path(script).name
            path.write_bytes(inline_sources((node / script).read_bytes(), node, name=script))
            usages[script] = read_usage(path)
    names = ", ".join(script for script, _, _ in NODE_PROGRAMS)
    out = [
        header("coreos-gpu-node", 8, "System Manager's Manual"),
        ".SH NAME",
        f"coreos\\-gpu\\-node \\- the programs a coreos\\-gpu bundle puts on a node: "
        f"{escape(names)}",
        ".SH SYNOPSIS",
    ]
    for script, _, _ in NODE_PROGRAMS:
        program, _, rest = usages[script][0].partition(" ")
        out += [f".SY {escape(program)}", synopsis_markup(rest), ".YS"]
    out += [
        ".SH DESCRIPTION",
        "A bundle that " + bold("coreos-gpu build") + " makes installs the NVIDIA driver on a "
        "Flatcar or CoreOS Container Linux node with these programs, in POSIX sh. Nodes carry "
        "no man pages (Flatcar has no " + bold("man") + "): this page is for the operator's "
        "machine, where coreos\\-gpu is installed. On a node, each program's " + bold("--help")
        + " says the same as its SYNOPSIS and options here.",
    ]
    for script, _, about in NODE_PROGRAMS:
        out += [".SS " + escape(script), text_line(escape(about))]
        for option, text in usages[script][1]:
            out += definition(synopsis_markup(option), [text_line(escape(text))])
    out += [".SH EXIT STATUS"]
    for script, table, _ in NODE_PROGRAMS:
        out += [".SS " + escape(script), *exit_status(table, markdown)]
    out += [
        ".SH FILES",
        *definition(bold("/opt/nvidia/current"), [
            "A link to the driver folder in use, " + italic("/opt/nvidia/DRIVER-BUNDLE_ID") + "; "
            "an install flips it in one rename, and " + bold("/opt/nvidia/previous")
            + " names the one before."]),
        *definition(bold("/opt/nvidia/staged"), [
            "One line per driver folder installed for a kernel the node has not booted yet ("
            + bold("install_nvidia.sh --stage") + ", " + bold("fetch.sh") + "): the folder and "
            "the OS release it is for. " + bold("startup.sh") + " switches to it at that boot."]),
        *definition(bold("/etc/default/nvidia"), [
            "The node's own settings, which " + bold("nvidia.service") + " and " + bold("fetch.sh")
            + " read: " + ", ".join(bold(v) for v in (
                "NVIDIA_REPOSITORY_URL", "NVIDIA_FETCH_TIMEOUT", "NVIDIA_PERSISTENCE_MODE",
                "NVIDIA_LOAD_DRM", "NVIDIA_FORCE_LOAD")) + "."]),
        *definition(bold("/run/cdi/nvidia.com-gpu.json"), [
            "The Container Device Interface spec of the node's GPUs that " + bold("startup.sh")
            + " writes at each driver load, for containerd, CRI\\-O, Podman and Docker ("
            + bold("/var/run/cdi") + " is a link to " + bold("/run/cdi") + ")."]),
        ".SH SEE ALSO",
        ".BR coreos\\-gpu (1),",
        ".BR journalctl (1)",
        "(" + bold("journalctl -u nvidia.service") + " shows what " + bold("startup.sh")
        + " said at boot)",
        *docs_pointer("reference/node.md", "how-to/os-updates.md", "how-to/troubleshooting.md",
                      "reference/exit-codes.md"),
    ]
    return no_hyphenation("\n".join(out) + "\n")


# --- main --------------------------------------------------------------------------------


def render_pages() -> dict[str, str]:
    """Each page's file name in man/ and its text."""
    markdown = EXIT_CODES.read_text(encoding="utf-8")
    return {"coreos-gpu.1": render_coreos_gpu(markdown), "coreos-gpu-node.8": render_node(markdown)}


def main() -> int:
    MAN_DIR.mkdir(exist_ok=True)
    for name, text in render_pages().items():
        path = MAN_DIR / name
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old != text:
            path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(REPO)}: {'unchanged' if old == text else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
