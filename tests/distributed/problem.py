"""The model and per-rank data that the distributed worker and the in-test references share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def make_model(seed: int = 0, batch_norm: bool = False, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, 3)]
    return nn.Sequential(*layers)


def batch(rank: int, step: int, per_rank: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: the global batch is the ranks' batches concatenated."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(per_rank, 6, generator=gen), torch.randint(0, 3, (per_rank,), generator=gen)


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def make_inner(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """An inner optimizer for OuterSync: rangerdl's, torch's, and one rangerdl neither wrote nor
    special-cases (pytorch_optimizer's Lion)."""
    from rangerdl import Ranger

    if name == "ranger":
        return Ranger(params, lr=lr, lookahead=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "lion":
        from pytorch_optimizer import Lion

        return Lion(params, lr=lr)
    raise ValueError(name)
