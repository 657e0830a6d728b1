"""Evaluation of the ensemble on the biased and the unbiased test sets: on the server when it has the
data (:func:`evaluate_states`), else at the sites (:func:`evaluate_at_sites`), each site scoring its own
shard model (or the global model the server sends it) on its own test split and returning accuracies
only. On the server the ensemble predicts as the strategy's predictor combines it
(:meth:`strategies.base.FairforgetStrategy.predictor`), the same rule its audit scores."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fairforget import keys
from fairforget.config import RunConfig
from fairforget.data import DataBundle
from fairforget.ensemble import Predictor
from fairforget.metrics import accuracy_report
from fairforget.records import pack_shards
from strategies import build_strategy, strategy_class


def evaluate_states(states: dict[int, dict[str, torch.Tensor]], bundle: DataBundle, cfg: RunConfig,
                    predictor: Predictor | None = None) -> dict[str, Any]:
    """Accuracy, per-group accuracy and worst group of the ensemble on both test sets, and each
    constituent's own accuracy on the unbiased test set. The ensemble predicts as ``predictor`` (the
    strategy's; none given: the one the run's strategy declares) combines its constituents."""
    if predictor is None:
        predictor = build_strategy(cfg, bundle.num_classes).predictor()
    ensemble = predictor(states, bundle.num_classes, cfg.model_width)
    out: dict[str, Any] = {}
    for name, data in (("biased", bundle.test_biased), ("unbiased", bundle.test_unbiased)):
        member = ensemble.member_probs(data.x)
        pred = ensemble.combine(member).argmax(-1)  # the predictor's rule, one forward pass per model
        out[name] = accuracy_report(pred, data, bundle.num_classes, bundle.num_private)
        out[name]["per_model_accuracy"] = {
            int(k): float((member[i].argmax(-1) == data.y).float().mean()) for i, k in enumerate(ensemble.models)
        }
    return out


class RoundEvaluator:
    """``evaluate_fn`` for Flower's ``Strategy.start``: evaluates after each round, keeps the history.

    Rounds are evaluated on a fixed random subset of at most ``ROUND_SAMPLES`` unbiased test samples
    (the final evaluation uses all of them), so the curve costs little next to training."""

    ROUND_SAMPLES = 1000

    def __init__(self, strategy: Any, bundle: DataBundle, cfg: RunConfig) -> None:
        self.strategy, self.cfg = strategy, cfg
        unbiased = bundle.test_unbiased
        if len(unbiased) > self.ROUND_SAMPLES:
            pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(unbiased))[: self.ROUND_SAMPLES])
            unbiased = unbiased.subset(pick)
        self.bundle = dataclasses.replace(bundle, test_unbiased=unbiased)
        self.history: list[dict[str, Any]] = []

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
            sites[shard] = json.loads(str(reply.content[keys.CONFIG][keys.EVAL_JSON]))
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
