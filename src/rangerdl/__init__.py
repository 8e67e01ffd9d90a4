"""rangerdl: Ranger (RAdam + Lookahead + gradient centralisation) and distributed Lookahead training.

Importing this package is cheap: ``Ranger`` and ``Lookahead`` are loaded (with torch) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Lookahead", "Ranger", "__version__"]

if TYPE_CHECKING:
    from rangerdl.optim import Lookahead, Ranger


def __getattr__(name: str) -> Any:
    if name in ("Ranger", "Lookahead"):
        from rangerdl import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'rangerdl' has no attribute {name!r}")
