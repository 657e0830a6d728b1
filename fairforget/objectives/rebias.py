"""ReBias: Learning De-biased Representations with Biased Representations (Bahng, Chun, Yun, Choo
and Oh, ICML 2020).

A bias network ``g`` with a limited receptive field (:class:`~fairforget.objectives.bias_net.BiasNet`,
1x1 convolutions, as the paper's Biased-MNIST ``g``) learns the target from the shortcut; the main
model ``f`` is trained to be statistically independent of it, measured by HSIC with RBF kernels
(Gretton et al. 2005; bandwidth: the median pairwise distance) between the two bottlenecks:

1. ``f``: minimise ``CE(f(x), y) + lambda HSIC(h_f, h_g)``       (key ``rebias-lambda``);
2. ``g``: minimise ``CE(g(x), y) - lambda_g HSIC(h_f, h_g)``     (key ``rebias-lambda-g``): it
   seeks the bias representation ``f`` depends on most (the min-max game).

Both players step together with the one optimizer: the loss is
``CE(f) + CE(g) + lambda HSIC(h_f, sg(h_g)) - lambda_g HSIC(sg(h_f), h_g)`` (``sg``: stop-gradient), so
``f``'s gradient is its objective's and ``g``'s is its own (simultaneous gradient descent). HSIC
couples the samples of a batch (``per_sample = False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.objectives.base import Objective, ObjectiveContext
from fairforget.objectives.bias_net import BiasNet, bias_width
from fairforget.training import Batch


def _rbf(x: torch.Tensor) -> torch.Tensor:
    d2 = torch.cdist(x, x).pow(2)
    off = d2[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    sigma2 = off.detach().median().clamp_min(1e-6) if off.numel() else d2.new_ones(())
    return torch.exp(-d2 / (2 * sigma2))


def hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The biased HSIC estimate ``tr(K H L H) / (n - 1)^2`` with RBF kernels (0 for ``n < 2``)."""
    n = len(x)
    if n < 2:
        return x.new_zeros(())
    h = torch.eye(n, device=x.device) - 1.0 / n
    return torch.trace(_rbf(x) @ h @ _rbf(y) @ h) / (n - 1) ** 2


class ReBias(Objective):
    name = "rebias"
    per_sample = False

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.lam, self.lam_g = self.option("rebias-lambda"), self.option("rebias-lambda-g")
        self.bias_net = BiasNet(ctx.num_classes, bias_width(ctx.bottleneck_dim))

    def terms(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        hf, hg = model.features(batch.x), self.bias_net.features(batch.x)
        return {"ce": F.cross_entropy(model.fc(hf), batch.y),
                "bias_ce": F.cross_entropy(self.bias_net.fc(hg), batch.y),
                "hsic_f": hsic(hf, hg.detach()), "hsic_g": hsic(hf.detach(), hg)}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        t = self.terms(model, batch)
        return t["ce"] + t["bias_ce"] + self.lam * t["hsic_f"] - self.lam_g * t["hsic_g"]
