"""SimpleConvNet, the Biased-MNIST network (Bahng et al. 2020; used by EnD, Tartaglione et al. 2021).

Four 7x7 convolutions (3 -> w -> 2w -> 4w -> 8w, BatchNorm + ReLU), global average pooling to the
8w-dimensional bottleneck, and a linear classifier. ``width=16`` is the published 16-32-64-128
network (about 531k parameters); the CPU default is narrower. :meth:`features` exposes the
bottleneck for attribute-inference probes and debiasing regularisers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def bottleneck_dim(width: int) -> int:
    """Size of SimpleConvNet's bottleneck (the linear head's input) at base width ``width``."""
    return 8 * width


class SimpleConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, bottleneck_dim(width)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=7, padding=3), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.bottleneck_dim = chans[-1]
        self.fc = nn.Linear(self.bottleneck_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck (after global average pooling)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def build_model(num_classes: int, width: int, seed: int) -> SimpleConvNet:
    """A freshly initialised model whose weights depend only on ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = SimpleConvNet(num_classes=num_classes, width=width)
    torch.random.set_rng_state(gen_state)
    return model


def load_model(state: Mapping[str, torch.Tensor], num_classes: int, width: int) -> SimpleConvNet:
    """A SimpleConvNet holding ``state``, in eval mode."""
    model = build_model(num_classes, width, seed=0)
    model.load_state_dict(state)
    return model.eval()
