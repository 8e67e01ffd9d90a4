"""Distributed Lookahead: workers step locally; the slow weights, synchronised every
``sync_every`` steps by an :class:`OuterSync` attached to any optimizer, are the shared global model.

``SyncOptions`` and the byte model (``cost``) import no torch; ``OuterSync`` and
``distributed_ranger`` (which need ``torch.distributed``) load on first use, as does
``FaultTolerantSync`` (the outer sync on torchft, :mod:`rangerdl.distributed.ft`). This package is the
only part of rangerdl's library that imports ``torch.distributed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rangerdl.distributed.options import SyncOptions

__all__ = ["FaultTolerantSync", "OuterSync", "SyncOptions", "distributed_ranger"]

if TYPE_CHECKING:
    from rangerdl.distributed.ft import FaultTolerantSync
    from rangerdl.distributed.sync import OuterSync, distributed_ranger


def __getattr__(name: str) -> Any:
    if name in ("OuterSync", "distributed_ranger"):
        from rangerdl.distributed import sync

        return getattr(sync, name)
    if name == "FaultTolerantSync":
        from rangerdl.distributed import ft

        return ft.FaultTolerantSync
    raise AttributeError(f"module 'rangerdl.distributed' has no attribute {name!r}")
