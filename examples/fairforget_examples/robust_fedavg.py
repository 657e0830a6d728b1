"""Robust FedAvg: Flower's coordinate-wise trimmed mean or median (Yin et al. 2018,
arxiv.org/abs/1803.01498) in place of the mean, with a simulated Byzantine attack to show why.

``strategy = "robust-fedavg"`` (this package's ``fairforget.strategies`` entry point) runs FedAvg's
rounds (:class:`strategies.fedavg.AveragingStrategy`: every node trains ``local-epochs`` from the
global model) and aggregates with one of Flower's own rules, chosen by ``strategy-options``:

* ``"aggregator"``: ``"trimmed-mean"`` (``FedTrimmedAvg``, ``beta`` = ``"trim-fraction"``: per
  coordinate, the lowest and highest ``int(trim-fraction * nodes)`` values are dropped, the rest
  averaged), ``"median"`` (``FedMedian``), or ``"mean"`` (``FedAvg``, the example-weighted mean: the
  plain baseline, to put under the same attack);
* ``"byzantine-nodes"``, ``"byzantine-attack"``, ``"byzantine-scale"``: the attack. **It is simulated
  at the server**, as robust-FL studies do: before aggregating, the server replaces the reply of the
  ``byzantine-nodes`` highest-numbered shards with a poisoned model, built from the global model ``g``
  it sent and the node's honest model ``w``, on the model's trainable parameters (BatchNorm's running
  statistics pass through):

  - ``"sign-flip"``: ``g - scale * (w - g)``, the node's update reversed and scaled;
  - ``"noise"``: ``g + scale * N(0, 1)``, Gaussian noise in place of the update (seeded by seed, round
    and shard, so runs are reproducible).

  The sites train honestly and report honest metrics; only the model the server aggregates changes.

With 4 nodes, ``trim-fraction`` must be at least 0.25 to drop anything (``int(0.2 * 4) = 0``): the
default is 0.25. One averaged model, like FedAvg: no exact unlearning, no DP, no augmentation.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.supercore import log

from fairforget import keys
from fairforget.config import ConfigError
from fairforget.model import build_model
from strategies.base import FairforgetStrategy
from strategies.fedavg import AveragingStrategy

#: option "aggregator" -> the Flower class whose ``aggregate_train`` aggregates
RULES: dict[str, type[FedAvg]] = {"mean": FedAvg, "trimmed-mean": FedTrimmedAvg, "median": FedMedian}
ATTACKS = ("sign-flip", "noise")


class FlowerRules(FedTrimmedAvg, FedMedian):
    """Flower's FedAvg-family aggregations in one strategy: ``aggregate_train`` is the one of
    ``RULES[self.aggregator]``, called unchanged (all three are FedAvgs; ``beta`` is FedTrimmedAvg's)."""

    aggregator = "trimmed-mean"

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return RULES[self.aggregator].aggregate_train(self, server_round, replies)


class RobustFedAvg(AveragingStrategy, FlowerRules):
    """FedAvg's rounds, aggregated by Flower's trimmed mean, median or mean, optionally against
    simulated Byzantine nodes (see the module docstring)."""

    name = "robust-fedavg"
    keeps_shard_models = False  # one aggregated model
    exact_unlearning = False
    forget_refusal = "it trains one aggregated model on everyone's data: a deletion needs a full retrain"
    dp_mechanism = None
    supports_augment = False
    options: ClassVar[dict[str, Any]] = {"aggregator": "trimmed-mean", "trim-fraction": 0.25, "byzantine-nodes": 0,
                                         "byzantine-attack": "sign-flip", "byzantine-scale": 4.0}

    def __init__(self, num_shards: int, rounds: int, local_epochs: int, seed: int, width: int, *,
                 aggregator: str = "trimmed-mean", trim_fraction: float = 0.25, byzantine_nodes: int = 0,
                 byzantine_attack: str = "sign-flip", byzantine_scale: float = 4.0) -> None:
        check_options(self.name, num_shards, {"aggregator": aggregator, "trim-fraction": trim_fraction,
                                              "byzantine-nodes": byzantine_nodes,
                                              "byzantine-attack": byzantine_attack, "byzantine-scale": byzantine_scale})
        super().__init__(num_shards, rounds, local_epochs, seed, width, beta=trim_fraction)
        self.aggregator = aggregator
        if aggregator == "trimmed-mean" and int(trim_fraction * num_shards) == 0:
            log(WARNING, "robust-fedavg: trim-fraction %g of %d nodes trims none: the unweighted mean",
                trim_fraction, num_shards)
        self.num_shards, self.byzantine_nodes = num_shards, byzantine_nodes
        self.attack, self.scale = byzantine_attack, float(byzantine_scale)
        # what the attack poisons: the trainable parameters (their names do not depend on the classes)
        self.parameters = {n for n, _ in build_model(2, width, seed=0).named_parameters()}
        self.global_model: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> FairforgetStrategy:
        o = cls.parse_options(cfg.strategy_options)
        return cls(cfg.num_shards, cfg.rounds, cfg.local_epochs, cfg.seed, cfg.model_width,
                   aggregator=o["aggregator"], trim_fraction=o["trim-fraction"], byzantine_nodes=o["byzantine-nodes"],
                   byzantine_attack=o["byzantine-attack"], byzantine_scale=o["byzantine-scale"])

    def summary(self) -> None:
        log(INFO, "\t├── robust-fedavg: %s (Flower's %s), %d simulated Byzantine node(s) (%s, scale %g)",
            self.aggregator, RULES[self.aggregator].__name__, self.byzantine_nodes, self.attack, self.scale)
        super().summary()

    # ------------------------------------------------------------------ the simulated attack
    def byzantine(self, shard: int) -> bool:
        """The highest-numbered ``byzantine-nodes`` shards are the attackers."""
        return shard >= self.num_shards - self.byzantine_nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_model = {k: v.numpy() for k, v in arrays.items()}  # what updates are measured from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.get(keys.METRICS)
            if metrics is not None and self.byzantine(int(metrics[keys.SHARD])):
                reply.content[keys.ARRAYS] = self.poisoned(reply.content[keys.ARRAYS], server_round,
                                                           int(metrics[keys.SHARD]))
        return super().aggregate_train(server_round, replies)

    def poisoned(self, arrays: ArrayRecord, server_round: int, shard: int) -> ArrayRecord:
        """The model a Byzantine node sends instead of ``arrays`` (its honest one)."""
        rng = np.random.default_rng([self.seed, server_round, shard])
        out = ArrayRecord()
        for key, array in arrays.items():
            w = array.numpy()
            if key in self.parameters:
                g = self.global_model[key]
                bad = g - self.scale * (w - g) if self.attack == "sign-flip" else g + self.scale * rng.standard_normal(
                    w.shape)
                w = np.asarray(bad, dtype=w.dtype)
            out[key] = Array(w)
        return out


def check_options(strategy: str, num_shards: int, options: dict[str, Any]) -> None:
    """A one-line ConfigError (a ValueError) naming ``strategy-options``, the strategy and the first
    option whose value cannot be used."""
    rules = {
        "aggregator": (options["aggregator"] in RULES, f"must be one of {', '.join(RULES)}"),
        "trim-fraction": (0.0 <= options["trim-fraction"] < 0.5, "must be in [0, 0.5)"),
        "byzantine-nodes": (0 <= options["byzantine-nodes"] < num_shards,
                            f"must be in [0, num-shards = {num_shards})"),
        "byzantine-attack": (options["byzantine-attack"] in ATTACKS, f"must be one of {', '.join(ATTACKS)}"),
        "byzantine-scale": (options["byzantine-scale"] >= 0, "must be >= 0"),
    }
    for key, (ok, rule) in rules.items():
        if not ok:
            raise ConfigError(f"config key 'strategy-options': option {key!r} of strategy {strategy!r} = "
                              f"{options[key]!r}: {rule}")
