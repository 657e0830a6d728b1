"""EnD: Entangling and Disentangling deep representations for bias correction (Tartaglione, Barbano
and Grangetto, CVPR 2021).

On the L2-normalised bottleneck ``z = model.features(x)`` (cosine Gram matrix ``G = z z^T``, pairs
``i > j`` of the batch), with the private (bias) label ``a`` and the target ``y``:

1. disentangle: ``R_perp = sum_b |sum_{i>j, a_i = a_j = b} G_ij| / #{i>j: a_i = a_j}``: samples that
   share a bias value are pushed to orthogonal features, so the bias value stops being a direction;
2. entangle: ``R_par = 1 - mean_{i>j, y_i = y_j, a_i != a_j} (1 + G_ij) / 2``: samples of one class
   with different bias values are pulled together;
3. loss: ``CE(fc(features), y) + alpha R_perp + beta R_par`` (keys ``end-alpha``, ``end-beta``);
4. after each training (a SISA stage) the model serves a linear head refitted on its frozen
   bottleneck for ``end-refit-epochs`` full-batch epochs (:mod:`fairforget.objectives.head_refit`;
   0 = off): the jointly trained head lags behind the features EnD keeps moving. Training goes on
   from the joint head, so the encoder is the one plain EnD trains.

Our SimpleConvNet ends in ReLU before pooling (the paper's EnD network ends in Tanh), so its
bottleneck is non-negative and no two samples can have a negative cosine; the features are centred
over the batch before normalising, which gives them both signs again. A term with no pair in the
batch is 0. The loss couples the samples of a batch (``per_sample = False``).

With diffusion augmentation, the two terms see the *original* samples of a batch only: a synthetic
sample's private label is the value its generator was asked for, which most samples do not show
(colour fidelity 0.2-0.6), so grouping by it would make EnD's terms describe images that are not
there. Synthetic samples count in the cross-entropy and in the head refit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.data.base import SYNTHETIC_ID_BASE, SampleSet
from fairforget.objectives.base import Objective, ObjectiveContext
from fairforget.objectives.head_refit import HeadRefit
from fairforget.training import Batch


def end_terms(z: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R_perp, R_par)`` of unit-norm features ``z`` (n x d), targets ``y`` and bias labels ``a``."""
    gram = z @ z.T
    lower = torch.ones_like(gram, dtype=torch.bool).tril(-1)  # pairs i > j
    same_bias = (a[:, None] == a[None, :]) & lower
    r_perp = gram.new_zeros(())
    for b in torch.unique(a[same_bias.any(1)]):
        mask = same_bias & (a[:, None] == b)
        r_perp = r_perp + (gram * mask).sum().abs()
    r_perp = r_perp / same_bias.sum().clamp_min(1)
    entangle = (y[:, None] == y[None, :]) & (a[:, None] != a[None, :]) & lower
    n = entangle.sum()
    r_par = 1.0 - ((1.0 + gram) * 0.5 * entangle).sum() / n if n > 0 else gram.new_zeros(())
    return r_perp, r_par


class EnD(Objective):
    name = "end"
    per_sample = False

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.alpha, self.beta = self.option("end-alpha"), self.option("end-beta")
        self.head = HeadRefit(ctx.bottleneck_dim, ctx.num_classes, int(self.option("end-refit-epochs")))

    def terms(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        feats = model.features(batch.x)
        z = F.normalize(feats - feats.mean(0, keepdim=True), dim=1)
        real = batch.ids < SYNTHETIC_ID_BASE  # a synthetic sample's private value is asked for, not seen
        r_perp, r_par = end_terms(z[real], batch.y[real], batch.private[real])
        return {"ce": F.cross_entropy(model.fc(feats), batch.y), "disentangle": r_perp, "entangle": r_par}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        t = self.terms(model, batch)
        return t["ce"] + self.alpha * t["disentangle"] + self.beta * t["entangle"]

    def before_training(self, model: nn.Module) -> None:
        self.head.restore(model)

    def after_training(self, model: nn.Module, data: SampleSet) -> dict[str, float]:
        return self.head.refit(model, data)
