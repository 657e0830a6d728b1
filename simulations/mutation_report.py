"""Kill rate per module of the last ``mutmut run`` (``make mutation``), from the results mutmut keeps in
``mutants/**/*.py.meta``.

Groups: ``fairforget/privacy/`` and ``fairforget/audit/`` as one module each, then sisa, ledger,
tombstones and verify. Kill rate = (killed + timeout) / checked, where checked leaves out mutants not
run (``not checked``: outside the names given to ``mutmut run``) and skipped ones; a mutant no
selected test covers (``no tests``) counts as surviving. ``--survivors N`` lists N surviving mutant
names per module (``mutmut show NAME`` prints the diff of one). ``--per-file`` adds a row per file of
the two folders (only files with mutants run: ``mutmut run 'fairforget.audit.probe*'`` measures one).

With ``--sampled``, a row per file sampled by ``simulations/mutation_sample.py`` (the names it recorded
in ``mutants/mutation-sample.json``): the kill rate of the sample and its exact (Clopper-Pearson) 95%
interval, the estimate of the whole file's rate.

    python simulations/mutation_report.py [--survivors 20] [--per-file] [--sampled] [--json OUT.json]
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


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval on a rate seen ``k`` times in ``n`` trials."""
    from scipy.stats import beta

    a = (1.0 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return low, high


def sampled(root: Path) -> dict[str, dict]:
    """file -> the figures of its recorded sample (statuses read from the file's ``.meta`` now)."""
    path = root / "mutants/mutation-sample.json"
    if not path.exists():
        return {}
    rows = {}
    for file, entry in json.loads(path.read_text()).items():
        meta = root / "mutants" / (file + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        statuses = {name: STATUS.get(codes.get(name), "suspicious") if name in codes else "gone"
                    for name in entry["names"]}
        counts = Counter(statuses.values())
        checked = sum(n for s, n in counts.items() if s not in NOT_RUN | {"gone"})
        killed = sum(n for s, n in counts.items() if s in KILLED)
        low, high = clopper_pearson(killed, checked) if checked else (float("nan"), float("nan"))
        rows[file] = {"mutants": entry["mutants"], "sample": entry["sample"], "seed": entry["seed"],
                      "checked": checked, "killed": killed, "kill_rate": killed / checked if checked else float("nan"),
                      "ci95": [low, high], "not_run": entry["sample"] - checked,
                      # every unfinished mutant (a run stopped by --max-minutes) taken as surviving
                      "kill_rate_unrun_surviving": killed / entry["sample"],
                      "ci95_unrun_surviving": list(clopper_pearson(killed, entry["sample"])),
                      "survivors": sorted(n for n, s in statuses.items() if s in ("survived", "no tests"))}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", type=int, default=0, help="list this many surviving mutants per module")
    parser.add_argument("--per-file", action="store_true", help="a row per file of fairforget/privacy/ and audit/")
    parser.add_argument("--sampled", action="store_true", help="also the sampled files' rates with 95%% intervals")
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
    if args.sampled:
        samples = sampled(Path("."))
        print()
        print("| file (sampled) | mutants | sample (seed) | run | killed | kill rate | 95% interval | "
              "unrun taken as surviving |")
        print("|---|---|---|---|---|---|---|---|")
        for file, row in samples.items():
            low, high = row["ci95"]
            rate = f"{row['kill_rate']:.0%} | {low:.0%}-{high:.0%}" if row["checked"] else "not run | -"
            worst = "-" if not row["not_run"] else (f"{row['kill_rate_unrun_surviving']:.0%} "
                                                    f"({row['ci95_unrun_surviving'][0]:.0%}-"
                                                    f"{row['ci95_unrun_surviving'][1]:.0%})")
            print(f"| {file} | {row['mutants']} | {row['sample']} ({row['seed']}) | {row['checked']} | "
                  f"{row['killed']} | {rate} | {worst} |")
        for row in samples.values():
            for name in row["survivors"][: args.survivors]:
                print(f"survived (sample): {name}")
        rows["sampled"] = samples
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
