"""An accuracy-weighted shard ensemble: SISA's shard models (:class:`strategies.shard_ensemble.ShardEnsemble`,
Bourtoule et al. 2021), combined with a weight per shard model that follows its accuracy on a
validation split the data carves for itself (:mod:`fairforget_examples.validation_data`), in the manner
of performance-weighted voting (Opitz & Maclin 1999, "Popular ensemble methods", JAIR 11).

Training, deletion, the deletion budget and the site audits are the parent's: the shard models are
trained and unlearned exactly as SISA's. Only the prediction changes, and it lives in the predictor
(:class:`ValidationWeightedPredictor`): called with the shard models' states, it scores each model on
the validation split and builds the :class:`fairforget.ensemble.Ensemble` with those weights. The
server's evaluation, its audit and ``forget``'s figures all build the ensemble through
``strategy.predictor()``, so the weights are recomputed from the models each time: after a deletion
retrains a shard, the next evaluation, audit and forget figure reweight it.

Options (run-config key ``strategy-options``, a JSON object):

``weighting``
    ``"accuracy"`` (default): weight_k = acc_k, the shard model's validation accuracy;
    ``"softmax-accuracy"``: weight_k = exp((acc_k - max_j acc_j) / temperature).
``temperature``
    of ``softmax-accuracy`` (default 0.05: a model 0.1 less accurate weighs e^-2 as much).

The validation split must be on the server: the run's ``dataset`` must be one that carves it
(``biased-digits-val``, or a loader of :mod:`fairforget_examples.validation_data` by module path), and
the server must hold the data; otherwise :meth:`AccuracyWeightedEnsemble.from_config` refuses in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.supercore import log

from fairforget.config import ConfigError
from fairforget.data import REGISTRY as data_registry
from fairforget.data import SampleSet
from fairforget.ensemble import Ensemble, Predictor
from fairforget_examples import validation_data
from strategies.shard_ensemble import ShardEnsemble

WEIGHTINGS = ("accuracy", "softmax-accuracy")
#: the loaders that carve the validation split this strategy weights on
CARVING_LOADERS = (validation_data.load, validation_data.load_sites)


def shard_accuracies(ensemble: Ensemble, validation: SampleSet) -> dict[int, float]:
    """Each constituent's accuracy on ``validation`` (shard -> accuracy)."""
    member = ensemble.member_probs(validation.x)
    return {k: float((member[i].argmax(-1) == validation.y).float().mean()) for i, k in enumerate(ensemble.models)}


def accuracy_weights(accuracies: Mapping[int, float], weighting: str, temperature: float) -> dict[int, float] | None:
    """The weight of each shard model from its validation accuracy (see the module's options); None (even
    weights) when every model scores 0 under ``accuracy``."""
    if weighting == "accuracy":
        if not any(a > 0 for a in accuracies.values()):
            log(WARNING, "weighted-ensemble: every shard model scores 0 on the validation split; weighting evenly")
            return None
        return dict(accuracies)
    if weighting == "softmax-accuracy":
        best = max(accuracies.values())
        return {k: math.exp((a - best) / temperature) for k, a in accuracies.items()}
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


@dataclass(frozen=True)
class ValidationWeightedPredictor(Predictor):
    """Builds the ensemble of the given shard models weighted by their accuracy on ``validation``."""

    validation: SampleSet | None = field(default=None, repr=False, compare=False)
    weighting: str = "accuracy"
    temperature: float = 0.05

    def __call__(self, states: Mapping[int, Mapping[str, torch.Tensor]], num_classes: int, width: int) -> Ensemble:
        if self.validation is None:
            raise ValueError("ValidationWeightedPredictor needs the validation split (validation=...)")
        accuracies = shard_accuracies(Ensemble(states, num_classes, width, self.vote), self.validation)
        weights = accuracy_weights(accuracies, self.weighting, self.temperature)
        log(INFO, "weighted-ensemble: validation accuracy %s -> weights %s",
            {k: round(a, 4) for k, a in accuracies.items()},
            None if weights is None else {k: round(w, 4) for k, w in weights.items()})
        return Ensemble(states, num_classes, width, self.vote, weights)


class AccuracyWeightedEnsemble(ShardEnsemble):
    """:class:`ShardEnsemble` whose predictor weights each shard model by its validation accuracy."""

    name = "weighted-ensemble"
    options = {"weighting": "accuracy", "temperature": 0.05}

    def __init__(self, *args: Any, validation: SampleSet | None = None, weighting: str = "accuracy",
                 temperature: float = 0.05, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validation: SampleSet | None = None
        self.weighting, self.temperature = "accuracy", 0.05
        self.set_weighting(validation, weighting, temperature)

    def set_weighting(self, validation: SampleSet | None, weighting: str, temperature: float) -> None:
        """Set the validation split and the weighting rule (a ValueError for a bad one)."""
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.validation, self.weighting, self.temperature = validation, weighting, float(temperature)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> AccuracyWeightedEnsemble:
        """The parent's strategy, with the options of ``strategy-options`` and the validation split of
        the run's data; a one-line ConfigError for a bad option, a dataset that carves no validation
        split, or a server that holds no data."""
        opts = cls.parse_options(cfg.strategy_options)
        if opts["weighting"] not in WEIGHTINGS:
            raise ConfigError(f"config key 'strategy-options': option 'weighting' of strategy {cls.name!r} = "
                              f"{opts['weighting']!r}: must be one of {', '.join(WEIGHTINGS)}")
        if not opts["temperature"] > 0:
            raise ConfigError(f"config key 'strategy-options': option 'temperature' of strategy {cls.name!r} = "
                              f"{opts['temperature']!r}: must be > 0")
        if not carves_validation(cfg.dataset):
            raise ConfigError(f"config key 'dataset' = {cfg.dataset!r}: strategy {cls.name!r} weights its shard models "
                              "on a validation split the data must carve: use dataset = \"biased-digits-val\" "
                              "(fairforget_examples.validation_data)")
        if not cfg.server_has_data:
            raise ConfigError(f"config key 'dataset' = {cfg.dataset!r}: strategy {cls.name!r} needs the validation "
                              "split on the server, but the server holds no data")
        strategy = super().from_config(cfg, num_classes)
        assert isinstance(strategy, AccuracyWeightedEnsemble)
        strategy.set_weighting(validation_data.validation(cfg), opts["weighting"], opts["temperature"])
        return strategy

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└── Weights: %s on %d validation samples%s", self.weighting,
            0 if self.validation is None else len(self.validation),
            f" (temperature {self.temperature})" if self.weighting == "softmax-accuracy" else "")

    def predictor(self) -> ValidationWeightedPredictor:
        return ValidationWeightedPredictor(self.vote, validation=self.validation, weighting=self.weighting,
                                           temperature=self.temperature)


def carves_validation(dataset: str) -> bool:
    """Whether the run-config ``dataset`` names a loader that carves the validation split (resolved as
    fairforget resolves every dataset: by module path or ``fairforget.datasets`` entry point)."""
    try:
        return data_registry.find(dataset) in CARVING_LOADERS
    except ConfigError:  # a name that does not import carves nothing; its registry says why where it loads
        return False
