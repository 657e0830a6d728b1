"""Learned-Mixin + H (Clark, Yatskar and Zettlemoyer, "Don't Take the Easy Way Out", EMNLP 2019).

A product of experts of the main model and a bias-only model ``b``, with a learned, input-dependent
weight on the bias:

1. bias-only model: ``log b_i = log_softmax(B[a_i])``, a table of class logits per private value
   ``a`` (the bias label is known to the site), trained by its own ``CE(B[a], y)``: it learns
   ``p(y | a)``, the shortcut. It enters the ensemble detached, as Clark et al.'s pre-trained bias
   model does;
2. ``g(x) = softplus(w . h(x) + c)`` on the main model's bottleneck ``h`` (not detached);
3. loss ``CE(log_softmax f(x) + g(x) log b, y) + w_H H(softmax(g(x) log b)) + CE(B[a], y)``, with
   ``w_H`` = ``learned-mixin-entropy``: the entropy penalty keeps ``g`` from going to 0.

At test time the main model ``f`` is used alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.objectives.base import Objective, ObjectiveContext
from fairforget.training import Batch


class LearnedMixin(Objective):
    name = "learned-mixin"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.entropy_weight = self.option("learned-mixin-entropy")
        self.bias_table = nn.Embedding(max(ctx.num_private, 1), ctx.num_classes)
        nn.init.zeros_(self.bias_table.weight)  # the bias model starts uniform
        self.gate = nn.Linear(ctx.bottleneck_dim, 1)

    def terms(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        feats = model.features(batch.x)
        bias_logits = self.bias_table(batch.private)
        log_b = F.log_softmax(bias_logits, dim=1).detach()
        scaled = F.softplus(self.gate(feats)) * log_b  # g(x) log b
        mixed = F.log_softmax(model.fc(feats), dim=1) + scaled
        p = F.softmax(scaled, dim=1)
        entropy = -(p * F.log_softmax(scaled, dim=1)).sum(1).mean()
        return {"mixin": F.cross_entropy(mixed, batch.y), "entropy": entropy,
                "bias_only": F.cross_entropy(bias_logits, batch.y)}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        t = self.terms(model, batch)
        return t["mixin"] + self.entropy_weight * t["entropy"] + t["bias_only"]
