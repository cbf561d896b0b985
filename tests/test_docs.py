"""The documentation: the README stays short and its links lead somewhere, the site builds in
strict mode (a broken link, a missing anchor or a page outside the nav fails it), the reference
generated from the code is there, the exit-code table lists every code, and the tutorials'
runnable commands run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coreos_gpu.config import SETTINGS
from coreos_gpu.errors import ExitCode

from .conftest import REPO

DOCS = REPO / "docs"
MKDOCS = [sys.executable, "-m", "mkdocs"]
# A command block that a test runs: this line right before the block's opening fence.
RUNNABLE = "<!-- runnable -->"


def mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MKDOCS, "build", "--strict", "--site-dir", str(site)],
                          cwd=project, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    built = mkdocs_build(REPO, folder)
    assert built.returncode == 0, built.stderr
    return folder


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert not link.startswith(("http:", "https:")) or link, link
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_the_site_builds_in_strict_mode(site: Path) -> None:
    pages = {p.relative_to(DOCS).with_suffix("") for p in DOCS.rglob("*.md")}
    for page in pages:
        html = site / page / "index.html" if page.name != "index" else site / "index.html"
        assert html.exists(), f"docs/{page}.md was not built"


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    """Strict mode is what makes the site's links trustworthy: without it the build above
    would pass with a dead link. Checked on a copy of the project with one bad link each."""
    bad_links = ("[gone](../reference/no-such-page.md)", "[gone](../reference/node.md#no-such)")
    for n, bad in enumerate(bad_links):
        project = tmp_path / f"project-{n}"
        shutil.copytree(DOCS, project / "docs")
        shutil.copy(REPO / "mkdocs.yml", project)
        shutil.copytree(REPO / "scripts", project / "scripts")
        page = project / "docs" / "how-to" / "cache.md"
        page.write_text(page.read_text() + f"\n{bad}\n")
        built = mkdocs_build(project, tmp_path / f"site-{n}")
        assert built.returncode != 0, bad
        assert "how-to/cache.md" in built.stderr


def test_the_settings_reference_is_generated_from_the_settings(site: Path) -> None:
    html = (site / "reference" / "settings" / "index.html").read_text()
    for s in SETTINGS:
        assert f"<code>{s.key}</code>" in html, s.key
        assert s.flag in html, s.flag


def test_the_verb_reference_is_generated_from_the_parser(site: Path) -> None:
    html = (site / "reference" / "cli" / "index.html").read_text()
    for verb in ("build", "inspect", "publish", "sync", "repository verify", "cache prune",
                 "render", "devcontainer run", "completion"):
        assert f"<code>coreos-gpu {verb}</code>" in html, verb
    assert "usage: coreos-gpu build" in html


def _table_codes(text: str, section: str) -> list[int]:
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [int(m) for m in re.findall(r"^\| (\d+) \|", body, re.MULTILINE)]


def test_the_exit_code_table_lists_every_code() -> None:
    """As the site shows it: the MkDocs hook makes the page's tables from the table of exit
    codes that ExitCode takes its numbers from (tests/test_exit_codes.py checks the rest)."""
    from scripts.mkdocs_hooks import on_page_markdown

    text = on_page_markdown((DOCS / "reference" / "exit-codes.md").read_text(), None, None, None)
    assert _table_codes(text, "`coreos-gpu`") == sorted(int(c) for c in ExitCode)


def runnable_script(page: Path) -> str:
    """The page's runnable blocks, in order, as one script."""
    blocks = re.findall(rf"^{re.escape(RUNNABLE)}\n```sh\n(.*?)^```$", page.read_text(),
                        re.MULTILINE | re.DOTALL)
    assert blocks, f"{page} has no {RUNNABLE} block"
    return "".join(blocks)


def test_every_runnable_block_is_one_a_test_runs() -> None:
    """A marker before a block the runner does not match (another fence, a blank line between)
    would leave that block untested without a word; so would a marker on a page whose blocks
    no test runs."""
    for page in DOCS.rglob("*.md"):
        markers = len(re.findall(rf"^{re.escape(RUNNABLE)}$", page.read_text(), re.MULTILINE))
        if page == DOCS / "tutorials" / "first-bundle.md":
            blocks = re.findall(rf"^{re.escape(RUNNABLE)}\n```sh\n", page.read_text(),
                                re.MULTILINE)
            assert len(blocks) == markers
        else:
            assert markers == 0, f"{page}: no test runs its runnable blocks"


@pytest.mark.slow
def test_the_first_bundle_tutorial_runs_as_written(tmp_path: Path, build_bundle) -> None:  # type: ignore[no-untyped-def]
    """Every runnable block of the tutorial, as one bash script, from the checkout, in a home
    whose tutorial folder already holds a file of the user's. Its cache is the session's
    (build_bundle), so the build takes the module set compiled there instead of compiling."""
    from testinputs.cache import cache_root

    cache = build_bundle().cache
    home = tmp_path / "home"
    (home / "gpu-tutorial").mkdir(parents=True)
    (home / "gpu-tutorial" / "notes.txt").write_text("the user's own file\n")
    script = "set -eux\n" + runnable_script(DOCS / "tutorials" / "first-bundle.md")
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(cache),
           "COREOS_GPU_TESTINPUTS_CACHE": str(cache_root())}
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    work = home / "gpu-tutorial"
    assert (work / "notes.txt").read_text() == "the user's own file\n"
    assert "contents sha256" in done.stdout
    assert (work / "repo" / "index.current").is_file()
    assert (work / "gpu-agent.ign").is_file()
    assert (work / "node" / "opt" / "nvidia" / "current").is_symlink()
    assert "compiling" not in done.stderr, "the tutorial compiled instead of using the cache"
