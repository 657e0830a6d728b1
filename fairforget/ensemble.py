"""The shard ensemble: one SimpleConvNet per shard, never averaged (SISA, Bourtoule et al. 2021).

Prediction is the mean of the constituents' softmax outputs (``softmax``) or the share of their
votes (``majority``; ties go to the lower class, as ``argmax`` does).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fairforget.model import SimpleConvNet, load_model


class Ensemble:
    def __init__(self, states: Mapping[int, Mapping[str, torch.Tensor]], num_classes: int, width: int,
                 vote: str = "softmax") -> None:
        if vote not in ("softmax", "majority"):
            raise ValueError(f"unknown ensemble vote {vote!r}")
        self.vote = vote
        self.num_classes = num_classes
        self.models: dict[int, SimpleConvNet] = {}
        for shard, state in sorted(states.items()):
            self.models[shard] = load_model(state, num_classes, width)

    @torch.no_grad()
    def member_probs(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(S, N, K) softmax outputs of every constituent."""
        out = []
        for model in self.models.values():
            out.append(torch.cat([model(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)]))
        return torch.stack(out)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.member_probs(x)
        if self.vote == "softmax":
            return probs.mean(0)
        votes = torch.nn.functional.one_hot(probs.argmax(-1), self.num_classes).float()
        return votes.mean(0)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(x).argmax(-1)
