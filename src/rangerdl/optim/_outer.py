"""What Ranger and Lookahead share: the Lookahead step and the hook for distributed sync."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer


def lookahead_(
    params: list[Tensor], slow: list[Tensor], alpha: float, *, foreach: bool = True
) -> None:
    """``slow += alpha * (param - slow); param = slow``, in place.

    ``lerp`` makes ``alpha = 1`` copy the fast weights exactly.
    """
    if not params:
        return
    if foreach and all(p.device.type in ("cpu", "cuda") for p in params):
        torch._foreach_lerp_(slow, params, alpha)
        torch._foreach_copy_(params, slow)
        return
    for p, s in zip(params, slow, strict=True):
        s.lerp_(p, alpha)
        p.copy_(s)


class OuterSyncMixin(Optimizer):
    """Gives an optimizer a ``group=`` mode: the slow weights become a ``rangerdl.distributed``
    ``OuterSync`` shared by all ranks, synchronised every ``sync_every`` calls of ``step()``.

    ``rangerdl.distributed`` (and ``torch.distributed``) is imported only when a group is given.
    """

    _outer: Any = None

    def _setup_outer(
        self, group: Any, buffers: Iterable[Tensor], sync_options: dict[str, Any]
    ) -> None:
        name = type(self).__name__
        if group is None:
            if sync_options:
                raise ValueError(
                    f"{name}: unexpected argument(s) {', '.join(sorted(sync_options))} "
                    "(distributed sync options need group=)"
                )
            return
        for key in ("k", "alpha"):
            values = {g[key] for g in self.param_groups}
            if len(values) > 1:
                raise ValueError(
                    f"{name}: with group= all parameter groups sync together, but they have different "
                    f"{key} {sorted(values)}; give sync_every / outer_lr explicitly"
                )
        from rangerdl.distributed import OuterSync

        options = {
            "sync_every": self.param_groups[0]["k"],
            "outer_lr": self.param_groups[0]["alpha"],
            **sync_options,
        }
        self._outer = OuterSync(self.param_groups, group, buffers=buffers, **options)

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)`` for every parameter that has them: the model worth keeping
        (evaluate and save these; between syncs the parameters hold the fast weights). With a
        sharded distributed optimizer this is a collective: call it on every rank."""
        if self._outer is not None:
            return self._outer.slow_weights()
        return [
            (p, self.state[p]["slow_buffer"])
            for group in self.param_groups
            for p in group["params"]
            if "slow_buffer" in self.state.get(p, {})
        ]

    def finish(self) -> None:
        """End of training. Distributed: complete any pending sync and sync the local progress, so
        every rank holds the global weights. Single process: there is nothing to synchronise."""
        if self._outer is not None:
            self._outer.finish()

    def comm_stats(self) -> dict[str, float]:
        """Distributed: ``comm/bytes`` sent by this rank, ``comm/syncs``, ``comm/time_s``, and
        ``mem/outer_state_bytes``. Single process: empty."""
        return self._outer.comm_stats() if self._outer is not None else {}

    def _after_step(self) -> None:
        if self._outer is not None:
            self._outer.after_step()

    def _with_outer(self, state: dict[str, Any]) -> dict[str, Any]:
        if self._outer is not None:
            state["outer"] = self._outer.state_dict()
        return state

    def _split_outer(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        outer = state_dict.pop("outer", None)
        if self._outer is not None:
            if outer is None:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: no 'outer' entry; this state dict was not "
                    "saved by a distributed optimizer"
                )
            self._outer.load_state_dict(outer)
        return state_dict
