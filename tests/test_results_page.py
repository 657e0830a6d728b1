"""Results pages written by the studies (``simulations/results_page.py``): the page carries the stamp
``docs/stale_results.py`` and ``tests/test_docs.py`` read, it is written atomically, and every study
script that a results page names calls the writer (read with ``ast``: no study is run here)."""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import pytest

from simulations import results_page
from simulations.results_page import page_wanted, write_page

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
MEASURES = ["fairforget/privacy/", "simulations/dp_study.py"]


def _stale_results():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import stale_results
    finally:
        sys.path.pop(0)
    return stale_results


def _write(tmp_path: Path, **kw):
    kw = {"measures": MEASURES, "command": "python simulations/dp_study.py --eps '1,4'",
          "results_dir": tmp_path / "results", "figures_dir": tmp_path / "figures", **kw}
    return write_page("dp", "Differential privacy", "| a | b |\n|---|---|\n| 1 | 2 |", **kw)


def test_the_page_carries_the_stamp_the_stale_check_and_the_docs_test_read(tmp_path):
    figure = tmp_path / "plot.png"
    figure.write_bytes(b"\x89PNG fake")
    page = _write(tmp_path, figures=[figure])
    text = page.read_text(encoding="utf-8")
    stale = _stale_results()
    meta = stale.front_matter(page)
    assert meta["measures"] == MEASURES and meta["script"] == "simulations/dp_study.py"
    commit = stale.page_commit(meta)
    if stale.git("rev-parse", "--git-dir").returncode == 0:  # in a git checkout: the commit is HEAD
        assert commit == stale.git("rev-parse", "--short", "HEAD").stdout.strip()
        assert stale.COMMIT_IN_STAMP.search(text).group(1) == commit
    box = text[text.index('!!! info "Stamp"'):]
    for field in ("**Measured**", "**Command**", "**Recorded at**", "**Measures**", "CPU cores", "Python ",
                  "torch ", " UTC"):
        assert field in box, field
    assert ("GPU " in box) or ("no GPU" in box)
    assert "`python simulations/dp_study.py --eps '1,4'`" in box
    assert text.startswith("---\n") and "\n# Differential privacy\n" in text and "| 1 | 2 |" in text
    assert (tmp_path / "figures" / "dp-plot.png").read_bytes() == b"\x89PNG fake"
    assert "![plot](../figures/dp-plot.png)" in text


def test_uncommitted_changes_to_the_measured_files_are_stamped(tmp_path, monkeypatch):
    real = results_page._git
    monkeypatch.setattr(results_page, "_git", lambda *a: " M fairforget/privacy/gdp.py" if a[0] == "status"
                        else real(*a))
    text = _write(tmp_path).read_text(encoding="utf-8")
    assert "with uncommitted changes (`fairforget/privacy/gdp.py`)" in text
    assert _stale_results().front_matter(tmp_path / "results" / "dp.md")["uncommitted_changes"] == [
        "fairforget/privacy/gdp.py"]


def test_a_failure_mid_write_leaves_the_old_page_whole_and_no_partial_file(tmp_path, monkeypatch):
    page = _write(tmp_path)
    before = page.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # after the bytes reach the temporary file, before the rename
    with pytest.raises(OSError, match="disk full"):
        write_page("dp", "Other", "new body", measures=MEASURES, command="python x.py",
                   results_dir=tmp_path / "results", figures_dir=tmp_path / "figures")
    assert page.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["dp.md"]


def test_parts_keep_each_other_and_the_page_takes_the_oldest_commit(tmp_path, monkeypatch):
    common = {"results_dir": tmp_path / "results", "figures_dir": tmp_path / "figures"}
    write_page("cost", "Cost", "table one", measures=["fairforget/audit/"], command="python a.py", part="one",
               **common)
    write_page("cost", "Cost", "table two", measures=["server/audit.py"], command="python a.py --mode b", part="two",
               **common)
    page = write_page("cost", "Cost", "table one again", measures=["fairforget/audit/"], command="python a.py",
                      part="one", **common)
    text = page.read_text(encoding="utf-8")
    assert text.index("table one again") < text.index("table two") and "table one\n" not in text
    assert text.count('!!! info "Stamp"') == 2
    meta = _stale_results().front_matter(page)
    assert meta["measures"] == ["fairforget/audit/", "server/audit.py"] and set(meta["parts"]) == {"one", "two"}
    monkeypatch.setattr(results_page, "_git", lambda *a: {"merge-base": "0" * 40}.get(a[0], "c0ffee1"))
    assert results_page._oldest(["c0ffee1", "abcdef1"]) == "c0ffee1"


