"""DEL-style localised unlearning (Deletion by Example Localization; seed 002's abstract): find the
parameters most implicated in the forget set, reset them, and fine-tune them on the retained data.

Localisation (our reading; the paper's full text is not available here): score every weight of the
convolutions and the head by ``|g_forget| / (|g_retain| + tiny)``, where ``g`` is the gradient of the
mean cross-entropy on the forget set, resp. on the retained set, at the model before the deletion:
weights the forget set pulls on far more than the data that stays. The top ``FRACTION`` of them are
reset to their values at initialisation (the shard's seeded initial model), and only those are then
fine-tuned on the retained set for ``unlearn-epochs`` epochs (Adam, ``unlearn-lr``; the gradients of
every other weight are masked).
"""

from __future__ import annotations

import torch

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet, build_model
from fairforget.sisa import SisaShard, derived_seed
from fairforget.unlearning.approximate import UnlearnParams, approximate, ce
from fairforget.unlearning.approximate import check as check_approximate
from fairforget.unlearning.finetune import finetune
from fairforget.unlearning.result import UnlearnResult

NAME = "del"
FRACTION = 0.10  # of the scored weights


def _grads(model: SimpleConvNet, data: SampleSet, names: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    model.eval()  # BatchNorm statistics of the trained model, not of the scored batch
    device = next(model.parameters()).device
    for idx in torch.arange(len(data)).split(batch_size):
        model.zero_grad(set_to_none=True)
        (ce(model, data.x[idx].to(device), data.y[idx].to(device)) * len(idx) / len(data)).backward()
        for n in names:
            total[n] += params[n].grad.detach()
    model.zero_grad(set_to_none=True)
    return total


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, float]:
    s = shard.settings
    names = [n for n, p in model.named_parameters() if p.dim() > 1]  # conv kernels and the head's weights
    g_f = _grads(model, forget, names, s.batch_size)
    g_r = _grads(model, retain, names, s.batch_size)
    scores = torch.cat([(g_f[n].abs() / (g_r[n].abs() + 1e-12)).flatten() for n in names])
    k = max(1, int(FRACTION * scores.numel()))
    threshold = scores.topk(k).values.min()
    init = build_model(s.num_classes, s.width, seed=derived_seed(s.seed, shard.shard, 0), norm=s.norm,
                       model=s.model).state_dict()
    params_by_name = dict(model.named_parameters())
    masks = {}
    with torch.no_grad():
        for n in names:
            mask = (g_f[n].abs() / (g_r[n].abs() + 1e-12)) >= threshold
            p = params_by_name[n]
            p[mask] = init[n].to(p.device)[mask]
            masks[n] = mask.to(p.dtype)
    hooks = [params_by_name[n].register_hook(lambda g, m=masks[n]: g * m) for n in names]
    try:
        finetune(model, retain, params, s.batch_size, seed, parameters=[params_by_name[n] for n in names])
    finally:
        for h in hooks:
            h.remove()
    return {"reset_parameters": int(sum(m.sum().item() for m in masks.values()))}


def check(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> None:
    """What can refuse this deletion, checked before anything is written (:func:`check_approximate`)."""
    check_approximate(NAME, shard, ids, params)  # refused under DP-SGD


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> UnlearnResult:
    return approximate(NAME, _method, shard, ids, params)
