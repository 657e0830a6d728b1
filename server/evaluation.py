"""Evaluation of the ensemble on the biased and the unbiased test sets: on the server when it has the
data (:func:`evaluate_states`), else at the sites (:func:`evaluate_at_sites`), each site scoring its own
shard model (or the global model the server sends it) on its own test split and returning accuracies
only. On the server the ensemble predicts as the strategy's predictor combines it
(:meth:`strategies.base.FairforgetStrategy.predictor`), the same rule its audit scores."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fairforget import keys
from fairforget.config import RunConfig
from fairforget.data import DataBundle
from fairforget.ensemble import Predictor, model_probs
from fairforget.metrics import accuracy_report
from fairforget.records import pack_shards
from fairforget.schemas import payloads
from fairforget.storage import atomic_torch_save, state_hash, torch_load
from strategies import build_strategy, strategy_class


def evaluate_states(states: dict[int, dict[str, torch.Tensor]], bundle: DataBundle, cfg: RunConfig,
                    predictor: Predictor | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Accuracy, per-group accuracy and worst group of the ensemble on both test sets, and each
    constituent's own accuracy on the unbiased test set. The ensemble predicts as ``predictor`` (the
    strategy's; none given: the one the run's strategy declares) combines its constituents.
    ``cache``: a file of each constituent's outputs on the test sets, keyed by its model hash and the
    images, so a later evaluation (a deletion's) scores only the models that changed."""
    if predictor is None:
        predictor = build_strategy(cfg, bundle.num_classes).predictor()
    ensemble = predictor(states, bundle.num_classes, cfg.model_width)
    memo = _ProbsCache(cache, ensemble, states) if cache is not None else None
    out: dict[str, Any] = {}
    for name, data in (("biased", bundle.test_biased), ("unbiased", bundle.test_unbiased)):
        member = memo.member_probs(data.x) if memo is not None else ensemble.member_probs(data.x)
        pred = ensemble.combine(member).argmax(-1)  # the predictor's rule, one forward pass per model
        out[name] = accuracy_report(pred, data, bundle.num_classes, bundle.num_private)
        out[name]["per_model_accuracy"] = {
            int(k): float((member[i].argmax(-1) == data.y).float().mean()) for i, k in enumerate(ensemble.models)
        }
    return out


EVAL_CACHE = "eval-cache.pt"  # in the run folder: each model's test-set outputs (see _ProbsCache)


class _ProbsCache:
    """Each constituent's softmax outputs on a set of images, kept in a file across commands and keyed
    by (model hash, images' hash): an unchanged model is not scored again. Written atomically, pruned
    to the models scored last; an unreadable file is ignored (the outputs are computed again)."""

    def __init__(self, path: Path, ensemble: Any, states: dict[int, dict[str, torch.Tensor]]) -> None:
        self.path, self.ensemble = Path(path), ensemble
        models = getattr(ensemble, "models", None)
        self.hashes = ({k: state_hash(states[k]) for k in models} if isinstance(models, dict)
                       and set(models) <= set(states) else None)
        try:
            self.saved = torch_load(self.path) if self.path.exists() and self.hashes is not None else {}
        except Exception:  # noqa: BLE001 - a cache: a torn or foreign file is recomputed, never trusted
            self.saved = {}
        self.kept: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def member_probs(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """As :meth:`fairforget.ensemble.Ensemble.member_probs`, from the file where it holds them."""
        if self.hashes is None:
            return self.ensemble.member_probs(x, batch_size)
        images = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        out = []
        for k, model in self.ensemble.models.items():
            key = f"{self.hashes[k]}:{images}"
            probs = self.saved.get(key)
            if not isinstance(probs, torch.Tensor) or probs.shape[0] != len(x):
                probs = model_probs(model, x, batch_size)
            self.kept[key] = probs
            out.append(probs)
        if set(self.kept) - set(self.saved):
            atomic_torch_save(self.path, self.kept)
        return torch.stack(out)


class RoundEvaluator:
    """``evaluate_fn`` for Flower's ``Strategy.start``: evaluates after each round, keeps the history.

    Rounds are evaluated on a fixed random subset of at most ``ROUND_SAMPLES`` unbiased test samples
    and the biased test set (the final evaluation uses all of both), so the curve costs little next to
    training. Every constituent scores every image, so a round costs S x images forward passes: past
    ``ROUND_FORWARDS`` (what 4 shards on the embedded data's sets cost) both sets shrink to fixed random
    subsets of the same share, at least ``MIN_ROUND_SAMPLES`` images each, so the curve's cost stays
    flat as the number of clients grows (issue 27: at 16 shards it cost more than the training)."""

    ROUND_SAMPLES = 1000
    ROUND_FORWARDS = 4 * (1000 + 359)
    MIN_ROUND_SAMPLES = 32

    def __init__(self, strategy: Any, bundle: DataBundle, cfg: RunConfig) -> None:
        self.strategy, self.cfg = strategy, cfg
        unbiased, biased = bundle.test_unbiased, bundle.test_biased
        if len(unbiased) > self.ROUND_SAMPLES:
            pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(unbiased))[: self.ROUND_SAMPLES])
            unbiased = unbiased.subset(pick)
        share = self.ROUND_FORWARDS / (max(1, cfg.num_shards) * max(1, len(unbiased) + len(biased)))
        if share < 1:
            rng = np.random.default_rng([cfg.seed, 27])
            unbiased, biased = (data.subset(np.sort(rng.permutation(len(data))[:self.round_size(len(data), share)]))
                                for data in (unbiased, biased))
        self.bundle = dataclasses.replace(bundle, test_unbiased=unbiased, test_biased=biased)
        self.history: list[dict[str, Any]] = []

    def round_size(self, n: int, share: float) -> int:
        """Images of an ``n``-image test set a round scores at ``share`` of the full cost."""
        return min(n, max(self.MIN_ROUND_SAMPLES, round(n * share)))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if len(arrays) == 0:
            return None
        result = evaluate_states(self.strategy.ensemble_states(arrays), self.bundle, self.cfg,
                                 self.strategy.predictor())
        row = {
            "round": server_round,
            "accuracy_biased": result["biased"]["accuracy"],
            "accuracy_unbiased": result["unbiased"]["accuracy"],
            "worst_group_accuracy": result["unbiased"]["worst_group"]["accuracy"],
        }
        self.history.append(row)
        return MetricRecord({k: float(v) for k, v in row.items() if k != "round"})