def test_bad_names_and_missing_measured_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="plain file names"):
        _write(tmp_path, part="../x")
    with pytest.raises(ValueError, match="missing"):
        _write(tmp_path, measures=["no/such/file.py"])
    assert not (tmp_path / "results").exists()


def test_no_page_flag_env_and_partial_runs_skip_the_page(monkeypatch, capsys):
    class Args:
        no_page = False

    monkeypatch.delenv(results_page.NO_PAGE_ENV, raising=False)
    assert page_wanted(Args(), "dp")
    assert not page_wanted(Args(), "dp", partial="--quick")
    monkeypatch.setenv(results_page.NO_PAGE_ENV, "1")
    assert not page_wanted(Args(), "dp")
    Args.no_page = True
    assert not page_wanted(Args(), "dp")
    assert capsys.readouterr().out.count("not written") == 3


# ---------------------------------------------------------------------- every study writes its page
def study_scripts() -> dict[str, set[str]]:
    """simulations/*.py scripts the results pages name (``script`` or ``measures``) -> those pages."""
    stale = _stale_results()
    named: dict[str, set[str]] = {}
    for page in RESULTS.glob("*.md"):
        meta = stale.front_matter(page)
        words = [*str(meta.get("script", "")).split(), *meta.get("measures", [])]
        for word in words:
            if re.fullmatch(r"simulations/\w+\.py", word) and (ROOT / word).is_file():
                named.setdefault(word, set()).add(page.stem)
    return named


def page_writes(source: str) -> list[str] | None:
    """The pages a script's source writes: the first argument of each ``write_page`` call (``"?"`` when
    not a literal); None when it does not import ``write_page`` from ``simulations.results_page``."""
    tree = ast.parse(source)
    imported = any(isinstance(node, ast.ImportFrom) and node.module == "simulations.results_page"
                   and any(a.name == "write_page" for a in node.names) for node in ast.walk(tree))
    if not imported:
        return None
    return [node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else "?"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "write_page"]


def test_the_results_pages_name_the_studies():
    named = study_scripts()
    assert {"simulations/benchmark.py", "simulations/audit_cost.py", "simulations/dp_study.py",
            "simulations/composition.py"} <= set(named), named


@pytest.mark.parametrize("script", sorted(study_scripts()))
def test_every_study_a_results_page_names_writes_that_page(script):
    writes = page_writes((ROOT / script).read_text(encoding="utf-8"))
    pages = study_scripts()[script]
    assert writes is not None, f"{script} does not import write_page from simulations.results_page"
    assert pages <= set(writes), f"{script}: writes {writes or 'no page'}, but pages {sorted(pages)} name it"
    assert all((RESULTS / f"{name}.md").is_file() for name in writes if name != "?"), writes


def test_a_study_without_its_write_page_call_is_caught():
    """The planted defect: the check above fails for a script whose call is removed."""
    source = (ROOT / "simulations" / "dp_study.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for field, value in ast.iter_fields(node):
            if isinstance(value, list):  # every `write_page(...)` statement becomes `pass`
                setattr(node, field, [ast.Pass() if isinstance(v, ast.Expr) and isinstance(v.value, ast.Call)
                                      and getattr(v.value.func, "id", "") == "write_page" else v for v in value])
    planted = ast.unparse(tree)
    assert sorted(page_writes(source)) == ["dp", "dp-curve"] and page_writes(planted) == []
    assert page_writes(planted.replace("write_page", "write_nothing")) is None
