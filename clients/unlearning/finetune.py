"""Approximate unlearning by fine-tuning on the retained data ("catastrophic forgetting").

Starting from the model before the deletion, train ``unlearn-epochs`` epochs of plain cross-entropy
on the shard's retained samples only (Adam, ``unlearn-lr``). The simplest baseline of the
unlearning literature (e.g. Golatkar et al. 2020; Kurmanji et al. 2023 call it "Finetune"): cheap,
but the forget set's influence only fades as far as the extra epochs overwrite it.
"""

from __future__ import annotations

from typing import Any

import torch

from clients.sisa import SisaShard
from clients.unlearning.approx_state import UnlearnParams, approximate, batches, ce, descend
from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet

NAME = "finetune"


def finetune(model: SimpleConvNet, retain: SampleSet, params: UnlearnParams, batch_size: int, seed: int,
             parameters: list[torch.nn.Parameter] | None = None) -> None:
    """``params.epochs`` epochs of cross-entropy on ``retain`` (only ``parameters`` if given)."""
    opt = torch.optim.Adam(parameters if parameters is not None else model.parameters(), lr=params.lr)
    model.train()
    for epoch in range(params.epochs):
        descend(opt, batches(len(retain), batch_size, seed + epoch), lambda idx: ce(model, retain, idx))


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, Any]:
    finetune(model, retain, params, shard.settings.batch_size, seed)
    return {}


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> dict[str, Any]:
    return approximate(NAME, _method, shard, ids, params)