def evaluate_at_sites(grid: Any, cfg: RunConfig, strategy: Any = None,
                      states: dict[int, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """``query.evaluate`` to every bound site: each scores its own shard model on its own test split
    (a strategy that keeps no shard models: the global model, ``states[0]``, sent with the message).
    The same shape as :func:`evaluate_states`: accuracy pooled over the sites' test samples, each
    group's accuracy the mean over the sites that have the group, the worst of those, and each shard's
    own accuracy. No shard weights travel to the sites, no counts per group come back."""
    keeps = (strategy if strategy is not None else strategy_class(cfg.strategy)).keeps_shard_models
    if not keeps and states is None:
        raise ValueError("evaluating the global model at the sites needs the model (states)")
    config = {keys.MODEL_TARGET: keys.TARGET_OWN_SHARD if keeps else keys.TARGET_SENT}
    arrays = None if keeps else pack_shards({0: ArrayRecord(states[0])})

    def ask(node: int) -> Message:
        content = RecordDict({keys.CONFIG: ConfigRecord(dict(config))})
        if arrays is not None:
            content[keys.ARRAYS] = arrays
        return Message(content, dst_node_id=node, message_type=keys.MSG_EVALUATE)

    messages = [ask(n) for n in grid.bound_nodes()]
    sites = {}
    for reply in grid.send_and_receive(messages):
        if not reply.has_error():
            shard = int(reply.content[keys.METRICS][keys.SHARD])
            text = reply.content[keys.CONFIG][keys.EVAL_JSON]
            sites[shard] = payloads.decode(payloads.SiteEvaluation, text).to_json()
    out: dict[str, Any] = {}
    for name in ("biased", "unbiased"):
        rows = {k: v[name] for k, v in sites.items()}
        n = sum(r["n"] for r in rows.values())
        acc = sum(r["accuracy"] * r["n"] for r in rows.values()) / n if n else float("nan")
        pooled: dict[tuple[int, int], list[float]] = {}
        for r in rows.values():
            for g in r["groups"]:
                pooled.setdefault((g["class"], g["private"]), []).append(g["accuracy"])
        groups = [{"class": c, "private": a, "accuracy": float(np.mean(v)), "sites": len(v)}
                  for (c, a), v in sorted(pooled.items())]
        worst = min(groups, key=lambda g: g["accuracy"]) if groups else {"accuracy": float("nan")}
        out[name] = {"accuracy": acc, "n": n, "worst_group": worst, "groups": groups,
                     "per_model_accuracy": {k: r["accuracy"] for k, r in rows.items()},
                     "scope": ("each site's own shard model on its own test split" if keeps
                               else "the global model on each site's own test split")}
    return out
