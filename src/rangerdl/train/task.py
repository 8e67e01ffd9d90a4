"""The task a dataset asks for: its loss, its metrics, and what the model factory needs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["TASKS", "Task"]

TASKS = ("classification", "regression", "lm")


@dataclass
class Task:
    """Classification (cross entropy, accuracy), regression (mean squared error, RMSE) or language
    modelling (cross entropy per token, next-token accuracy, bits per byte).

    Shapes (B = batch, T = sequence length, C = classes or vocabulary, D = regression targets):
    classification logits (B, C) and targets (B,) int64; lm logits (B, T, C) and targets (B, T);
    regression outputs (B, D) and targets (B, ...) with D values each.
    """

    kind: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keywords for the model factory: ``input_shape``, ``num_classes`` (regression: D), or
    ``vocab_size`` and ``seq_len``."""

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Task:
        """The task of a dataset's metadata (``MANIFEST.json`` ``metadata``).

        Raises:
            ValueError: ``task`` is missing or not one of :data:`TASKS`.
        """
        kind = meta.get("task")
        if kind == "classification":
            return cls(
                kind, {"input_shape": list(meta["input_shape"]), "num_classes": meta["num_classes"]}
            )
        if kind == "lm":
            return cls(kind, {"vocab_size": meta["vocab_size"], "seq_len": meta["seq_len"]})
        if kind == "regression":  # models get num_classes = the number of regression targets
            outputs = math.prod(meta.get("target_shape") or [])
            return cls(kind, {"input_shape": list(meta["input_shape"]), "num_classes": outputs})
        raise ValueError(
            f"dataset metadata 'task' = {kind!r}: expected one of {', '.join(map(repr, TASKS))}"
        )

    def per_sample_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Losses of shape (B,) (lm: (B, T)), in float."""
        if self.kind == "regression":
            err = (logits.reshape(y.shape[0], -1) - y.reshape(y.shape[0], -1).to(logits.dtype)) ** 2
            return err.mean(dim=1)
        if self.kind == "lm":
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(
                y.shape
            )
        return F.cross_entropy(logits, y, reduction="none")

    def loss(
        self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The mean loss, a scalar; ``mask`` (B,) of 0/1 drops padded samples from the mean."""
        losses = self.per_sample_losses(logits, y)
        if mask is None:
            return losses.mean()
        mask = mask.to(losses.device).view(-1, *([1] * (losses.dim() - 1))).expand_as(losses)
        return (losses * mask).sum() / mask.sum().clamp(min=1)

    def metrics(self, loss_sum: float, correct: float, count: float) -> dict[str, float]:
        """Summary metrics from the sums over a split: ``loss`` and ``accuracy`` (lm: also
        ``bits_per_byte``), or ``loss`` and ``rmse`` for regression."""
        mean = loss_sum / max(count, 1)
        if self.kind == "regression":
            return {"loss": mean, "rmse": math.sqrt(mean)}
        out = {"loss": mean, "accuracy": correct / max(count, 1)}
        if self.kind == "lm":
            out["bits_per_byte"] = mean / math.log(2)
        return out
