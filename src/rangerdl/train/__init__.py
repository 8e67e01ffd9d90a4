"""The trainer behind ``rangerdl train``, one concept per module: ``config`` (TOML tables),
``run_folder`` (the layout of a run), ``data`` (the datasets a run reads), ``task`` (loss and
metrics), ``models``, ``optimizers`` (optimizer + sync per strategy), ``checkpoint``,
``evaluate``, ``metrics`` (metrics.jsonl, TensorBoard), ``loop`` (the loop itself).

From Python: ``summary = train(load_config("examples/digits_cnn.toml", ["--train.steps=100"]))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Config", "load_config", "train"]

if TYPE_CHECKING:
    from rangerdl.train.config import Config, load_config
    from rangerdl.train.loop import train


def __getattr__(name: str) -> Any:
    if name in ("Config", "load_config"):
        from rangerdl.train import config

        return getattr(config, name)
    if name == "train":
        from rangerdl.train import loop

        return loop.train
    raise AttributeError(f"module 'rangerdl.train' has no attribute {name!r}")
