"""A bias-only network with a limited receptive field, for objectives that need one (RUBi, ReBias).

SimpleConvNet's layout with 1x1 convolutions (Bahng et al. 2020 use this "g" for Biased-MNIST): each
bottleneck unit sees one pixel's colour channels, never a stroke, so the network can learn the colour
shortcut and not the digit's shape. Owned by the objective, so the optimizer trains it and SISA
checkpoints save it with the model. Its convolutions have no bias: the BatchNorm after each removes
any constant, so a bias would only be a parameter whose gradient is zero.
"""

from __future__ import annotations

import torch
from torch import nn


class BiasNet(nn.Module):
    def __init__(self, num_outputs: int, width: int, in_channels: int = 3) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(chans[-1], num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def bias_width(bottleneck_dim: int) -> int:
    """The bias network's base width: the main model's (its bottleneck is 8 x width)."""
    return max(1, bottleneck_dim // 8)
