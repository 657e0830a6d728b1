"""The shard ensemble: one SimpleConvNet per shard, never averaged (SISA, Bourtoule et al. 2021).

Prediction is the (weighted) mean of the constituents' softmax outputs (``softmax``) or the
(weighted) share of their votes (``majority``; ties go to the lower class, as ``argmax`` does).

A strategy owns how its constituents' predictions combine: its ``predictor()`` returns a
:class:`Predictor` (or a subclass), and every place that predicts (the server's evaluation, its
audit, ``forget``'s figures) builds the ensemble through it. :meth:`Ensemble.combine` is the one
combination rule: :meth:`Ensemble.predict_proba` is ``combine(member_probs(x))``, and evaluation,
which also needs every constituent's own accuracy, calls the two parts itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fairforget.model import SimpleConvNet, load_model


class Ensemble:
    """The constituent models of a shard ensemble and the rule that combines their predictions.

    :param states: shard -> the state dict of that shard's SimpleConvNet
    :param num_classes: number of classes K the models predict
    :param width: the SimpleConvNet base width the state dicts were trained with (``model-width``)
    :param vote: ``"softmax"`` (mean of the softmax outputs) or ``"majority"`` (share of the votes);
        anything else is a ValueError
    :param weights: shard -> weight (>= 0, not all 0; normalised to sum to 1), or None for even weights
    """

    def __init__(self, states: Mapping[int, Mapping[str, torch.Tensor]], num_classes: int, width: int,
                 vote: str = "softmax", weights: Mapping[int, float] | None = None) -> None:
        if vote not in ("softmax", "majority"):
            raise ValueError(f"unknown ensemble vote {vote!r}")
        self.vote = vote
        self.weights = None if weights is None else {int(k): float(v) for k, v in weights.items()}
        self.num_classes = num_classes
        self.models: dict[int, SimpleConvNet] = {}
        for shard, state in sorted(states.items()):
            self.models[shard] = load_model(state, num_classes, width)

    @torch.no_grad()
    def member_probs(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(S, N, K) softmax outputs of every constituent on the images ``x`` (N, C, H, W), computed
        ``batch_size`` images at a time."""
        return torch.stack([model_probs(model, x, batch_size) for model in self.models.values()])

    def combine(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) ensemble output from ``probs``, the (S, N, K) outputs of :meth:`member_probs`, by the
        vote and the weights; a ValueError for negative weights or weights that are all 0."""
        if self.vote == "majority":
            probs = torch.nn.functional.one_hot(probs.argmax(-1), self.num_classes).float()
        if self.weights is None:
            return probs.mean(0)
        w = torch.tensor([self.weights.get(k, 0.0) for k in self.models], dtype=probs.dtype)
        if not (w >= 0).all() or float(w.sum()) <= 0:
            raise ValueError(f"ensemble weights must be >= 0 and not all 0, got {self.weights}")
        return (probs * (w / w.sum()).view(-1, 1, 1)).sum(0)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) ensemble output on the images ``x``: ``combine(member_probs(x))``."""
        return self.combine(self.member_probs(x))

    def __len__(self) -> int:
        return len(self.models)

    def rule(self) -> dict[str, Any]:
        """How the constituents combine, as data that can travel to a site (``{"vote", "weights"}``:
        shard -> weight, or None for even); a ValueError for a subclass with its own :meth:`combine`,
        whose rule is code."""
        if type(self).combine is not Ensemble.combine:
            raise ValueError(f"the predictor combines its models by its own rule ({type(self).__name__}.combine), "
                             "which cannot be sent to a site: use site-audit-scope = \"shard\"")
        return {"vote": self.vote,
                "weights": None if self.weights is None else {str(k): v for k, v in sorted(self.weights.items())}}

    @classmethod
    def from_rule(cls, states: Mapping[int, Mapping[str, torch.Tensor]], num_classes: int, width: int,
                  rule: Mapping[str, Any]) -> Ensemble:
        """The ensemble of ``states`` combined as :meth:`rule` says (what a site builds from the server's
        audit message)."""
        weights = rule.get("weights")
        return cls(states, num_classes, width, str(rule.get("vote", "softmax")),
                   None if weights is None else {int(k): float(v) for k, v in weights.items()})

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) predicted class of each image in ``x``."""
        return self.predict_proba(x).argmax(-1)


@dataclass(frozen=True)
class Predictor:
    """How a strategy's constituent models predict together (what ``strategy.predictor()`` returns):
    the vote and, optionally, a weight per constituent (shard -> weight; none: even). Called with the
    constituents' state dicts it builds the :class:`Ensemble` that predicts; a strategy with another
    rule returns a subclass whose ``__call__`` builds an :class:`Ensemble` subclass overriding
    :meth:`Ensemble.combine`.

    :param vote: ``"softmax"`` or ``"majority"`` (:class:`Ensemble`)
    :param weights: shard -> weight, or None for even weights
    """

    vote: str = "softmax"
    weights: Mapping[int, float] | None = field(default=None)

    def __call__(self, states: Mapping[int, Mapping[str, torch.Tensor]], num_classes: int, width: int) -> Ensemble:
        """The :class:`Ensemble` of the constituents ``states`` (shard -> state dict) for ``num_classes``
        classes and model width ``width``, combined by this predictor's vote and weights."""
        return Ensemble(states, num_classes, width, self.vote, self.weights)


def model_probs(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, K) softmax outputs of one model on the images ``x``, ``batch_size`` images at a time."""
    return torch.cat([model(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)])
