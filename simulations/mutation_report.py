"""Kill rate per module of the last ``mutmut run`` (``make mutation``), from the results mutmut keeps in
``mutants/**/*.py.meta``.

Groups: ``fairforget/privacy/`` and ``fairforget/audit/`` as one module each, then sisa, ledger,
tombstones and verify. Kill rate = (killed + timeout) / checked, where checked leaves out mutants not
run (``not checked``: outside the names given to ``mutmut run``) and skipped ones; a mutant no
selected test covers (``no tests``) counts as surviving. ``--survivors N`` lists N surviving mutant
names per module (``mutmut show NAME`` prints the diff of one). ``--per-file`` adds a row per file of
the two folders (only files with mutants run: ``mutmut run 'fairforget.audit.probe*'`` measures one).

    python simulations/mutation_report.py [--survivors 20] [--per-file] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

GROUPS = ("fairforget/privacy", "fairforget/audit", "fairforget/sisa.py", "fairforget/ledger.py",
          "fairforget/tombstones.py", "fairforget/verify.py")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
          None: "not checked"}
KILLED = {"killed", "timeout", "caught by type check"}
NOT_RUN = {"not checked", "skipped"}


def group_of(path: Path) -> str | None:
    rel = path.as_posix().removeprefix("mutants/").removesuffix(".meta")
    return next((g for g in GROUPS if rel == g or rel.startswith(g + "/")), None)


def collect(root: Path, per_file: bool = False) -> dict[str, dict[str, str]]:
    """group -> mutant name -> status; with ``per_file`` also each file of a folder group (a key
    ``fairforget/audit/lira.py``, listed after its folder), where any of its mutants was run."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    files: dict[str, dict[str, str]] = {}
    for meta in sorted(root.glob("mutants/fairforget/**/*.py.meta")):
        group = group_of(meta.relative_to(root))
        if group is None:
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        statuses = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
        out[group].update(statuses)
        rel = meta.relative_to(root).as_posix().removeprefix("mutants/").removesuffix(".meta")
        if per_file and rel != group and any(v not in NOT_RUN for v in statuses.values()):
            files[rel] = statuses
    if per_file:
        ordered: dict[str, dict[str, str]] = {}
        for group in GROUPS:
            if group in out:
                ordered[group] = out[group]
            ordered.update({f: v for f, v in files.items() if f.startswith(group + "/")})
        return ordered
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", type=int, default=0, help="list this many surviving mutants per module")
    parser.add_argument("--per-file", action="store_true", help="a row per file of fairforget/privacy/ and audit/")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    results = collect(Path("."), per_file=args.per_file)
    if not results:
        print("mutation_report: error: no mutmut results under mutants/ (run `make mutation` first)", file=sys.stderr)
        return 2
    rows = {}
    print("| module | mutants | checked | killed | survived | no tests | kill rate |")
    print("|---|---|---|---|---|---|---|")
    for group in list(results) if args.per_file else GROUPS:
        statuses = results.get(group, {})
        counts = Counter(statuses.values())
        checked = sum(n for s, n in counts.items() if s not in NOT_RUN)
        killed = sum(n for s, n in counts.items() if s in KILLED)
        rate = killed / checked if checked else float("nan")
        rows[group] = {"mutants": len(statuses), "checked": checked, "killed": killed,
                       "survived": counts["survived"], "no_tests": counts["no tests"], "kill_rate": rate,
                       "survivors": sorted(n for n, s in statuses.items() if s in ("survived", "no tests"))}
        print(f"| {group} | {len(statuses)} | {checked} | {killed} | {counts['survived']} | {counts['no tests']} | "
              + (f"{rate:.0%} |" if checked else "not run |"))
    for row in rows.values():
        for name in row["survivors"][: args.survivors]:
            print(f"survived: {name}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
