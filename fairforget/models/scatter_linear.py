"""``scatter-linear``: a fixed scattering front end and a linear head (Tramer and Boneh 2021, "ScatterNet
+ linear").

``features(x)``: the scattering coefficients (:class:`~fairforget.models.scattering.Scattering`,
``J = 2``, 8 orientations; 81 per colour channel) on a 4x4 grid (adaptive average pooling: 16-px
images are already 4x4; 8-px ones are repeated up, larger ones averaged down), each image normalised
on its own (``GroupNorm`` without affine parameters, :data:`GROUPS` groups of channels: mean 0,
variance 1 within a group of one image). The normalisation is **per sample and data-independent**: it
uses no statistic of the training data, so it spends no privacy and needs no accounting (the
alternative Tramer and Boneh also used, DP estimates of the data's mean and variance, would spend a
share of epsilon). ``bottleneck_dim = 3 * 81 * 16 = 3888``; the only trainable part is ``fc``.

Objectives that debias the encoder (EnD, ReBias) have nothing to train here (the features are fixed):
refused in one line (:attr:`ScatterLinear.refuses`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from fairforget.models.scattering import Scattering, coefficients

GRID = 4  # the feature grid side
GROUPS = 27  # GroupNorm groups over the 3 x 81 scattering channels (Tramer and Boneh's choice: 27)


def scatter_channels(in_channels: int = 3) -> int:
    return in_channels * coefficients()


_FIXED = "its features are fixed (only the linear head trains), so there is no encoder to debias: use scatter-cnn"


class ScatterLinear(nn.Module):
    name: ClassVar[str] = "scatter-linear"
    refuses: ClassVar[Mapping[str, str]] = {"end": _FIXED, "rebias": _FIXED}
    #: the DP planner's defaults (fairforget/privacy/planner.py), tuned on the embedded data
    dp_defaults: ClassVar[Mapping[str, float]] = {"batch_fraction": 1.0, "steps": 100, "lr": 0.02, "max_grad_norm": 1.0}

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3, norm: str = "group") -> None:
        super().__init__()
        chans = scatter_channels(in_channels)
        self.scattering = Scattering()
        self.pool = nn.AdaptiveAvgPool2d(GRID)
        self.norm = nn.GroupNorm(GROUPS if chans % GROUPS == 0 else 1, chans, affine=False)
        self.bottleneck_dim = chans * GRID * GRID
        self.fc = nn.Linear(self.bottleneck_dim, num_classes)

    @staticmethod
    def bottleneck(width: int, in_channels: int = 3) -> int:
        return scatter_channels(in_channels) * GRID * GRID

    @staticmethod
    def matches(state: Mapping[str, torch.Tensor]) -> bool:
        return set(state) == {"fc.weight", "fc.bias"}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.pool(self.scattering(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
