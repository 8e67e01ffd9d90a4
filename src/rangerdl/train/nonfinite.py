"""A non-finite loss: decided on every rank together, and a skipped step leaves no trace."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from rangerdl.train.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["NonFiniteGuard", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, full disk, ...); the message says why and what is
    intact."""


class NonFiniteGuard:
    """Checks each step's loss; with ``on_nan = "skip"`` the decision is collective (one rank's
    NaN skips the step on every rank, so no rank steps with NaN gradients) and the forward pass's
    writes to module buffers (BatchNorm running statistics) are rolled back.

    Costs, with ``skip`` only: a copy of the buffers per step and, across processes, a one-value
    all-reduce per step. With ``stop`` a non-finite loss raises on its rank, which ends the job.
    """

    def __init__(self, model: nn.Module, rt: Runtime, on_nan: str, max_skips: int) -> None:
        self.model, self.rt, self.on_nan, self.max_skips = model, rt, on_nan, max_skips
        self.consecutive = 0
        self._buffers: list[Tensor] = []

    def before_forward(self) -> None:
        if self.on_nan == "skip":
            self._buffers = [b.detach().clone() for b in self.model.buffers()]

    def should_skip(self, step: int, loss: Tensor, x: Tensor, where: str) -> bool:
        """``True``: drop this step (every rank agrees). Raises :class:`TrainingError` for
        ``on_nan = "stop"`` or after ``max_skips`` consecutive skips."""
        local = not bool(torch.isfinite(loss))
        bad = local
        if self.on_nan == "skip" and self.rt.distributed:
            bad = self.rt.all_sum([float(local)])[0] > 0
        if not bad:
            self.consecutive = 0
            return False
        cause = _cause(x) if local else "another rank's loss was non-finite"
        if self.on_nan == "stop":
            raise TrainingError(
                f"step {step}: the loss is {loss.item()} ({cause}); stopping before it reaches a "
                f"checkpoint. The last checkpoint in {where} is intact. Fix the data, or lower "
                '[optim] lr, set [train] grad_clip, or set [train] on_nan = "skip".'
            )
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), self._buffers, strict=True):
                b.copy_(saved)
        self.consecutive += 1
        log.warning("step %d: non-finite loss on some rank (%s); skipping the update", step, cause)
        if self.consecutive >= self.max_skips:
            raise TrainingError(
                f"step {step}: {self.consecutive} consecutive steps had a non-finite loss "
                f"([train] max_nan_skips = {self.max_skips}); stopping. The last checkpoint in "
                f"{where} is intact."
            )
        return True


def _cause(x: Tensor) -> str:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        return "this batch's input holds NaN/inf values: check the dataset"
    return "the input is finite: the model diverged"
