"""Corrupted-data unlearning: what each method removes when only part of the corruption is known.

The space of REM's authors (arXiv 2505.17730): the *discovery rate* (the fraction of the corrupted
samples known at unlearning time) and the *statistical regularity* of the corruption, from random
exemplars to a shared concept. Two corruption kinds on shard 0 of the embedded data (Biased-Digits,
rho = 0.1 unless ``--set``, so the digits must be learned):

* ``flips`` (random exemplars): 5% of the shard's samples get a random other label;
* ``trigger`` (a shared concept, backdoor-like): 5% of the shard's samples of the other classes get a
  small checkerboard patch in the bottom-right corner and the label of class ``--target`` (0).

The shard is trained on the corrupted data (SISA, the run config's slices and epochs), then a
deletion of the *discovered* ids (the first ``rate`` of a seeded order of the corrupted ids, at least
one) is served by each method, each on its own copy of the trained shard: exact SISA retraining of
the discovered ids, finetune, NegGrad+, SCRUB and REM (``fairforget.unlearning``). Figures per
method: accuracy on the clean unbiased test set; the corruption's effect, *flip-consistency* (the
share of all corrupted training samples, discovered or not, on which the model predicts the
corrupted label) for ``flips``, *attack success rate* (the share of patched test images of the
other classes predicted as the target) for ``trigger``; and seconds (the method's training compute;
for exact, the retraining). ``before`` is the corrupted model; exact retraining at rate 1.0 is the
model that never saw the corruption.

In-process at library level, on shard models (no Flower: the deletion path under test is the
shard's, which Flower only carries), so the grid takes minutes. Run from the repository root::

    nice -n 10 python simulations/corruption_study.py                    # rates 0.1 0.5 1.0, seeds 0 1 2
    python simulations/corruption_study.py --seeds 0 --rates 0.1 --no-page   # one quick slice

Prints a table per corruption kind, writes the figures to ``--out`` (default
``runs/corruption_study.json``), a plot to ``runs/corruption_study.png``, and, for the full grid,
the results page ``docs/results/corruption.md``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairforget.config import ConfigError, RunConfig, parse_set, resolve
from fairforget.data import DatasetError, SampleSet, load_dataset, shard_of
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.storage import atomic_write_json
from fairforget.unlearning import EXACT, get_unlearner
from fairforget.unlearning.approximate import UnlearnParams, accuracy, current_state, model_from
from simulations.results_page import add_page_option, invocation, page_wanted, record_stdout, write_page

KINDS = ("flips", "trigger")
RATES = (0.1, 0.5, 1.0)
METHODS = (EXACT, "finetune", "neggrad", "scrub", "rem")
APPROXIMATE = tuple(m for m in METHODS if m != EXACT)
SEEDS = (0, 1, 2)
FRACTION = 0.05  # of the shard's samples corrupted
# no colour shortcut (the digits must be learned); enough epochs to learn the trigger; width 4 (not 8) to fit
# the grid into a shared 2-core machine's time
DEFAULTS = {"rho": 0.1, "epochs-per-slice": 10, "model-width": 4}
DEFAULT_OUT = Path("runs/corruption_study.json")
CLEAN_LOSS_LIMIT = 0.02  # the aim: REM loses at most 2 points of clean accuracy
MEASURES = ["fairforget/unlearning/", "simulations/corruption_study.py"]


class StudyError(ValueError):
    """A request the study cannot serve; the message is one line for the user."""


# ---------------------------------------------------------------------- the corruption
def stamp(x: torch.Tensor) -> torch.Tensor:
    """The trigger: a checkerboard patch (white/black) in the bottom-right corner, a quarter of the image's
    side (4 px at 16 px; at a fifth, 3 px, the shard model did not learn it: attack success 0.09)."""
    side = max(2, x.shape[-1] // 4)
    patch = (torch.arange(side)[:, None] + torch.arange(side)[None, :]) % 2
    out = x.clone()
    out[..., -side:, -side:] = patch.to(x.dtype)
    return out


def corrupt(data: SampleSet, kind: str, num_classes: int, target: int, seed: int) -> tuple[SampleSet, list[int]]:
    """A copy of ``data`` with ``FRACTION`` of its samples corrupted, and their ids in a seeded
    discovery order (the first ones are found first)."""
    rng = np.random.default_rng([seed, 7])
    n = max(1, round(FRACTION * len(data)))
    out = copy.copy(data)
    out.x, out.y = data.x.clone(), data.y.clone()
    if kind == "flips":
        pos = rng.choice(len(data), size=n, replace=False)
        shift = torch.as_tensor(rng.integers(1, num_classes, size=n))
        out.y[pos] = (data.y[pos] + shift) % num_classes
    elif kind == "trigger":
        others = np.flatnonzero(data.y.numpy() != target)
        pos = rng.choice(others, size=min(n, len(others)), replace=False)
        out.x[pos] = stamp(data.x[pos])
        out.y[pos] = target
    else:
        raise StudyError(f"unknown corruption kind {kind!r}; kinds: {', '.join(KINDS)}")
    return out, [int(i) for i in data.ids[pos]]


def effect(model: torch.nn.Module, kind: str, corrupted: SampleSet, test: SampleSet, target: int) -> float:
    """Flip-consistency (``flips``) or attack success rate (``trigger``)."""
    if kind == "flips":
        return accuracy(model, corrupted)  # accuracy on the corrupted labels
    others = test.subset(np.flatnonzero(test.y.numpy() != target))
    patched = copy.copy(others)
    patched.x, patched.y = stamp(others.x), torch.full_like(others.y, target)
    return accuracy(model, patched)


# ---------------------------------------------------------------------- one kind, one seed
def run_kind(cfg: RunConfig, kind: str, rates: list[float], methods: list[str], workdir: Path,
             target: int = 0) -> dict[str, Any]:
    """Train shard 0 on data with ``kind`` corruption, then serve the discovered ids at each rate with
    each method on a copy. Returns the rows (``method``, ``rate``, ``clean_acc``, ``effect``,
    ``seconds``) and the corrupted model's figures."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    bundle = load_dataset(cfg)
    if not 0 <= target < bundle.num_classes:
        raise StudyError(f"--target {target}: the dataset has classes 0 to {bundle.num_classes - 1}")
    data, order = corrupt(shard_of(cfg, bundle)[0], kind, bundle.num_classes, target, cfg.seed)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    params = UnlearnParams.from_config(cfg)
    corrupted = data.select_ids(sorted(order))
    test = bundle.test_unbiased
    base_dir = workdir / f"{kind}-base"
    base = SisaShard(base_dir, 0, data, settings)
    train_seconds = base.train_through()
    model = model_from(base.model_state(), base)
    before = {"clean_acc": accuracy(model, test), "effect": effect(model, kind, corrupted, test, target)}
    rows = []
    for rate in rates:
        ids = sorted(order[: max(1, round(rate * len(order)))])
        for name in methods:
            where = workdir / f"{kind}-{rate}-{name}"
            shutil.copytree(base_dir, where)
            shard = SisaShard(where, 0, data, settings)
            result = get_unlearner(name)(shard, ids, params)
            after = model_from(current_state(shard), shard)
            rows.append({"method": name, "rate": rate, "discovered": len(ids),
                         "clean_acc": accuracy(after, test), "effect": effect(after, kind, corrupted, test, target),
                         "seconds": result.seconds})
            shutil.rmtree(where)
    shutil.rmtree(base_dir)
    return {"kind": kind, "seed": cfg.seed, "shard_size": len(data), "corrupted": len(order),
            "train_seconds": train_seconds, "before": before, "rows": rows}


