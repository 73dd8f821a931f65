"""Convolutional networks (Chapter 4). For now: LeNet-5, whose size Chapter 1 counts."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with today's usual choices: ReLU and max pooling.

    Layers, for a ``[N, in_channels, 32, 32]`` input:

    ======  ===========================  ==============================
    layer   what                         parameters (1 input channel)
    ======  ===========================  ==============================
    C1      6 filters 5×5                6·(1·25 + 1) = 156
    S2      2×2 max pooling              0
    C3      16 filters 5×5 over 6 maps   16·(6·25 + 1) = 2,416
    S4      2×2 max pooling              0
    C5      400 → 120 fully connected    120·(400 + 1) = 48,120
    F6      120 → 84                     84·(120 + 1) = 10,164
    output  84 → ``num_classes``         10·(84 + 1) = 850
    ======  ===========================  ==============================

    Total 61,706 for one channel and 10 classes. The 1998 paper reports about 60,000
    because its C3 connects each map to only some of S2's maps, and its output layer
    is a radial-basis layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (32, 32):
            raise ValueError(
                f"LeNet5 expects images of shape [batch, {self.in_channels}, 32, 32], "
                f"got {tuple(x.shape)}"
            )
        return self.classifier(self.features(x))
