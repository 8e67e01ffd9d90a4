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


class NanInputBN(nn.Module):
    """BatchNorm on the input, then linear; training forwards ``at`` to ``at + 2`` see NaN inputs
    (the running statistics would take them in)."""

    def __init__(self, input_shape: list[int], num_classes: int, at: int) -> None:
        super().__init__()
        width = int(torch.tensor(input_shape).prod())
        self.bn, self.linear = nn.BatchNorm1d(width), nn.Linear(width, num_classes)
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.training:
            self.calls += 1
            if self.at <= self.calls <= self.at + 2:
                x = x * float("nan")
        return self.linear(self.bn(x))


def nan_input_bn(input_shape: list[int], num_classes: int, at: int = 5, **_: object) -> nn.Module:
    return NanInputBN(input_shape, num_classes, at)
