"""Does Laplace Sample Information find mislabeled records? (issue 26, aim: AUROC >= 0.90)

In-process, no Flower (like ``simulations/unlearning_compare.py``). For each of ``--shards`` shards of
the run config (every key at its ``pyproject.toml`` default, rho = 0.1, unless ``--set``), ``--flip``
(default 5%) of the shard's records get a wrong label (y + a random non-zero offset mod K), chosen with
a seeded generator. The shard is trained from scratch with SISA on the corrupted labels in a scratch
folder, and LSI (:mod:`fairforget.lsi`: a last-layer probe on the shard model's bottleneck, laplace-torch)
scores every record. Reported per shard: the AUROC of LSI for "this record is mislabeled", the share
of mislabeled records among the top-k LSI (k = the number flipped), the probe's prior precision, and
seconds (training; LSI).

A second part (``--retire K``, default 32: one augmentation step's ``augment-retire-per-step``) uses the
true labels. Each shard is trained, scored by LSI, and then ``K`` originals are retired (exact SISA
unlearning, as an augmentation step does) in two orders: ``least-informative`` (lowest LSI first) and
``random`` (the augmentation's seeded order). Reported: the unbiased test accuracy after each, and
before; and the loss attack's AUC (members of each LSI decile against the held-out non-members) on the
model before retirement, which tests whether informative records are the ones membership attacks find.
The generator's replenishment is left out: this isolates the choice of originals.

Run from the repository root::

    python simulations/lsi_study.py                 # 4 shards, 5% flipped, rho = 0.1
    python simulations/lsi_study.py --shards 1 --no-page
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fairforget.audit.base import TargetOutputs
from fairforget.audit.loss import LossAttack
from fairforget.audit.references import predict_probs
from fairforget.audit.roc import auc
from fairforget.config import ConfigError, parse_set, resolve
from fairforget.data import DatasetError, SampleSet, load_dataset, shard_of
from fairforget.lsi import RETIRE_ORDERS, LsiError, auroc, deciles, lowest_first, lsi_scores, shard_features
from fairforget.sisa import SisaSettings, SisaShard, derived_seed
from fairforget.unlearning.approximate import accuracy, current_state, model_from
from simulations.results_page import add_page_option, page_wanted, record_stdout, write_page

DEFAULTS = {"rho": 0.1}
SCRIPT = "python simulations/lsi_study.py"


def flip_labels(y: torch.Tensor, frac: float, num_classes: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``y`` with ``frac`` of it relabelled to a different class; the mask of the flipped records."""
    rng = np.random.default_rng(seed)
    n = len(y)
    pos = rng.choice(n, size=max(1, int(round(frac * n))), replace=False)
    out = y.clone()
    out[pos] = (out[pos] + torch.as_tensor(rng.integers(1, num_classes, len(pos)))) % num_classes
    mask = np.zeros(n, bool)
    mask[pos] = True
    return out, mask


def study_shard(cfg, bundle, shard: int, frac: float, workdir: Path) -> dict:
    data = copy.copy(shard_of(cfg, bundle)[shard])
    data.y, flipped = flip_labels(data.y, frac, bundle.num_classes, cfg.seed + 100 + shard)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    sisa = SisaShard(workdir / f"shard-{shard}", shard, data, settings)
    train_seconds = sisa.train_through()
    model = model_from(current_state(sisa), sisa)
    started = time.perf_counter()
    result = lsi_scores(shard_features(model, data.x), data.y.numpy(), bundle.num_classes)
    lsi_seconds = time.perf_counter() - started
    k = int(flipped.sum())
    top = np.argsort(-result.lsi)[:k]
    return {"shard": shard, "records": len(data), "flipped": k, "auroc": auroc(result.lsi, flipped),
            "precision_at_k": float(flipped[top].mean()), "prior_precision": result.prior_precision,
            "probe_train_accuracy": result.train_accuracy,
            "median_lsi_flipped": float(np.median(result.lsi[flipped])),
            "median_lsi_clean": float(np.median(result.lsi[~flipped])),
            "train_seconds": train_seconds, "lsi_seconds": lsi_seconds}


def loss_scores(model: torch.nn.Module, data: SampleSet) -> np.ndarray:
    with torch.no_grad():
        probs = predict_probs([model.cpu()], data.x)
    return LossAttack().scores(TargetOutputs(probs, data.y.numpy(), probs[:0], data.y.numpy()[:0]), None)


