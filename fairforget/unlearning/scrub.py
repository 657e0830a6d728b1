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

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet
from fairforget.sisa import SisaShard
from fairforget.training import Batch
from fairforget.unlearning.approximate import UnlearnParams, approximate, descend
from fairforget.unlearning.approximate import check as check_approximate
from fairforget.unlearning.result import UnlearnResult

NAME = "scrub"
ALPHA = 1.0


def _kl(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t = F.log_softmax(teacher(x), 1)
    return F.kl_div(F.log_softmax(student(x), 1), t, log_target=True, reduction="batchmean")


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, float]:
    teacher = copy.deepcopy(model).eval()
    cap = math.log(shard.settings.num_classes)
    bs = shard.settings.batch_size
    opt = params.optimizer.build(model)

    def max_loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return -_kl(teacher, m, batch.x).clamp(max=cap)

    def min_loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return ALPHA * _kl(teacher, m, batch.x) + F.cross_entropy(m(batch.x), batch.y)

    for epoch in range(params.epochs):
        descend(model, forget, max_loss, opt, bs, [seed + 1000 + epoch])  # max-step
        descend(model, retain, min_loss, opt, bs, [seed + epoch])  # min-step
    return {}


def check(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> None:
    """What can refuse this deletion, checked before anything is written (:func:`check_approximate`)."""
    check_approximate(NAME, shard, ids, params)  # refused under DP-SGD


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> UnlearnResult:
    return approximate(NAME, _method, shard, ids, params)
