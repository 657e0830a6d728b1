"""Evaluation of the ensemble on the biased and the unbiased test sets: on the server when it has the
data (:func:`evaluate_states`), else at the sites (:func:`evaluate_at_sites`), each site scoring its own
shard model on its own test split and returning accuracies only."""

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
from fairforget.ensemble import Ensemble
from fairforget.metrics import accuracy_report


def evaluate_states(states: dict[int, dict[str, torch.Tensor]], bundle: DataBundle, cfg: RunConfig) -> dict[str, Any]:
    """Accuracy, per-group accuracy and worst group of the ensemble on both test sets, and each
    constituent's own accuracy on the unbiased test set."""
    ensemble = Ensemble(states, bundle.num_classes, cfg.model_width, cfg.ensemble_vote)
    out: dict[str, Any] = {}
    for name, data in (("biased", bundle.test_biased), ("unbiased", bundle.test_unbiased)):
        member = ensemble.member_probs(data.x)
        probs = member.mean(0) if cfg.ensemble_vote == "softmax" else None
        pred = probs.argmax(-1) if probs is not None else ensemble.predict(data.x)
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
        result = evaluate_states(self.strategy.ensemble_states(arrays), self.bundle, self.cfg)
        row = {
            "round": server_round,
            "accuracy_biased": result["biased"]["accuracy"],
            "accuracy_unbiased": result["unbiased"]["accuracy"],
            "worst_group_accuracy": result["unbiased"]["worst_group"]["accuracy"],
        }
        self.history.append(row)
        return MetricRecord({k: float(v) for k, v in row.items() if k != "round"})


def evaluate_at_sites(grid: Any, cfg: RunConfig) -> dict[str, Any]:
    """``query.evaluate`` to every bound site: each scores its own shard model on its own test split.
    The same shape as :func:`evaluate_states`: accuracy pooled over the sites' test samples, each
    group's accuracy the mean over the sites that have the group, the worst of those, and each shard's
    own accuracy. No weights travel to the sites, no counts per group come back."""
    messages = [Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=keys.MSG_EVALUATE)
                for n in grid.bound_nodes()]
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
                     "scope": "each site's own shard model on its own test split"}
    return out
