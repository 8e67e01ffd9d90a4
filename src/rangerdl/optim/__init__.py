"""Optimizers: pure torch, no I/O, no torch.distributed.

``Ranger`` (RAdam + Lookahead + gradient centralisation), ``Lookahead`` around any optimizer,
``use_slow_weights`` to evaluate the slow weights, and the learning-rate schedules.
"""

from rangerdl.optim.lookahead import Lookahead, lookahead_, use_slow_weights
from rangerdl.optim.ranger import Ranger, ranger, rectification

__all__ = ["Lookahead", "Ranger", "lookahead_", "ranger", "rectification", "use_slow_weights"]
