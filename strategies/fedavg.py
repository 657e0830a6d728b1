"""FedAvg (McMahan et al. 2017), Flower's own implementation, for comparison with ShardEnsemble.

Every node trains ``local-epochs`` on its shard from the global model; the server aggregates. One
global model is trained on everyone's data, so deleting a sample needs a full retrain: these
strategies declare no exact unlearning, and ``fairforget forget`` refuses their runs.

:class:`AveragingStrategy` is the fairforget part of any Flower FedAvg-family strategy, put before
the Flower class it runs over::

    class FedAvgBaseline(AveragingStrategy, FedAvg)           # strategy = "fedavg"
    class RobustFedAvg(AveragingStrategy, FedTrimmedAvg)     # a plugin: Flower's trimmed mean, beta passed on

Flower's class keeps its aggregation (``aggregate_train``, the maths); the mixin adds the train
config, the recorded replies and the model. With ``dp = true``, :meth:`FedAvgBaseline.from_config`
builds :class:`strategies.fedavg_dp.FedAvgUserDP` instead: the same FedAvg under user-level DP,
through Flower's fixed-clipping wrappers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fairforget import keys
from fairforget.model import build_model
from strategies.base import FairforgetStrategy
from strategies.fedavg_dp import FedAvgUserDP


class AveragingStrategy(FairforgetStrategy, FedAvg):
    """One averaged model, trained by every node every round and aggregated by the Flower class that
    follows this mixin in the subclass's bases (``FedAvg``, ``FedTrimmedAvg``, ``FedMedian``, ...).

    Parameters
    ----------
    num_shards, rounds, local_epochs, seed, width
        The federation (every node trains every round), the rounds, the local epochs per round, the
        seed and width of the initial model.
    **flower_kwargs
        The Flower class's own keyword arguments (``beta`` for ``FedTrimmedAvg``), passed on.
    """

    keeps_shard_models = False  # one averaged model
    exact_unlearning = False
    forget_refusal = "it trains one averaged model on everyone's data: a deletion needs a full retrain"

    def __init__(self, num_shards: int, rounds: int, local_epochs: int, seed: int, width: int,
                 **flower_kwargs: Any) -> None:
        FairforgetStrategy.__init__(self)
        if rounds < 1 or local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        # the Flower class after FairforgetStrategy in the MRO: every node, every round, fairforget's record keys
        super(FairforgetStrategy, self).__init__(  # type: ignore[call-arg]
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_shards, min_available_nodes=num_shards,
            arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG, **flower_kwargs)
        self.rounds, self.local_epochs, self.seed, self.width = rounds, local_epochs, seed, width

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> FairforgetStrategy:
        return cls(cfg.num_shards, cfg.rounds, cfg.local_epochs, cfg.seed, cfg.model_width)

    def num_rounds(self) -> int:
        return self.rounds

    def initial_arrays(self, num_classes: int) -> ArrayRecord:
        return ArrayRecord(build_model(num_classes, self.width, seed=self.seed).state_dict())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config = ConfigRecord(dict(config))
        config[keys.TRAIN_MODE] = keys.TRAIN_MODE_LOCAL
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each shard's reply, then the Flower class's aggregation of the good ones."""
        ok = self.record_replies(replies)
        for reply in ok:  # the reply's ConfigRecord is not part of FedAvg's contract
            del reply.content[keys.CONFIG]
        return super().aggregate_train(server_round, ok)

    def ensemble_states(self, arrays: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
        return {0: arrays.to_torch_state_dict()}

    def privacy_summary(self) -> None:
        """No DP: nothing spent (:meth:`FedAvgUserDP.privacy_summary` is the DP run's)."""
        return None


class FedAvgBaseline(AveragingStrategy, FedAvg):
    """Flower's FedAvg: the example-weighted mean of the nodes' models."""

    name = "fedavg"
    dp_mechanism = "user-level"  # dp = true builds FedAvgUserDP

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> FairforgetStrategy:
        """Plain FedAvg; with ``dp = true``, FedAvg under user-level DP (:class:`FedAvgUserDP`)."""
        if cfg.dp:
            return FedAvgUserDP.from_config(cfg, num_classes)
        return super().from_config(cfg, num_classes)
