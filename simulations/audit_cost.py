"""Benchmark: what a membership-inference audit costs, RMIA with few references vs LiRA with many.

On a finished run (default ``runs/demo``), for the ensemble and one shard model, this trains the
reference models each attack needs and scores the same candidates (members sampled from the live
training set vs the held-out non-members), timing reference training plus scoring:

* RMIA offline with 2 reference models (Zarifzadeh et al. 2024),
* LiRA offline with 2 reference models, fixed variance,
* LiRA online with 8 and with 16 shadow models (each candidate IN for half of them).

It prints AUC, TPR at 1% FPR and wall seconds side by side, and the cost ratio to RMIA. Online
shadows train on candidate members, so they are discarded after the measurement.

    python simulations/audit_cost.py [--run runs/demo] [--shadows 8 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fairforget.audit import ATTACKS, TargetOutputs
from fairforget.audit.references import predict_probs, train_references
from fairforget.audit.roc import summarize
from fairforget.data import SampleSet, load_dataset, shard_of
from fairforget.model import load_model
from fairforget.run import RunDir, RunDirError
from fairforget.sisa import SisaSettings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a finished `fairforget simulate` run")
    parser.add_argument("--shadows", type=int, nargs="+", default=[8, 16], help="LiRA-online shadow counts")
    args = parser.parse_args()
    run = RunDir(Path(args.run))
    try:
        run.require_finished()
        cfg = run.config()
    except RunDirError as exc:
        print(f"audit_cost: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(cfg.num_threads, 1))

    bundle = load_dataset(cfg)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    deleted = run.ledger.unlearned_ids()
    states = run.load_models()
    models = {k: load_model(s, bundle.num_classes, cfg.model_width) for k, s in states.items()}
    shards = [s.subset([i for i, sid in enumerate(s.ids.tolist()) if sid not in deleted])
              for s in shard_of(cfg, bundle)]
    live = SampleSet.concat(shards)
    rng = np.random.default_rng(cfg.seed + 4242)
    ensemble_members = live.subset(np.sort(rng.permutation(len(live))[: len(bundle.heldout)]))
    targets = {"ensemble": (list(models.values()), ensemble_members, len(live)),
               "shard-0": ([models[0]], shards[0], len(shards[0]))}
    pop = bundle.test_biased

    print(f"audit cost on {run.path} ({len(pop)} population samples, {len(bundle.heldout)} non-members)")
    print(f"{'target':10} {'attack':14} {'refs':>4} {'AUC':>6} {'TPR@1%':>7} {'seconds':>8} {'x RMIA':>7}")
    for tname, (tmodels, members, train_size) in targets.items():
        cand = SampleSet.concat([members, bundle.heldout])
        is_member = np.r_[np.ones(len(members), bool), np.zeros(len(bundle.heldout), bool)]
        target = TargetOutputs(predict_probs(tmodels, cand.x), cand.y.numpy(), predict_probs(tmodels, pop.x),
                               pop.y.numpy())
        runs = [("rmia", 2, False), ("lira-offline", 2, False)] + [("lira-online", n, True) for n in args.shadows]
        base = None
        for name, count, online in runs:
            t0 = time.perf_counter()
            refs = train_references(pop, cand, count=count, members_per_model=min(train_size, len(pop)),
                                    models_per_reference=len(tmodels), settings=settings, seed=cfg.seed + 99,
                                    online=online)
            r = summarize(ATTACKS[name]().scores(target, refs), is_member, bootstrap=0)
            seconds = time.perf_counter() - t0
            base = base or seconds
            print(f"{tname:10} {name:14} {count:>4} {r['auc']:>6.3f} {r['tpr_at_0.01_fpr']:>7.3f} "
                  f"{seconds:>8.1f} {seconds / base:>6.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