# ---------------------------------------------------------------------- summary
def mean_rows(runs: list[dict[str, Any]]) -> dict[tuple[str, str, float], dict[str, float]]:
    """(kind, method, rate) -> the mean and spread over seeds of each figure; ``before`` at rate 0."""
    cells: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for run in runs:
        cells.setdefault((run["kind"], "before", 0.0), []).append(run["before"])
        for row in run["rows"]:
            cells.setdefault((run["kind"], row["method"], row["rate"]), []).append(row)
    out = {}
    for key, rows in cells.items():
        out[key] = {f: float(np.mean([r[f] for r in rows])) for f in ("clean_acc", "effect")}
        out[key]["effect_sd"] = float(np.std([r["effect"] for r in rows]))
        out[key]["seconds"] = float(np.mean([r.get("seconds", np.nan) for r in rows]))
        out[key]["n"] = len(rows)
    return out


def tables(summary: dict, kinds: list[str], rates: list[float], methods: list[str]) -> str:
    name = {"flips": "flip-consistency", "trigger": "attack success rate"}
    lines = []
    for kind in kinds:
        b = summary[(kind, "before", 0.0)]
        lines += [f"\n**{kind}** (effect = {name[kind]}; before unlearning: clean acc {b['clean_acc']:.3f}, "
                  f"effect {b['effect']:.3f})\n",
                  "| method | " + " | ".join(f"rate {r}: clean acc / effect / s" for r in rates) + " |",
                  "|---|" + "---|" * len(rates)]
        for m in methods:
            cells = []
            for r in rates:
                c = summary[(kind, m, r)]
                cells.append(f"{c['clean_acc']:.3f} / {c['effect']:.3f} ± {c['effect_sd']:.3f} / {c['seconds']:.2f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aim(summary: dict, kinds: list[str], rate: float) -> list[str]:
    """REM at ``rate`` against every other approximate method: lower effect, and clean accuracy
    within ``CLEAN_LOSS_LIMIT`` of the model before unlearning."""
    out = []
    for kind in kinds:
        if (kind, "rem", rate) not in summary:
            continue
        rem, before = summary[(kind, "rem", rate)], summary[(kind, "before", 0.0)]
        others = {m: summary[(kind, m, rate)]["effect"] for m in APPROXIMATE
                  if m != "rem" and (kind, m, rate) in summary}
        best = min(others, key=others.get) if others else None
        beats = all(rem["effect"] < e for e in others.values())
        loss = before["clean_acc"] - rem["clean_acc"]
        out.append(f"- {kind} at rate {rate}: REM effect {rem['effect']:.3f} vs best other approximate "
                   f"({best}) {others.get(best, float('nan')):.3f}: {'lower' if beats else 'NOT lower'}; clean "
                   f"accuracy {rem['clean_acc']:.3f} vs {before['clean_acc']:.3f} before "
                   f"({100 * (rem['clean_acc'] - before['clean_acc']):+.1f} points): "
                   f"{'within' if loss <= CLEAN_LOSS_LIMIT else 'NOT within'} 2 points")
    return out


def plot(summary: dict, kinds: list[str], rates: list[float], methods: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = {"flips": "flip-consistency", "trigger": "attack success rate"}
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 7), squeeze=False)
    for j, kind in enumerate(kinds):
        b = summary[(kind, "before", 0.0)]
        for row, (fig_name, ylabel) in enumerate([("effect", label[kind]), ("clean_acc", "clean test accuracy")]):
            ax = axes[row][j]
            for m in methods:
                ax.plot(rates, [summary[(kind, m, r)][fig_name] for r in rates], marker="o", label=m)
            ax.axhline(b[fig_name], color="grey", linestyle="--", label="before")
            ax.set_xlabel("discovery rate")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{kind}: {ylabel}")
            ax.set_xticks(rates)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corruption_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES), help="discovery rates")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--target", type=int, default=0, help="the trigger's target class (default 0)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", help="override a run-config key")
    parser.add_argument("--jobs", type=int, default=1, help="(seed, kind) runs in parallel processes (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    add_page_option(parser)
    args = parser.parse_args(argv)
    command = invocation(None if argv is None else ["simulations/corruption_study.py", *argv])
    try:
        if any(not 0 < r <= 1 for r in args.rates):
            raise StudyError(f"--rates {args.rates}: each must be in (0, 1]")
        for m in args.methods:
            get_unlearner(m)  # an unknown method: one line, before anything trains
        base_cfg = resolve({**DEFAULTS, **parse_set(args.set or [])})
        t0 = time.perf_counter()
        jobs = [(seed, kind) for seed in args.seeds for kind in args.kinds]
        with tempfile.TemporaryDirectory(prefix="fairforget-corruption-") as tmp, \
                ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_kind, base_cfg.replace(seed=seed), kind, args.rates, args.methods,
                                   Path(tmp) / f"s{seed}", args.target): (seed, kind) for seed, kind in jobs}
            for future in as_completed(futures):
                print(f"seed {futures[future][0]} {futures[future][1]}: done ({time.perf_counter() - t0:.0f}s so far)",
                      flush=True)
            runs = [f.result() for f in futures]
    except (ConfigError, DatasetError, StudyError) as exc:
        print(f"corruption_study: error: {exc}", file=sys.stderr)
        return 2
    summary = mean_rows(runs)
    c = base_cfg
    with record_stdout() as printed:
        print(f"\n{c.dataset}, rho = {c.rho}, {c.image_size} px, width {c.model_width}, {c.slices} slices x "
              f"{c.epochs_per_slice} epochs; shard 0 of {c.num_shards} ({runs[0]['shard_size']} samples, "
              f"{runs[0]['corrupted']} corrupted = {FRACTION:.0%}); unlearn-epochs {c.unlearn_epochs}, unlearn-lr "
              f"{c.unlearn_lr}; mean over seeds {', '.join(map(str, args.seeds))} (± the effect's standard deviation); "
              f"seconds: the method's training compute, 1 torch thread, under `nice -n 10` on a machine shared with "
              f"other jobs")
        print(tables(summary, args.kinds, args.rates, args.methods))
        lowest = min(args.rates)
        print(f"\nThe aim (REM at discovery rate {lowest} removes more of the corruption's effect than every other "
              "approximate method, losing at most 2 points of clean accuracy):")
        print("\n".join(aim(summary, args.kinds, lowest)))
    atomic_write_json(args.out, {"config": c.to_mapping(), "command": command, "runs": runs})
    png = plot(summary, args.kinds, args.rates, args.methods, args.out.with_suffix(".png"))
    print(f"\nfigures: {args.out}, plot: {png}")
    full = (sorted(args.kinds) == sorted(KINDS) and sorted(args.rates) == sorted(RATES)
            and sorted(args.methods) == sorted(METHODS) and len(args.seeds) >= len(SEEDS))
    if page_wanted(args, "corruption", partial=None if full else "not the full grid (kinds, rates, methods, 3 seeds)"):
        body = ("In-process at library level on shard models (no Flower), shard 0; see "
                "`simulations/corruption_study.py` and "
                "[unlearning corrupted data](../explanation/unlearning-corrupted.md). "
                + printed.getvalue())
        write_page("corruption", "Corrupted-data unlearning: discovery rate x regularity", body,
                   measures=MEASURES, command=command, figures=[png])
    return 0


if __name__ == "__main__":
    sys.exit(main())
