"""REM, Redirection for Erasing Memory (Schoepf, Mozer, Mitchell, Brintrup, Kaissis, Kairouz,
Triantafillou, "Redirection for Erasing Memory (REM): Towards a universal unlearning method for
corrupted data", arXiv 2505.17730; seed 002's abstract): unlearning of *corrupted* data (mislabelled
scans, a device artefact, a poisoning trigger) of which only part is known, the discovered ids.

The abstract's key feature: the corrupted data are redirected to dedicated neurons introduced at
unlearning time, which are then discarded. The four steps, as the authors' Algorithm 1 is described
(the full text is not in this repository; what follows is our reading, and the choices the
description leaves open are marked *ours*):

1. **Expand.** Every convolution of :class:`~fairforget.model.SimpleConvNet` gets ``extra`` x its
   channels of new, randomly initialised channels (theta_o2): a convolution from the previous layer's
   original and new channels into the new ones (with its own norm and ReLU), a convolution from the
   previous layer's new channels into the original ones, and a head column block reading the new
   bottleneck channels, all randomly initialised as the authors describe (``init-random``; *ours*:
   false starts the paths from new channels into the original ones at zero, so that the expanded
   network first computes the trained model; it removed less in a trial). With every new channel
   masked off the expanded network *is* the trained model. Each training sample gets its own fixed
   random binary mask over the new channels (a fraction ``active`` of them kept, drawn from the
   sample id, as Example-Tied Dropout does); **all the discovered corrupted samples share one
   mask**, so they all reach the same few new channels.
2. **Remove** (retain-set free): Negative Preference Optimization on the discovered set D_f through
   the original parameters only (theta_o1, the new channels off), until the original network's
   accuracy on D_f's (corrupted) labels is below ``gamma`` (at most ``remove-steps`` steps per
   epoch). The retained data are not used here: they still hold the undiscovered corruption, which
   would be learnt again.
3. **Redirect.** The whole expanded network is trained on the full training data of the shard
   (the retained samples, which include the undiscovered corruption, and D_f with its corrupted
   labels), each sample through its mask, to recover utility; each step also adds the NPO term on
   D_f through theta_o1 alone (weight ``remove-weight``), so the corruption cannot flow back into
   the original parameters. The shared path of D_f in theta_o2 is the path of least resistance for
   the corruption: a shared concept (a trigger) is learnt there, and random exemplars (undiscovered
   flipped labels) are memorised in each sample's own new channels. *Ours*: the utility term is
   plain cross-entropy (the authors write it in a DPO-like form against the original model).
4. **Discard** theta_o2: the saved model is the original architecture (same state-dict keys and
   shapes) holding theta_o1. *Ours*: with BatchNorm, the original norms' running statistics are then
   re-estimated on the retained data through the original network alone (in step 3 they saw the
   expanded network's activations).

``unlearn-epochs`` rounds of steps 2 and 3, Adam at ``unlearn-lr``. It is approximate (``EXACT =
False``): each deletion it serves is charged to the shard's deletion budget, the ledger records it as
``approximate``, and its ids are tombstoned like any deletion's. It trains on the forget set, which
Opacus' per-sample clipping does not cover: refused under DP-SGD, like NegGrad+ and SCRUB. What it
cannot remove is corruption nobody has discovered *and* the original network relearns in step 3;
see docs/explanation/unlearning-corrupted.md. Options (``unlearner-options``, a JSON object):
``extra``, ``active``, ``beta`` (NPO's inverse temperature), ``gamma``, ``remove-steps``,
``remove-weight``, ``init-random``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet
from fairforget.sisa import SisaShard, derived_seed
from fairforget.training import Batch
from fairforget.unlearning.approximate import UnlearnParams, approximate, descend
from fairforget.unlearning.approximate import check as check_approximate
from fairforget.unlearning.result import UnlearnResult

NAME = "rem"
EXACT = False  # approximate: charged to the shard's deletion budget (fairforget.plugins)
options = {
    "extra": 0.5,          # new channels per convolution, as a fraction of its channels (at least 1)
    "active": 0.2,         # fraction of the new channels a sample's mask keeps
    "beta": 1.0,           # NPO's inverse temperature
    "gamma": 0.1,          # step 2 stops once the original network's accuracy on D_f is below this
    "remove-steps": 50,    # most NPO steps of step 2 per epoch
    "remove-weight": 1.0,  # weight of the NPO term on D_f in step 3
    "init-random": True,   # the new channels' outgoing weights random (True) or zero (False: f unchanged at start)
}


# ---------------------------------------------------------------------- the expanded network
def _norm_like(base_norm: nn.Module, channels: int) -> nn.Module:
    if isinstance(base_norm, nn.BatchNorm2d):
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(1, channels)  # few new channels: one group (a LayerNorm over them)


class Redirected(nn.Module):
    """``base`` (a trained SimpleConvNet, theta_o1, trained in place) with new channels (theta_o2).

    ``forward(x, masks)`` runs the expanded network, ``masks`` one (batch, E_l) 0/1 tensor per
    convolution; ``base(x)`` alone is the original network (every new channel off)."""

    def __init__(self, base: SimpleConvNet, extra: float, seed: int, init_random: bool = True) -> None:
        super().__init__()
        self.base = base
        convs = [m for m in base.encoder if isinstance(m, nn.Conv2d)]
        norms = [base.encoder[i + 1] for i, m in enumerate(base.encoder) if isinstance(m, nn.Conv2d)]
        self.extra = [max(1, round(extra * c.out_channels)) for c in convs]
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            ins = [convs[0].in_channels] + [c.out_channels + e for c, e in zip(convs[:-1], self.extra[:-1],
                                                                                strict=True)]
            self.new_conv = nn.ModuleList(nn.Conv2d(i, e, kernel_size=7, padding=3) for i, e in
                                          zip(ins, self.extra, strict=True))
            self.new_norm = nn.ModuleList(_norm_like(n, e) for n, e in zip(norms, self.extra, strict=True))
            self.cross = nn.ModuleList(nn.Conv2d(e, c.out_channels, kernel_size=7, padding=3, bias=False)
                                       for e, c in zip(self.extra[:-1], convs[1:], strict=True))
            self.new_fc = nn.Linear(self.extra[-1], base.fc.out_features, bias=False)
        finally:
            torch.random.set_rng_state(gen_state)
        if not init_random:  # the new channels reach the original ones through zeros: f unchanged at start
            with torch.no_grad():
                for c in self.cross:
                    c.weight.zero_()
                self.new_fc.weight.zero_()
        self.to(next(base.parameters()).device)
        self._convs, self._norms = convs, norms

    def added_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base."))

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        h, e = x, None
        for i, (conv, norm) in enumerate(zip(self._convs, self._norms, strict=True)):
            pre = conv(h) if e is None else conv(h) + self.cross[i - 1](e)
            new = self.new_conv[i](h if e is None else torch.cat([h, e], 1))
            e = F.relu(self.new_norm[i](new)) * masks[i][:, :, None, None]
            h = F.relu(norm(pre))
        return self.base.fc(h.mean((2, 3))) + self.new_fc(e.mean((2, 3)))


def _masks(ids: torch.Tensor, forget: set[int], widths: list[int], active: float, seed: int) -> list[torch.Tensor]:
    """Each sample's fixed mask per layer (drawn from its id: the same in every epoch); one shared mask
    for every discovered corrupted sample. Each mask keeps at least one channel."""
    rows: list[list[np.ndarray]] = []
    for i in ids.tolist():
        rng = np.random.default_rng([seed, 0 if i in forget else 1, 0 if i in forget else i])
        layer = []
        for w in widths:
            m = rng.random(w) < active
            m[rng.integers(w)] = True
            layer.append(m)
        rows.append(layer)
    return [torch.tensor(np.stack([r[k] for r in rows]), dtype=torch.float32) for k in range(len(widths))]


def _base_eval(base: SimpleConvNet, x: torch.Tensor) -> torch.Tensor:
    """The original network's logits with its norms' running statistics (the small D_f must neither
    set the batch statistics nor enter the running ones), gradients flowing."""
    was = base.training
    base.eval()
    try:
        return base(x)
    finally:
        base.train(was)


def _npo(base: SimpleConvNet, x: torch.Tensor, y: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024) on a classifier: ``(2 / beta) mean softplus(beta (log p(y|x) - log p_ref(y|x)))``,
    gradient ascent on the forget set whose weight fades as the model falls below the reference."""
    logp = -F.cross_entropy(_base_eval(base, x), y, reduction="none")
    return (2.0 / beta) * F.softplus(beta * (logp - ref_logp)).mean()


