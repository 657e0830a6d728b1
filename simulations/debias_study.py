"""Debiasing study (issue 12; Barbano et al., ICCVW 2021, on Biased-Digits): vanilla, the four
debiasing objectives, diffusion augmentation, and augmentation + an objective, at several rho,
through Flower's simulation engine. Reports unbiased accuracy, worst (class, colour) group, the
private-attribute probes' accuracy (the strongest of the audit's three, named, and the seed's linear
probe, on the ensemble's bottleneck; chance 0.10), the strongest membership attack's AUC and seconds.
A method may add an eraser (issue 25): ``leace``, ``end+leace``, ``end+leace-per-stage`` (the run-config
key ``eraser``); a study with one writes ``docs/results/debias-erasure.md`` (rows not run are listed):

    python simulations/debias_study.py --quick --rhos 0.99,0.95,0.9 --methods vanilla,leace,end+leace

    python simulations/debias_study.py                                 # everything (hours on 2 CPU cores)
    python simulations/debias_study.py --quick --methods vanilla,end --rhos 0.99,0.999
    python simulations/debias_study.py --methods augment,augment+end --rhos 0.99

Each row is one ``fairforget simulate`` run in ``OUT/<method>-rho<rho>/`` (a finished one is reused
unless ``--rerun``). Rhos whose data (every shard, the held-out and test sets) is the same are run
once: the other rows show that run at their own rho, named ``<method>-rho<rho> (= <method>-rho<run>)``
(on Biased-Digits, 0.995 equals 0.99 and 0.997 equals 0.999). Augmented rows run at the rhos in
``--augment-rhos`` only (default 0.99: each costs about 15 minutes on 2 cores). Output, through
:mod:`fairforget.compare`: ``OUT/table.md`` and ``OUT/table.png`` (every row),
``OUT/probe_per_rho.png`` and ``OUT/probe_vs_unbiased.png`` (the seed's two plots), ``OUT/study.json``
(rows, wall seconds, the rows that are another rho's run). A run of every default method at every
default rho with no row missing or failed also writes ``docs/results/debiasing.md`` (the table and
the plots, stamped; ``--no-page`` does not).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairforget.compare import markdown, plot_by, plot_tradeoff, read_run, rows_as_dicts, write_rows  # noqa: E402
from fairforget.config import ERASERS, ConfigError, parse_set, resolve  # noqa: E402
from fairforget.data import load_dataset, shard_of  # noqa: E402
from fairforget.objectives import REGISTRY as OBJECTIVES  # noqa: E402
from fairforget.storage import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from simulations.results_page import add_page_option, invocation, page_wanted, write_page  # noqa: E402
from simulations.simulate_cli import simulate as run_simulate  # noqa: E402
from simulations.simulate_cli import toml_value  # noqa: E402

RHOS = (0.99, 0.995, 0.997, 0.999, 0.90, 0.95)
METHODS = ("vanilla", "end", "learned-mixin", "rubi", "rebias", "augment", "augment+end")
BASE = {"audit-attacks": '"loss,rmia"', "audit-references": 2}
# the levers that helped on a CPU (docs/results/augmentation-levers.md)
AUGMENT_PRESET = ROOT / "presets" / "augment-cpu.toml"
QUICK = {"audit-attacks": '"loss,confidence,entropy"', "audit-references": 0, "audit-bootstrap": 50}


def load_preset(path: Path) -> dict[str, str]:
    """A flat TOML of run-config keys, as ``--set`` values."""
    if not path.is_file():
        raise ConfigError(f"--augment-preset: no such file: {path}")
    with path.open("rb") as fh:
        return {k: toml_value(v) for k, v in tomllib.load(fh).items()}


def method_sets(method: str, augment_keys: dict[str, str] | None = None) -> dict[str, object]:
    """Run-config keys of one method: ``vanilla``, an objective name, ``augment`` or ``augment+NAME``
    (the augmented ones with ``augment_keys``, the keys of the augmentation preset), each optionally
    with an eraser (``+leace``, ``+leace-per-stage``: the ``eraser`` key); ``leace`` alone is vanilla
    training with the post-hoc eraser."""
    parts = method.split("+")
    erasers = [p for p in parts if p in ERASERS and p != "none"]
    if len(erasers) > 1:
        raise ConfigError(f"--methods: {method!r} names two erasers")
    if erasers:
        rest = "+".join(p for p in parts if p != erasers[0]) or "vanilla"
        return {**method_sets(rest, augment_keys), "eraser": json.dumps(erasers[0])}
    augment, _, objective = method.rpartition("+") if "+" in method else ("", "", method)
    if method == "augment":
        augment, objective = "augment", "cross-entropy"
    objective = "cross-entropy" if objective == "vanilla" else objective
    if not OBJECTIVES.known(objective) or augment not in ("", "augment"):  # a plugin objective too
        raise ConfigError(f"--methods: unknown method {method!r} (vanilla, {', '.join(OBJECTIVES.names())}, "
                          "augment, augment+OBJECTIVE)")
    sets: dict[str, object] = {"objective": json.dumps(objective)}
    if augment:
        sets.update(augment_keys or {})
        sets["augment"] = "true"
    return sets


def data_fingerprint(sets: dict[str, object]) -> str:
    """A hash of everything a row's figures depend on through its data: every shard's training
    samples and the held-out and test sets. Two rhos with one fingerprint give the same run (at
    1,079 training digits, rho 0.99 and 0.995 both leave one bias-conflicting image per class)."""
    cfg = resolve(parse_set([f"{k}={v}" for k, v in sets.items()]))
    bundle = load_dataset(cfg)
    h = hashlib.sha256()
    for part in [*shard_of(cfg, bundle), bundle.heldout, bundle.test_biased, bundle.test_unbiased]:
        for t in (part.ids, part.y, part.private, part.x):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def finished(run: Path) -> bool:
    """Whether ``run`` holds a run that finished (its status says ok and its metrics are written)."""
    if not ((run / "metrics.json").is_file() and (run / "status.json").is_file()):
        return False
    return bool(json.loads((run / "status.json").read_text()).get("ok"))


def simulate(out: Path, sets: dict[str, object], rerun: bool) -> float:
    """Run one ``fairforget simulate`` (or reuse a finished one); its wall seconds (0 when reused)."""
    if not rerun and finished(out):
        print(f"reusing {out}", flush=True)
        return 0.0
    return run_simulate(out, sets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="debias_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rhos", default=",".join(f"{r:g}" for r in RHOS), help="rho values, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="vanilla, an objective (end, learned-mixin, rubi, rebias), augment, augment+OBJECTIVE")
    parser.add_argument("--augment-rhos", default="0.99", help="rhos at which augmented methods run (default 0.99)")
    parser.add_argument("--augment-preset", type=Path, default=AUGMENT_PRESET,
                        help="run-config keys (flat TOML) of the augmented methods (default presets/augment-cpu.toml)")
    parser.add_argument("--quick", action="store_true",
                        help="reference-free attacks only (LOSS, confidence, entropy), 50 bootstrap resamples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config keys")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "debias_study")
    parser.add_argument("--rerun", action="store_true", help="rerun rows whose folder already holds a finished run")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate and plot the rows whose runs have finished, list the others")
    add_page_option(parser)
    args = parser.parse_args(argv)
    try:
        rhos = [float(r) for r in args.rhos.split(",") if r.strip()]
        aug_rhos = {float(r) for r in args.augment_rhos.split(",") if r.strip()}
        if not rhos or any(not 0.0 <= r <= 1.0 for r in rhos):
            raise ConfigError(f"--rhos: every rho must be in [0, 1], got {args.rhos!r}")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        extra = {k: toml_value(v) for k, v in parse_set(args.set).items()}
        augment_keys = load_preset(args.augment_preset)
        base = {**BASE, **(QUICK if args.quick else {})}
        row_sets = lambda m, r: {**base, **method_sets(m, augment_keys), **extra, "rho": r}  # noqa: E731
        plan = [(m, r) for r in rhos for m in methods if not m.startswith("augment") or r in aug_rhos]
        for m, r in plan:  # every row's config is checked before the first run starts
            resolve(parse_set([f"{k}={v}" for k, v in row_sets(m, r).items()]))
        prints = {r: data_fingerprint(row_sets(methods[0], r)) for r in rhos}
    except (ConfigError, ValueError) as exc:
        print(f"debias_study: error: {exc}", file=sys.stderr)
        return 2
    if not plan:
        print("debias_study: error: no rows to run (augmented methods run only at --augment-rhos)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    folder_of = lambda m, r: args.out / f"{m.replace('+', '-')}-rho{r:g}"  # noqa: E731
    # rows of one method whose data is the same (keys differing only in rho) are one run: the first of
    # them that has finished, else the first in the plan; the others show it at their own rho
    source = {}
    for m, r in plan:
        twins = [r0 for m0, r0 in plan if m0 == m and prints[r0] == prints[r]]
        source[m, r] = next((r0 for r0 in twins if finished(folder_of(m, r0))), twins[0])
    rows, walls, method_of, missing, copies, failed = [], {}, {}, [], {}, []
    for m, r in plan:
        name, folder = folder_of(m, r).name, folder_of(m, source[m, r])
        if args.report_only or source[m, r] != r:
            if not finished(folder):
                missing.append(name)
                continue
        else:
            try:
                walls[name] = simulate(folder, row_sets(m, r), args.rerun)
            except subprocess.CalledProcessError:  # the run printed its one-line error; go on with the others
                failed.append(name)
                continue
        if source[m, r] == r:
            row = read_run(folder)
        else:  # the same run, shown at its own rho
            copies[name] = folder.name
            row = dataclasses.replace(read_run(folder, f"{name} (= {folder.name})"), rho=r)
        rows.append(row)
        method_of[row.name] = m
    failures = f"{len(failed)} row(s) failed (see each run's status.json): {', '.join(failed)}"
    if not rows:
        print(f"debias_study: error: no finished rows to report{'; ' + failures if failed else ''}",
              file=sys.stderr)
        return 2
    md, png = write_rows(rows, args.out / "table")
    label = lambda row: method_of[row.name]  # noqa: E731
    atomic_write_bytes(args.out / "probe_per_rho.png",
                       plot_by(rows, "rho", "probe", label, "private-attribute probe accuracy per rho (chance 0.10)"))
    atomic_write_bytes(args.out / "probe_vs_unbiased.png",
                       plot_tradeoff(rows, label, "probe accuracy vs unbiased accuracy"))
    atomic_write_json(args.out / "study.json", {"base": {**base, **extra}, "rows": rows_as_dicts(rows),
                                                "methods": method_of, "wall_seconds": walls, "not_run": missing,
                                                "same_training_set": copies, "failed": failed})
    atomic_write_text(args.out / "command.txt", "python simulations/debias_study.py " + " ".join(
        argv if argv is not None else sys.argv[1:]) + "\n")
    print(markdown(rows))
    if missing:
        print(f"not run: {', '.join(missing)}")
    print(f"table: {md}\nplots: {png}, {args.out / 'probe_per_rho.png'}, {args.out / 'probe_vs_unbiased.png'}")
    partial = ("rows not run or failed" if missing or failed
               else "not every default method and rho" if not (set(METHODS) <= set(methods) and set(RHOS) <= set(rhos))
               else None)
    if any("eraser" in method_sets(m, augment_keys) for m in methods):  # the erasure study has its own page
        if page_wanted(args, "debias-erasure", partial="rows failed" if failed else None):  # rows not run: listed
            write_page("debias-erasure", "Erasure of the private attribute against the strong probes",
                       erasure_body(markdown(rows), rows, copies, missing),
                       measures=[*PAGE_MEASURES, "fairforget/erasure.py"],
                       command=invocation(None if argv is None else [__file__, *argv]),
                       figures=[png, args.out / "probe_vs_unbiased.png", args.out / "probe_per_rho.png"])
    elif page_wanted(args, "debiasing", partial=partial):
        write_page("debiasing", "Debiasing results", page_body(markdown(rows), copies), measures=PAGE_MEASURES,
                   command=invocation(None if argv is None else [__file__, *argv]),
                   figures=[png, args.out / "probe_per_rho.png", args.out / "probe_vs_unbiased.png"])
    if failed:
        print(f"debias_study: error: {failures}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- results page
PAGE_MEASURES = ["fairforget/objectives/", "fairforget/diffusion/", "clients/augment.py", "server/augment.py",
                 "fairforget/audit/", "simulations/debias_study.py", "presets/augment-cpu.toml"]


def page_body(table: str, copies: dict[str, str]) -> str:
    """The printed table and what its rows are, for docs/results/debiasing.md."""
    same = "; ".join(f"{row} is {run}" for row, run in copies.items())
    return ("One `fairforget simulate` per (method, rho) through Flower's simulation engine, tabulated with "
            "`fairforget compare`; the probe is the audit's linear probe on the bottleneck (chance 0.10). "
            "`train s` of an augmented row includes the augmentation step. A finished run is reused unless "
            "`--rerun`: the seconds are those of the run that made it."
            + (f" Rows whose data equals another rho's show that run: {same}." if same else "")
            + "\n\n" + table)


def erasure_body(table: str, rows: list, copies: dict[str, str], missing: list[str]) -> str:
    """The erasure study's page: what its rows are, the aims and which rows reached them, the table."""
    def reached(rho: float, within: float, accuracy: float) -> str:
        hits = [r for r in rows if abs(r.rho - rho) < 1e-9 and r.probe is not None and r.probe_chance is not None
                and abs(r.probe - r.probe_chance) <= within and r.accuracy_unbiased >= accuracy]
        return (", ".join(f"`{r.name}` (strongest probe {r.probe:.3f}, unbiased {r.accuracy_unbiased:.3f})"
                          for r in hits) or "not reached by any row run")
    same = "; ".join(f"{row} is {run}" for row, run in copies.items())
    return ("One `fairforget simulate` per (method, rho) through Flower's simulation engine, tabulated with "
            "`fairforget compare`. `+leace`: the post-hoc LEACE eraser on each shard model's bottleneck (fitted "
            "at the site on its own data after each stage, with a head refitted on the erased features, groups "
            "balanced); `+leace-per-stage`: also refit before each stage trains (training-time). The *strongest "
            "probe* is the highest of the audit's three attribute probes on the ensemble's concatenated features "
            "(`biased-linear`: the seed's, trained on the biased training data; `independent-linear` and "
            "`independent-mlp`: trained on half the classes of the unbiased test set, scored on the other half); "
            "chance 0.10. *seed probe*: the seed's alone. A finished run is reused unless `--rerun`; the machine "
            "was shared with other jobs (seconds are wall-clock under that load).\n\n"
            "Aim 1 (the demo configuration, rho 0.99: strongest probe within 0.05 of chance, unbiased accuracy "
            f">= 0.25): {reached(0.99, 0.05, 0.25)}.\n\n"
            f"Aim 2 (rho 0.95: within 0.10 of chance, unbiased accuracy >= 0.70): {reached(0.95, 0.10, 0.70)}."
            + (f" Rows whose data equals another rho's show that run: {same}." if same else "")
            + (f"\n\nNot run (the machine's time ran out): {', '.join(missing)}." if missing else "")
            + "\n\n" + table)


if __name__ == "__main__":
    sys.exit(main())
