"""Ctrl-C and SIGTERM (cluster preemption): finish the step, checkpoint, say how to continue.

The first SIGINT or SIGTERM asks the loop to stop; a second one aborts at once. Across processes
the ranks must stop at the same step to write one consistent checkpoint, and every rank must
know why (a signal may reach one rank only). They agree without waiting on each other: at a
check step every rank launches an asynchronous all-reduce (max) of ``[its signal or 0, its
seconds per step]`` and trains on; at the next check step the result is long there, so reading
it costs no round trip. A signal is then honoured at that check step on every rank alike, and
the next check step is set from the slowest rank's step time so that checks are about
``check_s`` apart. Every rank computes the same schedule from the same reduced values.

Worst case from the signal to the stop: two check intervals (the signal lands just after a
launch, so it is sent with the next one) plus one step, so about ``2 * check_s`` plus a step,
whatever ``sync_every`` is. Then the checkpoint is written. torchrun forwards the signal to
every worker.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from types import FrameType
from typing import Any

from rangerdl.train.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["CHECK_S", "StopRequest"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHECK_S = 1.0
"""Seconds between the points where the ranks of a job learn of a stop request."""
MAX_CHECK_STEPS = 1000
"""A bound on the steps between checks, whatever the step time."""


class StopRequest:
    """A context manager that turns the first SIGINT/SIGTERM into a request to stop after the
    current step and a second one into ``KeyboardInterrupt``. Outside the main thread it does
    nothing. ``signum`` is the signal the stop was agreed for (on every rank, also one that got
    none itself), ``None`` while there is none."""

    def __init__(self, rt: Runtime, check_s: float = CHECK_S) -> None:
        self.rt, self.check_s = rt, check_s
        self.signum: int | None = None
        self.received: int | None = None  # what reached this process
        self._previous: dict[int, object] = {}
        self._next_check: int | None = None
        self._since: tuple[int, float] = (0, 0.0)  # (step, time) of the last check
        self._pending: tuple[Any, Any, int, Any] | None = None  # work, tensor, baseline, hold

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}
        if self._pending is not None:  # every rank launched it: wait, so nothing is in flight
            try:
                self._collect()
            except Exception as err:  # a peer is gone; the run is ending anyway
                log.debug("the last stop check failed: %s", err)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: aborting at once")
        self.received = signum
        log.warning(
            "%s: stopping within about %.0f s (every rank at one step) and writing a checkpoint "
            "(send it again to abort)",
            signal.Signals(signum).name,
            2 * self.check_s if self.rt.distributed else 0,
        )

    def agreed(self, step: int) -> bool:
        """Whether to stop after ``step``: on every rank alike. Across processes only check
        steps can say yes; the collective behind it is asynchronous (module docstring)."""
        if not self.rt.distributed:
            self.signum = self.received
            return self.signum is not None
        now = time.perf_counter()
        if self._next_check is None:  # the first call: launch the first exchange
            self._since = (step, now)
            self._launch(0.0)
            self._next_check = step + 1
            return False
        if step < self._next_check:
            return False
        signum, step_s = self._collect()
        if signum:
            self.signum = signum
            return True
        last_step, last_t = self._since
        mine = (now - last_t) / max(step - last_step, 1)
        self._since = (step, now)
        self._launch(mine)
        interval = math.floor(self.check_s / step_s) if step_s > 0 else 1  # 0: not timed yet
        self._next_check = step + max(1, min(MAX_CHECK_STEPS, interval))
        return False

    def _launch(self, step_s: float) -> None:
        import torch
        import torch.distributed as dist

        from rangerdl.distributed.release import hold, use_counts

        t = torch.tensor([float(self.received or 0), step_s], dtype=torch.float64)
        t = t.to(self.rt.comm_device)
        holder = hold([t])
        baseline = use_counts([t])[0]
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        self._pending = (work, t, baseline, holder)

    def _collect(self) -> tuple[int, float]:
        """The last exchange's ``(signal, slowest rank's seconds per step)``."""
        from rangerdl.distributed.release import settle

        assert self._pending is not None
        work, t, baseline, holder = self._pending
        self._pending = None
        work.wait()
        del work
        settle([t], [baseline], holder)
        del holder
        signum, step_s = t.tolist()
        return int(signum), float(step_s)
