"""SCRUB (Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning",
NeurIPS 2023): a student, initialised as the model before the deletion, moves *away* from that model
(the teacher) on the forget set and stays close to it on the retained set.

Per epoch (``unlearn-epochs``), as in the paper's alternation:

1. max-step: one pass over the forget set maximising ``KL(teacher || student)`` (the divergence is
   clipped at ``cap`` = ln K so a handful of samples cannot blow the student up);
2. min-step: one pass over the retained set minimising ``alpha KL(teacher || student) + CE``.

Temperature 1 for the KL terms, ``alpha`` = 1; Adam at ``unlearn-lr``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from clients.sisa import SisaShard
from clients.unlearning.approx_state import UnlearnParams, approximate, batches, descend
from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet

NAME = "scrub"
ALPHA = 1.0


def _kl(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t = F.log_softmax(teacher(x), 1)
    return F.kl_div(F.log_softmax(student(x), 1), t, log_target=True, reduction="batchmean")


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, Any]:
    teacher = copy.deepcopy(model).eval()
    device = next(model.parameters()).device
    cap = math.log(shard.settings.num_classes)
    bs = shard.settings.batch_size
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    def max_loss(idx: torch.Tensor) -> torch.Tensor:
        return -_kl(teacher, model, forget.x[idx].to(device)).clamp(max=cap)

    def min_loss(idx: torch.Tensor) -> torch.Tensor:
        x, y = retain.x[idx].to(device), retain.y[idx].to(device)
        return ALPHA * _kl(teacher, model, x) + F.cross_entropy(model(x), y)

    for epoch in range(params.epochs):
        model.train()
        descend(opt, batches(len(forget), bs, seed + 1000 + epoch), max_loss)  # max-step
        descend(opt, batches(len(retain), bs, seed + epoch), min_loss)  # min-step
    return {}


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> dict[str, Any]:
    return approximate(NAME, _method, shard, ids, params)
