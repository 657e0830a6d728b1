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
from typing import Any

import torch

from clients.sisa import SisaShard
from clients.unlearning.approx_state import UnlearnParams, approximate, batches, ce, descend
from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet

NAME = "neggrad"
BETA = 0.9


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, Any]:
    cap = 2.0 * math.log(shard.settings.num_classes)
    all_forget = torch.arange(len(forget))
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    model.train()
    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return BETA * ce(model, retain, idx) - (1.0 - BETA) * ce(model, forget, all_forget).clamp(max=cap)

    for epoch in range(params.epochs):
        descend(opt, batches(len(retain), shard.settings.batch_size, seed + epoch), loss_of)
    return {}


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> dict[str, Any]:
    return approximate(NAME, _method, shard, ids, params)
