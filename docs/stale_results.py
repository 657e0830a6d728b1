"""List the results pages whose figures may be stale.

Each page in ``docs/results/`` names, in its front matter, the code it measures and the commit its
figures were recorded at::

    ---
    measures: [fairforget/unlearning/, server/forget.py]
    commit: 40759af
    ---

(or ``source: examples/results/byzantine.md``: the commit is read from that file's stamp, the first
``commit <hex>`` in it). A page is stale when the last commit touching the measured files
(``git log -1 -- FILES``) is not an ancestor of the page's commit: the code changed after the figures
were taken. Prints one line per stale page (and per page that cannot be checked); exit status 0, or 1
with ``--strict`` when any page is listed. ``make docs`` runs it after the build.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
COMMIT_IN_STAMP = re.compile(r"\bcommit `?([0-9a-f]{7,40})\b")


def front_matter(path: Path) -> dict:
    """The YAML front matter of a Markdown page (``{}`` without one)."""
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    meta = yaml.safe_load(text[4:end]) if end > 0 else None
    return meta if isinstance(meta, dict) else {}


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def page_commit(meta: dict) -> str | None:
    """The commit a page's figures were recorded at: its ``commit``, or the stamp of its ``source``."""
    if meta.get("commit"):
        return str(meta["commit"])
    source = meta.get("source")
    if source and (ROOT / source).is_file():
        found = COMMIT_IN_STAMP.search((ROOT / source).read_text(encoding="utf-8"))
        return found.group(1) if found else None
    return None


def check(page: Path) -> str | None:
    """One line if ``page`` is stale or cannot be checked; None if it is current (or no results page)."""
    meta = front_matter(page)
    measures = meta.get("measures")
    if not measures:
        return None
    name = page.relative_to(ROOT).as_posix()
    commit = page_commit(meta)
    if commit is None:
        return f"{name}: no commit recorded (front matter `commit` or the stamp of `source`)"
    full = git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if full.returncode != 0:
        return f"{name}: commit {commit} is not in this repository"
    missing = [m for m in measures if not (ROOT / m).exists()]
    if missing:
        return f"{name}: measures {', '.join(missing)}, which no longer exist(s)"
    last = git("log", "-1", "--format=%H %h %as %s", "--", *measures).stdout.strip()
    if not last:
        return None
    last_full, last_short, date, subject = (last.split(" ", 3) + ["", "", ""])[:4]
    if git("merge-base", "--is-ancestor", last_full, full.stdout.strip()).returncode == 0:
        return None
    script = meta.get("script", "its script")
    return (f"{name}: recorded at {commit}, but {last_short} ({date}, {subject[:60]}) changed what it measures "
            f"since; rerun {script}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when any page is listed")
    args = parser.parse_args(argv)
    if git("rev-parse", "--git-dir").returncode != 0:
        print("stale results: not a git checkout, nothing checked")
        return 0
    lines = [line for page in sorted(RESULTS.glob("*.md")) if (line := check(page))]
    if lines:
        print(f"stale results pages ({len(lines)}): the code they measure changed after their figures were taken")
        for line in lines:
            print(f"  {line}")
    else:
        print("stale results pages: none")
    return 1 if lines and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
