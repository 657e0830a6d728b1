"""Results pages written by the studies that measure them (issue 23: figures are written by the code
that measures them, stamped with what produced them).

A study script ends with::

    if page_wanted(args, "dp", partial=None if complete else "--eps is a subset"):
        write_page("dp", "Differential privacy", body, measures=[...], command=invocation())

:func:`write_page` writes ``docs/results/<name>.md`` atomically (temporary file, fsync, rename) with
the front matter ``docs/stale_results.py`` reads and ``tests/test_docs.py`` checks::

    ---
    measures: [fairforget/privacy/, simulations/dp_study.py]
    commit: 1a2b3c4
    script: simulations/dp_study.py
    ...
    ---

then the page's title and an ``!!! info "Stamp"`` box: the machine (CPU model and cores, GPU or not,
Python and torch), the exact command, the commit (``with uncommitted changes`` when ``git status``
shows the measured files modified), the UTC date, and the files it measures. Figures (PNG) are copied
to ``docs/figures/<name>-<file>`` and shown at the end of the page.

A page fed by several runs (``audit_cost.py --mode both`` and ``--mode attacks``; ``augment_levers.py``
and ``composition.py``) is written in *parts*: ``write_page(..., part="attacks")`` replaces that part
and keeps the page's other script-written parts, each with its own stamp; the front matter's
``commit`` is then the oldest of the parts' commits and ``measures`` their union, so the stale check
stays conservative. A hand-copied page (no parts) is replaced whole.

A run that must not replace the published page passes ``--no-page`` (or sets ``FAIRFORGET_NO_PAGE=1``);
quick and partial runs skip the page on their own (:func:`page_wanted`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from fairforget.storage import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
FIGURES = ROOT / "docs" / "figures"
NO_PAGE_ENV = "FAIRFORGET_NO_PAGE"
WRITER = "simulations/results_page.py"
PART = re.compile(r"<!-- part (?P<name>[\w.-]+) -->\n(?P<text>.*?)<!-- end part (?P=name) -->\n", re.S)


# ---------------------------------------------------------------------- the stamp
@dataclass(frozen=True)
class Stamp:
    """What produced a page's figures."""

    commit: str | None      # ``git rev-parse --short HEAD``; None outside a git checkout
    uncommitted: list[str]  # measured files with uncommitted changes (``git status --porcelain``)
    date: str               # UTC, minutes
    machine: str            # CPU model and cores, GPU, OS
    software: str           # Python and torch versions
    command: str            # the exact command line


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.rstrip("\n") if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """``<CPU model>, <n> CPU cores, <OS>; <GPU name or "no GPU">``."""
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{_cpu_model()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.machine()}; {gpu}"


def invocation(argv: Sequence[str] | None = None) -> str:
    """The command line that is running, quoted for a shell: ``python simulations/x.py --flag 'a b'``
    (the script's path relative to the repository root when it lies inside it)."""
    args = list(sys.argv if argv is None else argv)
    if args:
        script = Path(args[0]).resolve()
        if script.is_relative_to(ROOT):
            args[0] = script.relative_to(ROOT).as_posix()
    return shlex.join(["python", *args])


def stamp(measures: Sequence[str], command: str) -> Stamp:
    """The stamp of figures measured now, of the code in ``measures`` (paths from the repository root)."""
    status = _git("status", "--porcelain", "--", *measures)
    uncommitted = [line[3:] for line in (status or "").splitlines() if line.strip()]
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return Stamp(commit=_git("rev-parse", "--short", "HEAD"), uncommitted=uncommitted,
                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=machine() + load,
                 software=f"Python {platform.python_version()}, torch {torch.__version__}", command=command)


