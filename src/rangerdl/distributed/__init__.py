"""Distributed Lookahead: workers step locally; the slow weights, synchronised every k steps, are
the shared global model. Use it through ``Ranger(..., group=...)`` or ``Lookahead(..., group=...)``."""

from rangerdl.distributed.sync import OuterSync

__all__ = ["OuterSync"]
