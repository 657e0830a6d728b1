"""``scatter-cnn``: the fixed scattering front end and a small CNN on it (Tramer and Boneh 2021,
"ScatterNet + CNN").

The scattering coefficients (:class:`~fairforget.models.scattering.Scattering`, 243 channels on a
4x4 grid for 16-px RGB images) are normalised per image (``GroupNorm`` without affine parameters:
no data statistic, so no privacy spent), then two 3x3 convolutions (243 -> 4w -> 8w), each with
GroupNorm (``gcd(32, C)`` groups; never BatchNorm, whose batch statistics have no per-sample
gradient) and ReLU, global average pooling to the ``8w``-dimensional bottleneck (as SimpleConvNet's)
and the linear head ``fc``. The convolutions, their GroupNorms' affine parameters and ``fc`` train;
the scattering does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from fairforget.models.scatter_linear import GROUPS, scatter_channels
from fairforget.models.scattering import Scattering


class ScatterCNN(nn.Module):
    name: ClassVar[str] = "scatter-cnn"
    refuses: ClassVar[Mapping[str, str]] = {}
    #: the DP planner's defaults (fairforget/privacy/planner.py), tuned on the embedded data
    dp_defaults: ClassVar[Mapping[str, float]] = {"batch_fraction": 1.0, "steps": 100, "lr": 0.01, "max_grad_norm": 1.0}

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3, norm: str = "group") -> None:
        super().__init__()
        chans = scatter_channels(in_channels)
        self.scattering = Scattering()
        self.norm = nn.GroupNorm(GROUPS if chans % GROUPS == 0 else 1, chans, affine=False)
        layers: list[nn.Module] = []
        for c_in, c_out in ((chans, 4 * width), (4 * width, 8 * width)):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.GroupNorm(math.gcd(32, c_out), c_out),
                       nn.ReLU()]
        self.convs = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.bottleneck_dim = 8 * width
        self.fc = nn.Linear(self.bottleneck_dim, num_classes)

    @staticmethod
    def bottleneck(width: int, in_channels: int = 3) -> int:
        return 8 * width

    @staticmethod
    def matches(state: Mapping[str, torch.Tensor]) -> bool:
        return "convs.0.weight" in state

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.norm(self.scattering(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
