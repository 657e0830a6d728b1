"""FedAvg with user-level (client-level) differential privacy, through Flower's own wrappers.

``strategy = "fedavg"`` with ``dp = true`` builds this instead of the plain
:class:`strategies.fedavg.FedAvgBaseline`. Flower's design is kept: a DP wrapper holds an inner
strategy and delegates. Here :class:`FedAvgUserDP` holds Flower's
``DifferentialPrivacyServerSideFixedClipping`` or ``DifferentialPrivacyClientSideFixedClipping``
(``dp-fedavg-clipping``), which holds Flower's plain ``FedAvg``; it adds only what every fairforget
strategy does (local-epochs train config, recorded replies, the model, the spend).

Each round every client's update (its model minus the global one) is clipped to L2 norm
``dp-max-grad-norm`` (by the server, or by the client's ``fixedclipping_mod``, see
:mod:`clients.app`), the clipped updates are averaged with one weight per client, and Gaussian noise
of standard deviation ``dp-noise-multiplier * dp-max-grad-norm / num-shards`` is added to the
average (McMahan et al. 2018, DP-FedAvg with fixed clipping). One weight per client, not per
example: the sensitivity of the average to any one client is then ``clipping norm / num-shards``,
which is what the noise is calibrated to and what Flower's accounted mode requires.

Neighbouring federations differ by adding or removing one client with all its data. Every client
takes part in every round and Flower samples without secret randomness, so no amplification by
sampling is claimed: each round is one Gaussian mechanism, an accountant entry
``(noise multiplier, 1.0, 1)``. Flower's RDP accountant (``flwr[dp]``, ``PrivacyConfig`` with
``no-amplification``) composes the rounds as they are released and refuses a round past
``dp-max-epsilon``; :meth:`FedAvgUserDP.privacy_summary` reports the same history with the run's
``dp-accountant``, exactly as the shard ensemble's DP-SGD spend is reported, and Flower's figure
beside it.

The model is the GroupNorm SimpleConvNet, as under DP-SGD: the noise reaches every array of the
update, and BatchNorm's running variances and batch counters would not survive it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.supercore import log

from fairforget import keys
from fairforget.config import ConfigError
from fairforget.model import build_model
from fairforget.privacy.accountant import summarize
from fairforget.privacy.gdp import Entry
from strategies.base import FairforgetStrategy, StrategyReplyError

WRAPPERS: dict[str, type[DifferentialPrivacyFixedClippingBase]] = {  # run-config dp-fedavg-clipping
    "server": DifferentialPrivacyServerSideFixedClipping,
    "client": DifferentialPrivacyClientSideFixedClipping,
}
CLIENT_WEIGHT = "dp-client-weight"  # added to each reply's metrics by the server: one weight per client
NORM = "group"


class FedAvgUserDP(FairforgetStrategy, Strategy):
    """FedAvg under user-level DP: Flower's fixed-clipping wrapper around Flower's FedAvg."""

    name = "fedavg"
    exact_unlearning = False
    forget_refusal = "it trains one averaged model on everyone's data: a deletion needs a full retrain"
    dp_mechanism = "user-level"

    def __init__(self, num_shards: int, rounds: int, local_epochs: int, seed: int, width: int, *,
                 noise_multiplier: float, clipping_norm: float, clipping: str = "server", delta: float = 1e-5,
                 accountant: str = "rdp", max_epsilon: float | None = None) -> None:
        FairforgetStrategy.__init__(self)
        if rounds < 1 or local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        if clipping not in WRAPPERS:
            raise ValueError(f"clipping must be one of {', '.join(WRAPPERS)}, got {clipping!r}")
        if noise_multiplier <= 0:
            raise ValueError("user-level DP needs a positive noise multiplier")
        self.rounds, self.local_epochs, self.seed, self.width = rounds, local_epochs, seed, width
        self.num_shards, self.clipping, self.delta, self.accountant = num_shards, clipping, delta, accountant
        self.noise_multiplier, self.clipping_norm = float(noise_multiplier), float(clipping_norm)
        self.flower_accountant = _rdp_accountant(PrivacyConfig(
            target_delta=delta, population_size=num_shards,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon))
        inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_shards,
                       min_available_nodes=num_shards, weighted_by_key=CLIENT_WEIGHT, arrayrecord_key=keys.ARRAYS,
                       configrecord_key=keys.CONFIG)
        self.strategy = WRAPPERS[clipping](inner, self.noise_multiplier, self.clipping_norm, num_shards,
                                           accountant=self.flower_accountant)
        self.history: list[Entry] = []  # one (noise multiplier, sample rate, steps) entry per released round

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> FedAvgUserDP:
        """Build from the ``dp-*`` keys; a one-line ConfigError if the planned rounds cannot be afforded."""
        if cfg.dp_secure_mode:
            raise ConfigError("config key 'dp-secure-mode' = true is for the shard ensemble's DP-SGD: Flower's "
                              "fixed-clipping wrappers (strategy = \"fedavg\") draw their noise with numpy")
        if cfg.dp_noise_multiplier <= 0:
            raise ConfigError("config key 'dp-noise-multiplier' = 0: fedavg with user-level DP needs noise "
                              "(without it epsilon is infinite)")
        strategy = cls(cfg.num_shards, cfg.rounds, cfg.local_epochs, cfg.seed, cfg.model_width,
                       noise_multiplier=cfg.dp_noise_multiplier, clipping_norm=cfg.dp_max_grad_norm,
                       clipping=cfg.dp_fedavg_clipping, delta=cfg.dp_delta, accountant=cfg.dp_accountant,
                       max_epsilon=cfg.dp_max_epsilon)
        epsilon = strategy.planned_epsilon(cfg.rounds)
        if epsilon > cfg.dp_max_epsilon:  # refused before anything is trained, as Flower would refuse the round
            raise ConfigError(f"config key 'dp-max-epsilon' = {cfg.dp_max_epsilon:g}: fedavg with user-level DP "
                              f"would spend epsilon {epsilon:.3f} (delta {cfg.dp_delta:g}, Flower's RDP accountant) "
                              f"in {cfg.rounds} rounds at dp-noise-multiplier {cfg.dp_noise_multiplier:g}; raise the "
                              f"noise or lower rounds")
        return strategy

    def round_event(self) -> GaussianPrivacyEvent:
        """One round as Flower's accountant composes it: every client sampled, one Gaussian release."""
        return GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier, sample_size=self.num_shards,
                                    population_size=self.num_shards)

    def planned_epsilon(self, rounds: int) -> float:
        """Flower's RDP epsilon (at ``delta``) after ``rounds`` rounds from none."""
        fresh = _rdp_accountant(dataclasses.replace(self.flower_accountant.config, max_epsilon=None))
        fresh.compose(self.round_event(), count=rounds)
        return fresh.get_epsilon(self.delta)

    # ------------------------------------------------------------------ FairforgetStrategy
    def num_rounds(self) -> int:
        return self.rounds

    def initial_arrays(self, num_classes: int) -> ArrayRecord:
        return ArrayRecord(build_model(num_classes, self.width, seed=self.seed, norm=NORM).state_dict())

    def ensemble_states(self, arrays: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
        return {0: arrays.to_torch_state_dict()}

    def privacy_summary(self) -> dict[str, Any]:
        """The spend of the rounds released so far, in the form the shard ensemble reports its DP-SGD."""
        spent = self.strategy.privacy_spent()
        return {
            "mechanism": f"user-level DP (Flower {self.clipping}-side fixed clipping)",
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "rounds": len(self.history),
            "clients_per_round": self.num_shards,
            "neighbouring": ("add or remove one client with all its data (a change inside one client's data, such "
                             "as one record more or less, replaces that client: up to twice the mu)"),
            **summarize(self.history, self.accountant, self.delta),
            "flower": {"accountant": spent.accounting_method, "epsilon": spent.epsilon, "delta": spent.delta,
                       "releases": spent.num_releases},
        }

    # ------------------------------------------------------------------ Flower's Strategy, delegated
    def summary(self) -> None:
        log(INFO, "\t├── fairforget fedavg, user-level DP: %d clients, every one every round", self.num_shards)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config = ConfigRecord(dict(config))
        config[keys.TRAIN_MODE] = keys.TRAIN_MODE_LOCAL
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = self.record_replies(replies)
        for reply in ok:
            del reply.content[keys.CONFIG]  # the reply's ConfigRecord is not part of FedAvg's contract
            reply.content[keys.METRICS][CLIENT_WEIGHT] = 1.0
        arrays, metrics = self.strategy.aggregate_train(server_round, ok)
        if arrays is None:  # Flower releases nothing unless every sampled client replied
            raise StrategyReplyError(f"round {server_round}: {len(ok)} of {self.num_shards} clients replied; "
                                     f"Flower's DP wrapper released no model")
        self.history.append((self.noise_multiplier, 1.0, 1))
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _rdp_accountant(config: PrivacyConfig) -> Any:
    """Flower's RDP accountant; imported here, as Flower does, since it needs the ``flwr[dp]`` extra."""
    from flwr.serverapp import RdpAccountant

    return RdpAccountant(config)
