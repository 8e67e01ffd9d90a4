"""Optimizers: pure torch, no I/O, no torch.distributed.

``Ranger`` (RAdam + Lookahead + gradient centralisation), ``Lookahead`` around any optimizer,
``use_slow_weights`` to evaluate the slow weights, and the learning-rate schedules.

Importing this package is cheap: torch loads on first use of a name (so the trainer's config check
can read ``schedules.SCHEDULES`` without it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Lookahead", "Ranger", "lookahead_", "ranger", "rectification", "use_slow_weights"]

if TYPE_CHECKING:
    from rangerdl.optim.lookahead import Lookahead, lookahead_, use_slow_weights
    from rangerdl.optim.ranger import Ranger, ranger, rectification

_HOMES = {
    "Lookahead": "lookahead",
    "lookahead_": "lookahead",
    "use_slow_weights": "lookahead",
    "Ranger": "ranger",
    "ranger": "ranger",
    "rectification": "ranger",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'rangerdl.optim' has no attribute {name!r}")
    # Bind every name at once: importing the submodule ``ranger`` sets the package attribute
    # ``ranger`` to that module, and the function of the same name must win, as it did when this
    # package imported eagerly.
    modules = {
        home: importlib.import_module(f"rangerdl.optim.{home}") for home in set(_HOMES.values())
    }
    globals().update({n: getattr(modules[home], n) for n, home in _HOMES.items()})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
