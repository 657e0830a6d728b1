"""RUBi: Reducing Unimodal Biases (Cadene, Dancette, Ben-younes, Cord and Parikh, NeurIPS 2019).

A bias-only branch predicts the target from a biased view of the input, here the image through
:class:`~fairforget.objectives.bias_net.BiasNet` (1x1 convolutions: it sees colour, not shape; the
"g" of Bahng et al.'s RUBi baseline on Biased-MNIST). Its logits, through a sigmoid, mask the main
model's logits during training:

1. ``mask = sigmoid(g(x))``, ``logits_rubi = f(x) * mask``;
2. loss ``CE(logits_rubi, y) + CE(g(x), y)`` (the bias-only loss trains the branch).

Samples the bias branch already gets right are down-weighted in the main model's gradient; at test
time the main model ``f`` is used alone. The branch belongs to the objective (trained, checkpointed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.objectives.base import Objective, ObjectiveContext
from fairforget.objectives.bias_net import BiasNet, bias_width
from fairforget.training import Batch


def rubi_logits(main_logits: torch.Tensor, bias_logits: torch.Tensor) -> torch.Tensor:
    """The main logits masked by ``sigmoid`` of the bias-only logits (element-wise)."""
    return main_logits * torch.sigmoid(bias_logits)


class RUBi(Objective):
    name = "rubi"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.bias_net = BiasNet(ctx.num_classes, bias_width(ctx.bottleneck_dim))

    def terms(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        bias_logits = self.bias_net(batch.x)
        return {"rubi": F.cross_entropy(rubi_logits(model(batch.x), bias_logits), batch.y),
                "bias_only": F.cross_entropy(bias_logits, batch.y)}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        t = self.terms(model, batch)
        return t["rubi"] + t["bias_only"]
