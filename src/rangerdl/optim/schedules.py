"""Learning-rate schedules as multipliers of the peak lr, driven by ``torch.optim.lr_scheduler.LambdaLR``.

torch is imported by ``make_schedule`` only: the names and multipliers are read without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "lr_multiplier", "make_schedule"]

SCHEDULES = ("constant", "warmup", "cosine", "flat_anneal")


def lr_multiplier(
    name: str,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    anneal_start: float = 0.72,
    min_lr_ratio: float = 0.0,
) -> Callable[[int], float]:
    """``f(step) -> multiplier`` for the step about to be taken (0-based).

    * ``constant``: 1.
    * ``warmup``: linear from 1/(warmup+1) to 1 over ``warmup_steps``, then 1.
    * ``cosine``: warmup, then cosine from 1 to ``min_lr_ratio`` at ``total_steps``.
    * ``flat_anneal``: 1 until ``anneal_start * total_steps``, then cosine to ``min_lr_ratio``
      (the flat-then-anneal schedule used with Ranger on the fastai leaderboards).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")

    def cosine(progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def f(step: int) -> float:
        if name in ("warmup", "cosine") and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "cosine":
            return cosine((step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "flat_anneal":
            start = int(anneal_start * total_steps)
            return 1.0 if step < start else cosine((step - start) / max(1, total_steps - start))
        return 1.0

    return f


def make_schedule(optimizer: Optimizer, name: str, total_steps: int, **kwargs: float) -> LambdaLR:
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_multiplier(name, total_steps, **kwargs))  # type: ignore[arg-type]
