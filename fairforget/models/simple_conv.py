"""SimpleConvNet, the Biased-MNIST network (Bahng et al. 2020; used by EnD, Tartaglione et al. 2021).

Four 7x7 convolutions (3 -> w -> 2w -> 4w -> 8w, BatchNorm + ReLU), global average pooling to the
8w-dimensional bottleneck, and a linear classifier. ``width=16`` is the published 16-32-64-128
network (about 531k parameters); the CPU default is narrower. :meth:`features` exposes the
bottleneck for attribute-inference probes and debiasing regularisers. ``norm="group"`` swaps each
BatchNorm for a GroupNorm (``min(32, C)`` groups, as Opacus' ``ModuleValidator.fix`` does): DP-SGD
needs per-sample gradients, which BatchNorm's batch statistics do not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn


def bottleneck_dim(width: int) -> int:
    """Size of SimpleConvNet's bottleneck (the linear head's input) at base width ``width``."""
    return 8 * width


NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class SimpleConvNet(nn.Module):
    name: ClassVar[str] = "simple-conv"
    refuses: ClassVar[Mapping[str, str]] = {}
    #: the DP planner's defaults (fairforget/privacy/planner.py), tuned on the embedded data
    dp_defaults: ClassVar[Mapping[str, float]] = {"batch_fraction": 0.25, "steps": 60, "lr": 0.002,
                                                  "max_grad_norm": 1.0}

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, bottleneck_dim(width)]
        self.norm = norm
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=7, padding=3), _norm(norm, c_out), nn.ReLU()]
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.bottleneck_dim = chans[-1]
        self.fc = nn.Linear(self.bottleneck_dim, num_classes)

    @staticmethod
    def bottleneck(width: int) -> int:
        return bottleneck_dim(width)

    @staticmethod
    def matches(state: Mapping[str, torch.Tensor]) -> bool:
        return "encoder.0.weight" in state

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck (after global average pooling)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))
