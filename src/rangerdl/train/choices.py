"""The values of config fields that name a choice, defined once here (no torch import) so that
the config can be checked before torch loads; the modules that act on them import them from here.
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "BUILTIN_SOURCES",
    "ON_NAN",
    "OPTIMIZERS",
    "RESUME_POLICIES",
    "STRATEGIES",
    "WANDB_MODES",
]

OPTIMIZERS = ("ranger", "adamw", "radam", "sgd")
"""``[optim] name`` values (built in ``rangerdl.train.optimizers``)."""
STRATEGIES = ("lookahead", "ddp", "post_local_sgd")
"""``[distributed] strategy`` values: distributed Lookahead (``OuterSync``) and torch's baselines."""
ON_NAN = ("stop", "skip")
"""``[train] on_nan`` values (acted on in ``rangerdl.train.loop``)."""
BACKENDS = ("auto", "gloo", "nccl", "torchft")
"""``[distributed] backend`` values: ``auto`` is NCCL on CUDA, gloo on CPU (torchrun);
``torchft``: replica groups of one process each, synced through a torchft Lighthouse."""
BUILTIN_SOURCES = ("digits", "text")
"""``[data] source`` values prepared on first use into the cache folder."""
RESUME_POLICIES = ("never", "auto")
"""``[run] resume`` values (acted on in ``rangerdl.train.run_folder``)."""
WANDB_MODES = ("", "online", "offline", "disabled")
"""``[log] wandb_mode`` values (empty: wandb's own default, or ``WANDB_MODE``)."""
