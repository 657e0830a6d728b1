"""What every fairforget strategy adds to Flower's :class:`flwr.serverapp.strategy.Strategy`.

A strategy is built from the run config (:meth:`from_config`), says how many rounds it runs and
where the models it produces come from (:meth:`ensemble_states`, one state dict per constituent),
records each shard's reply figures (:attr:`shard_reports`), and declares whether it supports exact
unlearning. Several shard models travel in one ArrayRecord (:mod:`fairforget.records`), so that
Flower's ``Strategy.start`` loop, which carries one ArrayRecord between rounds, carries the ensemble.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fairforget import keys
from fairforget.ensemble import Predictor
from fairforget.plugins import parse_plugin_options


class StrategyReplyError(RuntimeError):
    """A client answered with an error, or without the records a strategy needs."""


class FairforgetStrategy(ABC):
    """Mixin contract; concrete strategies also subclass a Flower strategy."""

    name: ClassVar[str]
    # Capabilities: what the framework asks instead of the strategy's name (no code outside
    # strategies/ compares names). The contract suite (strategies/testing.py) checks each one.
    #: one model per shard, each trained at its site and never averaged (SISA); False: one averaged
    #: model (``ensemble_states`` gives {0: it}). Decides what a site audits and evaluates (its own shard
    #: model, or the global model the server sends) and whether deletions can be routed to one shard.
    keeps_shard_models: ClassVar[bool] = False
    #: a deletion is served by retraining the owning shard only (``fairforget forget``); needs
    #: ``keeps_shard_models``. False: ``forget``/``verify`` refuse with :attr:`forget_refusal`.
    exact_unlearning: ClassVar[bool] = False
    #: the one-line reason ``forget`` gives for a strategy without exact unlearning
    forget_refusal: ClassVar[str] = "it keeps no shard models, so a deletion needs a full retrain"
    #: how ``dp = true`` is honoured: "dp-sgd" (each site trains with DP-SGD, record level, calibrated
    #: before the run), "user-level" (the server clips and noises whole updates), None: not supported
    dp_mechanism: ClassVar[str | None] = None
    #: ``augment = true`` (diffusion augmentation, then unlearning originals shard by shard) works
    supports_augment: ClassVar[bool] = False
    #: the strategy's own parameters, set through the one run-config key ``strategy-options`` (a JSON
    #: object): option name -> default; a given value must have its default's type (an int for a float)
    options: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def parse_options(cls, text: str) -> dict[str, Any]:
        """Every declared option, its default overridden by ``strategy-options``; an unknown or mistyped
        option is a one-line ConfigError naming the key, the strategy and the option (the options
        check every kind of plugin shares: :func:`fairforget.plugins.parse_plugin_options`)."""
        return parse_plugin_options("strategy-options", f"strategy {cls.name!r}", cls.options, text)

    def __init__(self) -> None:
        self.shard_reports: dict[int, dict[str, Any]] = {}

    def predictor(self) -> Predictor:
        """How the constituents' predictions combine (:class:`fairforget.ensemble.Predictor`): used by
        the server's evaluation, its audit and ``forget``'s figures alike. Default: even softmax mean."""
        return Predictor()

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Any, num_classes: int) -> FairforgetStrategy:
        """Build from a :class:`fairforget.config.RunConfig` for a task with ``num_classes`` classes."""

    @abstractmethod
    def num_rounds(self) -> int:
        """Rounds of ``Strategy.start``."""

    def initial_arrays(self, num_classes: int) -> ArrayRecord:
        return ArrayRecord()

    @abstractmethod
    def ensemble_states(self, arrays: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
        """One state dict per constituent model, from the strategy's ArrayRecord."""

    def record_replies(self, replies: Iterable[Message], failed: list[Message] | None = None) -> list[Message]:
        """Keep each shard's metrics and model hash; return the good replies. An error reply raises,
        or, given a ``failed`` list, is put there (the caller stores the good ones regardless)."""
        ok = []
        for reply in replies:
            if reply.has_error():
                if failed is not None:
                    failed.append(reply)
                    continue
                raise StrategyReplyError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            metrics = reply.content.get(keys.METRICS)
            if metrics is None:
                raise StrategyReplyError(f"node {reply.metadata.src_node_id} replied without metrics")
            shard = int(metrics[keys.SHARD])
            report = {k: _plain(v) for k, v in metrics.items()}
            info = reply.content.get(keys.CONFIG)
            if info is not None:
                report.update({k: _plain(v) for k, v in info.items()})
            report[keys.NODE_ID] = reply.metadata.src_node_id
            self.shard_reports[shard] = report
            ok.append(reply)
        return ok


def mean_metrics(replies: list[Message], weight_key: str = keys.NUM_EXAMPLES) -> MetricRecord:
    """Example-weighted means of the scalar metrics the replies share."""
    records = [r.content[keys.METRICS] for r in replies]
    total = sum(float(m[weight_key]) for m in records) or 1.0
    out = MetricRecord()
    for k, v in records[0].items():
        if isinstance(v, int | float) and k not in (keys.SHARD,):
            out[k] = sum(float(m[k]) * float(m[weight_key]) for m in records) / total
    out[weight_key] = total
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value