@torch.no_grad()
def _accuracy(base: SimpleConvNet, x: torch.Tensor, y: torch.Tensor) -> float:
    was = base.training
    base.eval()
    acc = float((base(x).argmax(1) == y).float().mean())
    base.train(was)
    return acc


@torch.no_grad()
def _recalibrate(base: SimpleConvNet, data: SampleSet, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics on ``data`` through the original network alone."""
    bns = [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns or len(data) == 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    base.train()
    device = next(base.parameters()).device
    for i in range(0, len(data), batch_size):
        base(data.x[i : i + batch_size].to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    base.eval()


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, float]:
    opts = {**options, **dict(params.options)}
    beta, gamma = float(opts["beta"]), float(opts["gamma"])
    device = next(model.parameters()).device
    x_f, y_f = forget.x.to(device), forget.y.to(device)
    with torch.no_grad():
        ref_logp = -F.cross_entropy(_base_eval(model, x_f), y_f, reduction="none")  # the model before
    net = Redirected(model, float(opts["extra"]), derived_seed(seed, 1), init_random=bool(opts["init-random"]))
    forget_ids = {int(i) for i in forget.ids}
    full = SampleSet.concat([retain, forget])  # the shard's whole training data: D_f keeps its labels
    table_ids, order = full.ids.sort()
    mask_table = [m[order].to(device) for m in _masks(full.ids, forget_ids, net.extra, float(opts["active"]),
                                                        derived_seed(seed, 2))]
    table_ids = table_ids.to(device)
    opt = params.optimizer.build(net)
    bs = shard.settings.batch_size
    weight = float(opts["remove-weight"])
    steps = 0

    def redirect(m: nn.Module, batch: Batch) -> torch.Tensor:
        rows = torch.searchsorted(table_ids, batch.ids)
        loss = F.cross_entropy(m(batch.x, [t[rows] for t in mask_table]), batch.y)
        return loss + weight * _npo(net.base, x_f, y_f, ref_logp, beta) if weight > 0 else loss

    for epoch in range(params.epochs):
        # step 2: NPO on D_f through theta_o1 only, until its accuracy on D_f is below gamma
        for _ in range(int(opts["remove-steps"])):
            if _accuracy(model, x_f, y_f) < gamma:
                break
            opt.zero_grad(set_to_none=True)
            _npo(model, x_f, y_f, ref_logp, beta).backward()
            opt.step()
            steps += 1
        # step 3: the expanded network on the whole shard, each sample through its mask
        descend(net, full, redirect, opt, bs, [seed + epoch])
    added = net.added_parameters()
    # step 4: discard theta_o2 (only ``model``, theta_o1, is kept and saved)
    _recalibrate(model, retain, bs)
    model.eval()
    return {"added_parameters": float(added), "removal_steps": float(steps),
            "forget_accuracy_base": _accuracy(model, x_f, y_f) if len(forget) else math.nan}


def check(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> None:
    """What can refuse this deletion, checked before anything is written (:func:`check_approximate`):
    ids not live in the shard; any DP-SGD shard (REM trains on the forget set)."""
    check_approximate(NAME, shard, ids, params)


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> UnlearnResult:
    return approximate(NAME, _method, shard, ids, params)