def retire_shard(cfg, bundle, shard: int, k: int, workdir: Path) -> dict:
    """Train the shard on its true labels, then retire ``k`` originals in each order; accuracies and the
    loss attack's AUC per LSI decile."""
    import shutil

    data = shard_of(cfg, bundle)[shard]
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    base_dir = workdir / f"retire-base-{shard}"
    base = SisaShard(base_dir, shard, data, settings)
    base.train_through()
    model = model_from(current_state(base), base)
    result = lsi_scores(shard_features(model, data.x), data.y.numpy(), bundle.num_classes)
    ids = [int(i) for i in data.ids.tolist()]
    dec = deciles(result.lsi)
    member, outside = loss_scores(model, data), loss_scores(model, bundle.heldout)
    per_decile = [auc(np.r_[member[dec == d], outside], np.r_[np.ones(int((dec == d).sum()), bool),
                                                               np.zeros(len(outside), bool)]) for d in range(10)]
    rng = np.random.default_rng(derived_seed(cfg.seed, shard, 313, 1))  # the augmentation's step-1 draw
    chosen = {"least-informative": lowest_first(result.lsi, ids, ids, k),
              "random": RETIRE_ORDERS["random"](k, sorted(ids), rng)}
    row = {"shard": shard, "records": len(data), "retired": k, "before": accuracy(model, bundle.test_unbiased),
           "mia_auc_per_decile": per_decile}
    for name, gone in chosen.items():
        shutil.copytree(base_dir, workdir / f"retire-{name}-{shard}")
        sisa = SisaShard(workdir / f"retire-{name}-{shard}", shard, data, settings)
        sisa.remove(gone, retrain_to=settings.slices)
        sisa.train_through(settings.slices)
        row[name] = accuracy(model_from(current_state(sisa), sisa), bundle.test_unbiased)
        row[f"{name}_mean_lsi"] = float(np.mean([result.lsi[ids.index(i)] for i in gone]))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lsi_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4, help="how many shards to study (default 4)")
    parser.add_argument("--flip", type=float, default=0.05, help="fraction of each shard mislabeled (default 0.05)")
    parser.add_argument("--retire", type=int, default=32,
                        help="originals each shard retires in the retire-order part (default 32; 0: skip it)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", help="override a run-config key")
    add_page_option(parser)
    args = parser.parse_args(argv)
    command = shlex.join([*SCRIPT.split(), *(sys.argv[1:] if argv is None else argv)])
    try:
        cfg = resolve({**DEFAULTS, **parse_set(args.set or [])})
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        bundle = load_dataset(cfg)
        shards = min(args.shards, cfg.num_shards)
        with tempfile.TemporaryDirectory(prefix="fairforget-lsi-") as tmp:
            rows = [study_shard(cfg, bundle, s, args.flip, Path(tmp)) for s in range(shards)]
            retire = [retire_shard(cfg, bundle, s, args.retire, Path(tmp)) for s in range(shards) if args.retire]
    except (ConfigError, DatasetError, LsiError) as exc:
        print(f"lsi_study: error: {exc}", file=sys.stderr)
        return 2
    with record_stdout() as printed:
        print(f"{cfg.dataset}, rho = {cfg.rho}, {cfg.image_size} px, width {cfg.model_width}, {cfg.slices} slices x "
              f"{cfg.epochs_per_slice} epochs; {args.flip:.0%} of each shard's labels flipped before training; LSI "
              "from a last-layer probe on the shard model's bottleneck (laplace-torch, full GGN, prior precision "
              "by marginal likelihood). Machine shared with other jobs: seconds are indicative.\n")
        print("| shard | records | flipped | AUROC (LSI, flipped) | flipped among top-k LSI | median LSI flipped / "
              "clean (nats) | prior precision | probe train acc. | train s | LSI s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shard']} | {r['records']} | {r['flipped']} | {r['auroc']:.3f} | {r['precision_at_k']:.2f} | "
                  f"{r['median_lsi_flipped']:.3g} / {r['median_lsi_clean']:.3g} | {r['prior_precision']:.3g} | "
                  f"{r['probe_train_accuracy']:.3f} | {r['train_seconds']:.1f} | {r['lsi_seconds']:.1f} |")
        mean = float(np.mean([r["auroc"] for r in rows]))
        print(f"\nMean AUROC over {len(rows)} shard(s): {mean:.3f} (aim: at least 0.90).")
        if retire:
            print(f"\n## Which originals to retire\n\nTrue labels; each shard retires {args.retire} originals by exact "
                  "SISA unlearning (no replenishment). Unbiased test accuracy of the shard model:\n")
            print("| shard | records | before | least-informative first | random (today's order) | mean LSI retired: "
                  "least-informative / random |")
            print("|---|---|---|---|---|---|")
            for r in retire:
                print(f"| {r['shard']} | {r['records']} | {r['before']:.3f} | {r['least-informative']:.3f} | "
                      f"{r['random']:.3f} | {r['least-informative_mean_lsi']:.3g} / {r['random_mean_lsi']:.3g} |")
            diff = np.mean([r["least-informative"] - r["random"] for r in retire])
            print(f"\nMean accuracy difference, least-informative minus random: {diff:+.3f}.\n")
            print("Loss attack AUC, members of each LSI decile (0: least informative) against the held-out "
                  "non-members, on the shard model before retirement:\n")
            print("| shard | " + " | ".join(f"d{d}" for d in range(10)) + " |")
            print("|---|" + "---|" * 10)
            for r in retire:
                print(f"| {r['shard']} | " + " | ".join(f"{v:.2f}" for v in r["mia_auc_per_decile"]) + " |")
    if page_wanted(args, "lsi", partial="fewer than 4 shards" if shards < 4 else None):
        write_page("lsi", "Laplace Sample Information: finding mislabeled records",
                   "In-process, no Flower. " + printed.getvalue(),
                   measures=["fairforget/lsi.py", "simulations/lsi_study.py"], command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