def _code(text: str) -> str:
    """``text`` as Markdown inline code (double backticks when it holds one)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _stamp_box(s: Stamp, measures: Sequence[str], what: str) -> str:
    if s.commit is None:
        recorded = "commit unknown (not a git checkout)"
    else:
        recorded = f"commit {_code(s.commit)}"
        if s.uncommitted:
            recorded += " with uncommitted changes (" + ", ".join(_code(p) for p in s.uncommitted) + ")"
    rows = [("Measured", f"{s.machine}; {s.software}"), ("Command", _code(s.command)),
            ("Recorded at", f"{recorded}; {s.date}"),
            ("Regenerate", f"run the command again: it rewrites this {what} (through {_code(WRITER)}; "
                           f"{_code('--no-page')} leaves it as it is)"),
            ("Measures", ", ".join(_code(m) for m in measures))]
    return '!!! info "Stamp"\n' + "\n\n".join(f"    **{k}**: {v}" for k, v in rows)


# ---------------------------------------------------------------------- the page
def _front_matter(text: str) -> dict:
    if not text.startswith("---\n") or (end := text.find("\n---", 4)) < 0:
        return {}
    meta = yaml.safe_load(text[4:end])
    return meta if isinstance(meta, dict) else {}


def _oldest(commits: list[str]) -> str | None:
    """The newest commit all of ``commits`` descend from (their oldest when they lie on one line)."""
    if len(commits) < 2:
        return commits[0] if commits else None
    base = _git("merge-base", "--octopus", *commits)
    return _git("rev-parse", "--short", base) if base else commits[0]


def write_page(name: str, title: str, body_markdown: str, *, measures: list[str], command: str,
               figures: Sequence[Path] = (), part: str | None = None, part_title: str | None = None,
               script: str | None = None,
               results_dir: Path = RESULTS, figures_dir: Path = FIGURES) -> Path:
    """Write the results page ``docs/results/<name>.md`` (or one ``part`` of it) atomically.

    Parameters
    ----------
    name
        The page's file name without ``.md`` (``dp`` for ``docs/results/dp.md``).
    title
        The page's heading.
    body_markdown
        The tables (and any text) the study printed, as Markdown.
    measures
        The code the figures measure, paths from the repository root (files or folders): the stale
        check lists the page when a later commit changes one of them.
    command
        The exact command that measured the figures (:func:`invocation`).
    figures
        PNG files to show under the body; copied to ``figures_dir/<name>[-<part>]-<file name>``.
    part, part_title
        Write only this part of the page (under the heading ``part_title``), keeping its other
        script-written parts.
    script
        The script that regenerates it, for the stale check's message (default: from ``command``).
    results_dir, figures_dir
        Where pages and figures go (tests write elsewhere).

    Returns
    -------
    The page's path.
    """
    if not re.fullmatch(r"[\w.-]+", name) or (part is not None and not re.fullmatch(r"[\w.-]+", part)):
        raise ValueError(f"write_page: page and part names are plain file names, got {name!r} / {part!r}")
    missing = [m for m in measures if not (ROOT / m).exists()]
    if not measures or missing:
        raise ValueError(f"write_page: `measures` must name existing files, missing: {missing or 'all'}")
    script = script or " ".join(shlex.split(command)[1:2])
    s = stamp(measures, command)
    path = results_dir / f"{name}.md"
    prefix = f"{name}-{part}" if part else name
    shown = []
    for figure in figures:
        target = figures_dir / f"{prefix}-{Path(figure).name}"
        atomic_write_bytes(target, Path(figure).read_bytes())
        shown.append(f"![{Path(figure).stem}]({Path(os.path.relpath(target, results_dir)).as_posix()})")
    box = _stamp_box(s, measures, "part" if part else "page")
    text = "\n\n".join([*([f"## {part_title or part}"] if part else []), box, body_markdown.strip(), *shown]) + "\n"
    meta: dict[str, object] = {"measures": list(measures), "commit": s.commit, "script": script,
                               "date": s.date, "written_by": WRITER}
    if s.uncommitted:
        meta["uncommitted_changes"] = s.uncommitted
    if part is None:
        head = meta
    else:  # keep the other parts of a page already written in parts; a hand-copied page goes
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        parts = dict(_front_matter(old).get("parts") or {})
        texts = {m["name"]: m["text"] for m in PART.finditer(old)}
        parts = {k: v for k, v in parts.items() if k in texts}
        parts[part] = {k: v for k, v in meta.items() if k != "written_by"}  # in its place, or last
        texts[part] = text
        commits = [str(p["commit"]) for p in parts.values() if p.get("commit")]
        scripts = dict.fromkeys(str(p["script"]) for p in parts.values())
        head = {"measures": list(dict.fromkeys(m for p in parts.values() for m in p["measures"])),
                "commit": _oldest(commits), "script": " and ".join(scripts), "written_by": WRITER, "parts": parts}
        text = "\n".join(f"<!-- part {k} -->\n{texts[k]}<!-- end part {k} -->\n" for k in parts)
    if head.get("commit") is None:
        head.pop("commit")
    front = yaml.safe_dump(head, sort_keys=False, default_flow_style=None, width=10_000)
    atomic_write_text(path, f"---\n{front}---\n\n# {title}\n\n{text}")
    print(f"results page: {path}", flush=True)
    return path


# ---------------------------------------------------------------------- when to write
def add_page_option(parser: argparse.ArgumentParser) -> None:
    """``--no-page``: measure and print as usual, leave ``docs/results/`` alone."""
    parser.add_argument("--no-page", action="store_true",
                        help=f"do not write the results page in docs/results/ (or set {NO_PAGE_ENV}=1)")


def page_wanted(args: argparse.Namespace, name: str, *, partial: str | None = None) -> bool:
    """Whether this run writes ``docs/results/<name>.md``: not with ``--no-page`` or ``FAIRFORGET_NO_PAGE``,
    and not when the run measured less than the page shows (``partial`` says what; printed)."""
    reason = ("--no-page" if getattr(args, "no_page", False)
              else f"{NO_PAGE_ENV} is set" if os.environ.get(NO_PAGE_ENV, "") not in ("", "0")
              else partial)
    if reason:
        print(f"results page docs/results/{name}.md not written: {reason}", flush=True)
    return reason is None


@contextlib.contextmanager
def record_stdout() -> Iterator[io.StringIO]:
    """Print as usual and keep a copy of what was printed (``.getvalue()``)."""
    copy, real = io.StringIO(), sys.stdout

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            copy.write(text)
            return real.write(text)

        def flush(self) -> None:
            real.flush()

    sys.stdout = Tee()
    try:
        yield copy
    finally:
        sys.stdout = real
