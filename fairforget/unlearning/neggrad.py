"""NegGrad+ (Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning",
NeurIPS 2023): gradient ascent on the forget set and descent on the retained set at once.

Each step takes a batch of retained samples and the forget set (it is small) and minimises::

    beta * CE(retain batch) - (1 - beta) * min(CE(forget set), cap)

for ``unlearn-epochs`` passes over the retained data. ``beta`` = 0.9. The ascent term is clipped at
``cap`` = 2 ln K (twice the loss of a uniform guess over K classes): past it the forget set is
already unlearned and further ascent would only wreck the model (plain NegGrad's failure mode).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet
from fairforget.sisa import SisaShard
from fairforget.training import Batch
from fairforget.unlearning.approximate import UnlearnParams, approximate, ce, descend
from fairforget.unlearning.approximate import check as check_approximate
from fairforget.unlearning.result import UnlearnResult

NAME = "neggrad"
BETA = 0.9


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, float]:
    cap = 2.0 * math.log(shard.settings.num_classes)
    device = next(model.parameters()).device
    x_f, y_f = forget.x.to(device), forget.y.to(device)

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return BETA * ce(m, batch.x, batch.y) - (1.0 - BETA) * ce(m, x_f, y_f).clamp(max=cap)

    descend(model, retain, loss, params.optimizer.build(model), shard.settings.batch_size,
            [seed + e for e in range(params.epochs)])
    return {}


def check(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> None:
    """What can refuse this deletion, checked before anything is written (:func:`check_approximate`)."""
    check_approximate(NAME, shard, ids, params)  # refused under DP-SGD


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> UnlearnResult:
    return approximate(NAME, _method, shard, ids, params)
