"""Compare the unlearning methods with exact SISA retraining on the same deletion request.

In-process, no Flower (like ``simulations/benchmark.py``): train one SISA shard of the run config
(shard 0; every key at its ``pyproject.toml`` default, rho = 0.1, unless ``--set``; with ``--run DIR``
the config of that finished run instead, ``--set`` still applied on top, the rho = 0.1 default not) in a
scratch folder, pick ``--k`` of its samples as the forget set, then serve the same request with every
method in ``fairforget.unlearning.UNLEARNERS`` on a copy of the trained shard. By default the forget set's
labels are shifted by one (y + 1 mod K) before training, so the model can only fit them by memorising:
the regime in which unlearning is visible (``--natural`` keeps the true labels; with the colour shortcut
at rho = 0.99 every model then scores about 1.0 on them, before and after). Reported per method:

* accuracy on the forget set, the retained set and the unbiased test set;
* membership-inference AUC of the forget set against the held-out non-members (the ``loss`` attack,
  :mod:`fairforget.audit.loss`), the shard model as target: about 0.5 means the forget set looks like
  data the model never saw;
* seconds (training compute of the method; for exact, the retraining) and the ratio to exact.

Run from the repository root::

    python simulations/unlearning_compare.py                        # k = 20, rho = 0.1
    python simulations/unlearning_compare.py --k 5 --set rho=0.99 --natural
    python simulations/unlearning_compare.py --out runs/unlearning_compare.json
    python simulations/unlearning_compare.py --run runs/demo --k 10   # a finished run's config

Prints a markdown table and writes the figures to ``--out`` (default ``runs/unlearning_compare.json``;
with ``--run`` only when ``--out`` is given). With ``--run DIR`` the figures are also stored in
``DIR/metrics.json`` under ``unlearning_methods`` and ``DIR/report.md`` is rendered again; the run's
node state, models, ledger and budget are never touched (shard 0 is retrained from its data, less the ids
the run's ledger has deleted, in a temporary folder). Without ``--run`` (and without ``--no-page``) the
table also goes to ``docs/results/unlearning-methods.md``, stamped.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairforget.audit.base import TargetOutputs
from fairforget.audit.loss import LossAttack
from fairforget.audit.references import predict_probs
from fairforget.audit.roc import auc
from fairforget.config import ConfigError, RunConfig, parse_set, resolve
from fairforget.data import DatasetError, SampleSet, load_dataset, shard_of
from fairforget.report import unlearning_methods_table, write_report
from fairforget.run import RunDir, RunDirError
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.storage import atomic_write_json
from fairforget.unlearning import EXACT, UNLEARNERS, approximate, get_unlearner
from fairforget.unlearning.approximate import UnlearnParams, accuracy, model_from
from simulations.results_page import add_page_option, page_wanted, record_stdout, write_page

DEFAULT_OUT = Path("runs/unlearning_compare.json")
DEFAULTS = {"rho": 0.1}  # no colour shortcut: the digits must be learned, members can be memorised
# (pyproject defaults only: with --run the run's own rho is kept)
SCRIPT = "python simulations/unlearning_compare.py"


class CompareError(ValueError):
    """A request the comparison cannot serve; the message is one line for the user."""


def loss_auc(model: torch.nn.Module, members: SampleSet, nonmembers: SampleSet) -> float:
    cand = SampleSet.concat([members, nonmembers])
    with torch.no_grad():
        probs = predict_probs([model.cpu()], cand.x)
    target = TargetOutputs(probs, cand.y.numpy(), probs[:0], cand.y.numpy()[:0])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    return auc(LossAttack().scores(target, None), is_member)


def figures(shard: SisaShard, forget: SampleSet, test: SampleSet, heldout: SampleSet) -> dict[str, float]:
    model = model_from(approximate.current_state(shard), shard)
    return {
        "forget_accuracy": accuracy(model, forget),
        "retain_accuracy": accuracy(model, shard.live_data()),
        "test_accuracy": accuracy(model, test),
        "forget_mia_auc": loss_auc(model, forget, heldout),
    }


def compare(cfg: RunConfig, k: int, natural: bool, workdir: Path,
            exclude: set[int] | None = None) -> dict[str, Any]:
    """Serve one request of ``k`` samples of shard 0 (less the ids in ``exclude``: a run's deleted ids)
    with every method, each on its own copy of the shard trained from scratch in ``workdir``."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    gone = np.isin(data.ids.numpy(), sorted(exclude or ()))
    excluded = int(gone.sum())
    if excluded:
        data = data.subset(np.flatnonzero(~gone))
    if not 1 <= k < len(data):
        raise CompareError(f"--k {k}: shard 0 has {len(data)} samples; the forget set needs 1 to {len(data) - 1}")
    rng = np.random.default_rng(cfg.seed + 5)
    pos = np.sort(rng.choice(len(data), size=k, replace=False))
    if not natural:
        data = copy.copy(data)
        data.y = data.y.clone()
        data.y[pos] = (data.y[pos] + 1) % bundle.num_classes
    ids = sorted(int(i) for i in data.ids[pos])
    forget = data.select_ids(ids)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    base = SisaShard(workdir / "base", 0, data, settings)
    train_seconds = base.train_through()
    params = UnlearnParams.from_config(cfg)

    rows = [{"method": "before", **figures(base, forget, bundle.test_unbiased, bundle.heldout), "seconds": None}]
    for name in [EXACT, *sorted(n for n in UNLEARNERS if n != EXACT)]:
        shutil.copytree(workdir / "base", workdir / name)
        shard = SisaShard(workdir / name, 0, data, settings)
        result = get_unlearner(name)(shard, ids, params)
        row = {"method": name, **figures(shard, forget, bundle.test_unbiased, bundle.heldout),
               "seconds": result.seconds}
        if "noise_sigma" in result.figures:
            row["noise_sigma"] = float(result.figures["noise_sigma"])
        rows.append(row)
    exact = rows[1]["seconds"]
    for row in rows[1:]:
        row["ratio_to_exact"] = row["seconds"] / exact
    return {
        "config": {key: cfg.to_mapping()[key] for key in (
            "dataset", "rho", "image-size", "model-width", "slices", "epochs-per-slice", "unlearn-epochs",
            "unlearn-lr", "newton-lambda", "capacity-eps", "capacity-delta", "seed")},
        "shard_size": len(data), "excluded_deleted_ids": excluded, "k": k,
        "forget_labels": "true" if natural else "shifted (y + 1 mod K)",
        "restart_stage": min(SisaShard(workdir / "base", 0, data, settings).slice_of(i) for i in ids),
        "train_seconds": train_seconds, "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    return "\n".join(unlearning_methods_table(result))


def run_config(run: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """The finished run's config (``--run``) or the pyproject defaults with ``DEFAULTS``; ``--set`` on top."""
    if run is None:
        return resolve({**DEFAULTS, **overrides})
    run_dir = RunDir(run)
    run_dir.require_finished()
    return resolve(run_dir.config().to_mapping(), overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearning_compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=20, help="size of the forget set (default 20)")
    parser.add_argument("--natural", action="store_true", help="keep the forget set's true labels")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", help="override a run-config key")
    parser.add_argument("--run", metavar="DIR", type=Path,
                        help="use this finished run's config (not the rho = 0.1 default) and store the table "
                             "in DIR/metrics.json (unlearning_methods) and DIR/report.md")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default {DEFAULT_OUT}; with --run none unless given)")
    add_page_option(parser)
    args = parser.parse_args(argv)
    command = shlex.join([*SCRIPT.split(), *(sys.argv[1:] if argv is None else argv)])
    try:
        cfg = run_config(args.run, parse_set(args.set or []))
        deleted = RunDir(args.run).ledger.unlearned_ids() if args.run is not None else set()
        with tempfile.TemporaryDirectory(prefix="fairforget-compare-") as tmp:
            result = compare(cfg, args.k, args.natural, Path(tmp), deleted)
    except (ConfigError, RunDirError, DatasetError, CompareError) as exc:
        print(f"unlearning_compare: error: {exc}", file=sys.stderr)
        return 2
    c = result["config"]
    gone = result["excluded_deleted_ids"]
    gone = f", {gone} ids deleted in the run left out" if gone else ""
    with record_stdout() as printed:
        print(f"{c['dataset']}, rho = {c['rho']}, {c['image-size']} px, width {c['model-width']}, {c['slices']} "
              f"slices x {c['epochs-per-slice']} epochs; shard 0 ({result['shard_size']} samples, trained in "
              f"{result['train_seconds']:.2f}s{gone}); forget set: {result['k']} samples, labels "
              f"{result['forget_labels']}; exact retrain restarts at stage {result['restart_stage']}\n")
        print(table(result))
    out = DEFAULT_OUT if args.out is None and args.run is None else args.out
    if out is not None:
        atomic_write_json(out, result)
        print(f"\nfigures: {out}")
    if args.run is not None:
        run_dir = RunDir(args.run)
        metrics = run_dir.metrics()  # read again now: another command may have changed it meanwhile
        metrics["unlearning_methods"] = {**result, "command": command}
        run_dir.write_metrics(metrics)
        print(f"\nstored in {run_dir.metrics_path} (unlearning_methods); report: {write_report(run_dir.path)}")
    if page_wanted(args, "unlearning-methods", partial="--run measures a run's config" if args.run else None):
        write_page("unlearning-methods", "Approximate unlearning vs exact retraining",
                   "In-process, no Flower; shard 0 of the run config. " + printed.getvalue(),
                   measures=["fairforget/unlearning/", "simulations/unlearning_compare.py"], command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
