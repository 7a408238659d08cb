"""The documentation names the options the plugin really has, and the README's links land.

The options come from pytest's own ``--help``, so an option added, renamed or removed in the
plugin without its documentation (or documented without existing) fails here. ``mkdocs build
--strict`` (in ``.ci/run``) checks the links inside ``docs/``; the README is not part of the site,
so its links into ``docs/`` are checked here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

FLAG = re.compile(r"--gpumem-[a-z0-9]+(?:-[a-z0-9]+)*")
INI = re.compile(r"(?<![\w.])gpumem_[a-z0-9]+(?:_[a-z0-9]+)*")
ENV = re.compile(r"\bGPUMEM_[A-Z0-9]+(?:_[A-Z0-9]+)*")


def documentation() -> dict[str, str]:
    """Every page a user reads: the README and the pages of the docs site."""
    pages = {"README.md": README.read_text()}
    pages.update({f"docs/{p.name}": p.read_text() for p in sorted(DOCS.glob("*.md"))})
    return pages


@pytest.fixture(scope="module")
def registered() -> dict[str, set[str]]:
    """The flags, ini keys and environment variables of the plugin, as ``pytest --help`` lists them."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # an option or ini key opens its line, two spaces in; the help text below it is indented further
    flags = {m.group(1) for line in lines if (m := re.match(r"  (--gpumem-[a-z0-9-]+)", line))}
    inis = {m.group(1) for line in lines if (m := re.match(r"  (gpumem_[a-z0-9_]+) \(", line))}
    envs = set(re.findall(r"Environment:\s+(GPUMEM_[A-Z0-9_]+)", done.stdout))
    assert len(flags) > 10 and len(inis) > 10 and len(envs) == len(inis), (flags, inis, envs)
    # every option also reads GPUMEM_<NAME> (--gpumem-pack-margin: GPUMEM_PACK_MARGIN); --help names it
    # only beside an ini key, so the others are derived from their flags
    derived = {"GPUMEM_" + f.removeprefix("--gpumem-").replace("-", "_").upper() for f in flags}
    return {"flags": flags, "inis": inis, "envs": envs, "all_envs": envs | derived}


def named(pattern: re.Pattern[str]) -> dict[str, set[str]]:
    """Each name the pattern finds, with the pages that name it."""
    where: dict[str, set[str]] = {}
    for page, text in documentation().items():
        for name in pattern.findall(text):
            where.setdefault(name, set()).add(page)
    return where


def test_every_registered_option_is_documented(registered):
    docs = set(named(FLAG)) | set(named(INI)) | set(named(ENV))
    undocumented = sorted((registered["flags"] | registered["inis"] | registered["envs"]) - docs)
    assert not undocumented, f"registered by the plugin but named nowhere in README.md or docs/: {undocumented}"


def test_every_documented_option_exists(registered):
    stale = {name: sorted(pages) for name, pages in named(FLAG).items() if name not in registered["flags"]}
    stale |= {name: sorted(pages) for name, pages in named(INI).items() if name not in registered["inis"]}
    assert not stale, f"named in the documentation but not registered by the plugin: {stale}"


def test_every_documented_environment_variable_is_read_somewhere(registered):
    """An option's variable is in ``--help``; the others (GPUMEM_COMMIT, GPUMEM_RANKS_DIR, ...) must be
    read by the package or the setup script."""
    sources = "\n".join(p.read_text() for p in (ROOT / "pytest_gpumem").rglob("*.py"))
    sources += (ROOT / "scripts" / "setup.sh").read_text()
    sources += "\n".join(p.read_text() for p in (ROOT / "benchmarks").glob("*.*") if p.suffix in (".py", ".sh"))
    stale = {
        name: sorted(pages)
        for name, pages in named(ENV).items()
        if name not in registered["all_envs"] and f'"{name}"' not in sources and f"{name}:-" not in sources
    }
    assert not stale, f"environment variables named in the documentation that nothing reads: {stale}"


def anchors(markdown: str) -> set[str]:
    """The anchors MkDocs gives a page's headings (Python-Markdown's toc slugify)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    slugs = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        plain = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        slugs.add(re.sub(r"[-\s]+", "-", plain))
    return slugs


def test_the_readmes_links_into_docs_land():
    links = re.findall(r"\]\((docs/[^)#\s]*)(?:#([^)\s]+))?\)", README.read_text())
    assert len(links) > 10
    for path, anchor in links:
        target = ROOT / path
        assert target.is_file(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(target.read_text()), f"README.md links to {path}#{anchor}: no such heading"


def test_the_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[:6] == [
        "# pytest-gpumem",
        "",
        "```bash",
        "bash scripts/setup.sh && .venv/bin/python -m pytest examples",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -n 2",
        "```",
    ]


def test_every_page_is_in_the_sites_navigation():
    """A page left out of ``nav`` would build (as a warning MkDocs turns into a failure under --strict),
    but say so here too, where a developer runs the tests."""
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if not re.search(rf":\s+{re.escape(p.name)}\s*$", nav, flags=re.M)]
    assert not missing, f"docs/ pages missing from nav in mkdocs.yml: {missing}"
