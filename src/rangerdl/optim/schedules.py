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

__all__ = ["SCHEDULES", "Multiplier", "lr_multiplier", "make_schedule", "retarget_schedule"]

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


class Multiplier:
    """``f(step)`` of :func:`lr_multiplier` as an object whose settings ``LambdaLR`` saves in its
    ``state_dict()`` (it keeps a callable object's ``__dict__``), so a resumed run knows the
    schedule it ran with and :meth:`retarget` can make a change of steps deliberate.

    After a continuation (:meth:`retarget`) the steps from ``restart_step`` on follow a cosine from
    ``restart_value`` to ``min_lr_ratio`` at ``total_steps``.
    """

    def __init__(
        self,
        name: str,
        total_steps: int,
        *,
        warmup_steps: int = 0,
        anneal_start: float = 0.72,
        min_lr_ratio: float = 0.0,
    ) -> None:
        lr_multiplier(name, total_steps)  # validates the name
        self.name, self.total_steps, self.warmup_steps = name, total_steps, warmup_steps
        self.anneal_start, self.min_lr_ratio = anneal_start, min_lr_ratio
        self.restart_step: int | None = None
        self.restart_value = 1.0

    def settings(self) -> tuple[str, int, float, float]:
        return (self.name, self.warmup_steps, self.anneal_start, self.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if self.restart_step is not None and step >= self.restart_step:
            span = max(1, self.total_steps - self.restart_step)
            progress = min(1.0, (step - self.restart_step) / span)
            low = self.min_lr_ratio
            return low + (self.restart_value - low) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr_multiplier(
            self.name,
            self.total_steps,
            warmup_steps=self.warmup_steps,
            anneal_start=self.anneal_start,
            min_lr_ratio=self.min_lr_ratio,
        )(step)

    def retarget(self, new: Multiplier, step: int) -> str | None:
        """Adopt ``new`` (the config of a run resumed at ``step``); returns what changed, in words,
        or ``None``. The rule, so that resuming never makes the lr jump by accident:

        * Schedule settings changed (name, warmup, anneal start, minimum): ``new`` applies from
          ``step`` on, as configured (the user asked for it).
        * Only ``total_steps`` changed and ``new`` gives the same lr at ``step`` (still in the flat
          or warmup part): ``new`` applies, as if the run had been started with it.
        * Only ``total_steps`` changed and the lr would jump (the anneal had begun): continue from
          the current multiplier with a cosine to ``min_lr_ratio`` at the new end.

        Raises:
            ValueError: the run had annealed to its minimum, so a continuation would train at
                that lr: the message says how to give a schedule for the extra steps.
        """
        if new.settings() != self.settings():
            self.__dict__.update(new.__dict__)
            return f"schedule changed at step {step}: {new.name} over {new.total_steps} steps"
        if new.total_steps == self.total_steps:
            return None
        now = self(step)
        if self.restart_step is None and math.isclose(new(step), now, abs_tol=1e-12):
            self.total_steps = new.total_steps
            return f"schedule recomputed for {new.total_steps} steps (same lr at step {step})"
        if now <= self.min_lr_ratio + 1e-12:
            raise ValueError(
                f"--train.steps={new.total_steps}: this run's {self.name} schedule had annealed "
                f"to its minimum (x{self.min_lr_ratio}) by step {step}, so the extra steps would "
                "train at that lr. Say how to train them, e.g. --schedule.name=constant "
                "--optim.lr=1e-4 (fine-tuning at a fixed lr) or --schedule.name=cosine"
            )
        self.total_steps, self.restart_step, self.restart_value = new.total_steps, step, now
        return (
            f"continuing from the current lr (x{now:.3g}) with a cosine to x{self.min_lr_ratio} "
            f"at step {new.total_steps}"
        )


def make_schedule(optimizer: Optimizer, name: str, total_steps: int, **kwargs: float) -> LambdaLR:
    """``LambdaLR`` over a :class:`Multiplier` (saved with the scheduler's state)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, Multiplier(name, total_steps, **kwargs))  # type: ignore[arg-type]


def retarget_schedule(schedule: LambdaLR, new: Multiplier, lr: float, step: int) -> list[str]:
    """After restoring ``schedule`` for a run resumed at ``step``: adopt the config's schedule
    (:meth:`Multiplier.retarget`) and peak ``lr``, and set each group's lr for the next step.
    Returns what changed, in words."""
    said = []
    for f in schedule.lr_lambdas:
        if isinstance(f, Multiplier) and (what := f.retarget(new, step)):
            said.append(what)
    if any(base != lr for base in schedule.base_lrs):
        said.append(f"peak lr {schedule.base_lrs[0]:g} -> {lr:g}")
        schedule.base_lrs = [lr] * len(schedule.base_lrs)
        for group in schedule.optimizer.param_groups:
            group["initial_lr"] = lr
    for group, base, f in zip(
        schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True
    ):
        group["lr"] = base * f(schedule.last_epoch)
    return said
