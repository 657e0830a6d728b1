"""What every fairforget strategy adds to Flower's :class:`flwr.serverapp.strategy.Strategy`.

A strategy is built from the run config (:meth:`from_config`), says how many rounds it runs and
where the models it produces come from (:meth:`ensemble_states`, one state dict per constituent),
records each shard's reply figures (:attr:`shard_reports`), and declares whether it supports exact
unlearning. Several shard models travel in one ArrayRecord (:mod:`fairforget.records`), so that
Flower's ``Strategy.start`` loop, which carries one ArrayRecord between rounds, carries the ensemble.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fairforget import keys


class StrategyReplyError(RuntimeError):
    """A client answered with an error, or without the records a strategy needs."""


class FairforgetStrategy(ABC):
    """Mixin contract; concrete strategies also subclass a Flower strategy."""

    name: ClassVar[str]
    exact_unlearning: ClassVar[bool] = False

    def __init__(self) -> None:
        self.shard_reports: dict[int, dict[str, Any]] = {}

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
