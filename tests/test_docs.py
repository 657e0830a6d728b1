"""The docs site (``mkdocs.yml``, ``docs/``): it builds with no warning, every results page says what
it measures and when, and the README stays a short entry point.

``make docs`` builds the same site into ``site/``; here it goes into a temporary folder, so the test
writes nothing in the source tree (``docs/gen_reference.py`` is not run: its pages are committed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def _mkdocs_build(site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_docs_build_without_a_warning(tmp_path):
    done = _mkdocs_build(tmp_path / "site")
    log = done.stdout + done.stderr
    warnings = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert done.returncode == 0 and not warnings, log[-4000:]
    for page in ("index.html", "reference/config.html", "reference/cli.html", "results/index.html",
                 "how-to/writing-a-strategy.html", "reference/api.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "reference" / "api.html").read_text(encoding="utf-8")
    assert "parametrize_with_checks" in api and "Registry" in api  # mkdocstrings rendered the docstrings


def _front_matter(path: Path) -> dict:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import stale_results
    finally:
        sys.path.pop(0)
    return stale_results.front_matter(path)


@pytest.mark.parametrize("page", sorted(p.name for p in RESULTS.glob("*.md") if p.name != "index.md"))
def test_every_results_page_names_what_it_measures_and_when(page):
    path = RESULTS / page
    meta = _front_matter(path)
    assert meta.get("measures"), f"{page}: no `measures` in its front matter"
    for measured in meta["measures"]:
        assert (ROOT / measured).exists(), f"{page}: measures {measured}, which does not exist"
    assert meta.get("commit") or meta.get("source"), f"{page}: no `commit` (or `source` with a stamp)"
    text = path.read_text(encoding="utf-8")
    assert "Stamp" in text or meta.get("source"), f"{page}: no stamp shown on the page"


def test_stale_results_lists_pages_and_never_fails_the_build():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "stale_results.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("stale results"), done.stdout


def test_readme_is_short_and_states_the_test_command():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    assert any("make test" in line for line in lines) and any("make demo" in line for line in lines)
