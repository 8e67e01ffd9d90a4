"""Models loaded by tests through ``[model] name = "user_models:..."``."""

from __future__ import annotations

import torch
from torch import nn


class NanAfter(nn.Module):
    """A linear classifier whose output turns NaN from its ``after``-th training forward on."""

    def __init__(self, input_shape: list[int], num_classes: int, after: int = 5) -> None:
        super().__init__()
        self.linear = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.training and self.calls >= self.after else out


def nan_after(input_shape: list[int], num_classes: int, after: int = 5, **_: object) -> nn.Module:
    """(Takes and ignores the tiny test config's other model arguments.)"""
    return NanAfter(input_shape, num_classes, after)
