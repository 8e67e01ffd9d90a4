"""A model that takes a little time per training step, so a test can kill a worker mid-run."""

from __future__ import annotations

import time

import torch
from torch import nn


class SlowMLP(nn.Module):
    def __init__(self, input_shape: list[int], num_classes: int, delay_s: float = 0.03) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay_s)
        return self.net(x)


def slow_mlp(input_shape: list[int], num_classes: int, delay_s: float = 0.03) -> nn.Module:
    return SlowMLP(input_shape, num_classes, delay_s)
