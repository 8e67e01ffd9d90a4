"""Optimizers: pure torch, no I/O, no torch.distributed."""

from rangerdl.optim.lookahead import Lookahead
from rangerdl.optim.ranger import Ranger, ranger, rectification

__all__ = ["Lookahead", "Ranger", "ranger", "rectification"]
