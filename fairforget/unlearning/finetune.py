"""Approximate unlearning by fine-tuning on the retained data ("catastrophic forgetting").

Starting from the model before the deletion, train ``unlearn-epochs`` epochs of plain cross-entropy
on the shard's retained samples only (Adam, ``unlearn-lr``). The simplest baseline of the
unlearning literature (e.g. Golatkar et al. 2020; Kurmanji et al. 2023 call it "Finetune"): cheap,
but the forget set's influence only fades as far as the extra epochs overwrite it.
"""

from __future__ import annotations

import torch

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet
from fairforget.sisa import SisaShard
from fairforget.training import NO_PRIVACY, PrivacyHook
from fairforget.unlearning.approximate import UnlearnParams, approximate, ce, descend
from fairforget.unlearning.approximate import check as check_approximate
from fairforget.unlearning.result import UnlearnResult

NAME = "finetune"


def finetune(model: SimpleConvNet, retain: SampleSet, params: UnlearnParams, batch_size: int, seed: int,
             parameters: list[torch.nn.Parameter] | None = None, privacy: PrivacyHook = NO_PRIVACY) -> None:
    """``params.epochs`` epochs of cross-entropy on ``retain`` (only ``parameters`` if given)."""
    opt = params.optimizer.build(parameters if parameters is not None else model)
    descend(model, retain, lambda m, b: ce(m, b.x, b.y), opt, batch_size, [seed + e for e in range(params.epochs)],
            privacy)


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, float]:
    finetune(model, retain, params, shard.settings.batch_size, seed, privacy=shard.privacy_hook(seed + 1))
    return {}


def check(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> None:
    """What can refuse this deletion, checked before anything is written (:func:`check_approximate`)."""
    check_approximate(NAME, shard, ids, params, dp_epochs=_dp_epochs(params))


def _dp_epochs(params: UnlearnParams | None) -> int:
    return (params or UnlearnParams.defaults()).epochs  # DP-SGD on the retained data


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> UnlearnResult:
    return approximate(NAME, _method, shard, ids, params, dp_epochs=_dp_epochs(params))
