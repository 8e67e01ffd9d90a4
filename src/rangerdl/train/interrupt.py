"""Ctrl-C and SIGTERM (cluster preemption): finish the step, checkpoint, say how to continue.

The first SIGINT or SIGTERM asks the loop to stop; a second one aborts at once. Across processes
the ranks must stop at the same step to write one consistent checkpoint, so they agree on it with
a one-value all-reduce every ``check_every`` steps (every step under DDP, which all-reduces each
step anyway; at each sync for distributed Lookahead, so that no extra round trip is paid between
syncs). torchrun forwards the signal to every worker.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from rangerdl.train.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["StopRequest"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that turns the first SIGINT/SIGTERM into a request to stop after the
    current step (``signum`` says which, for the exit code) and a second one into
    ``KeyboardInterrupt``. Outside the main thread it does nothing."""

    def __init__(self, rt: Runtime, check_every: int) -> None:
        self.rt, self.check_every = rt, max(1, check_every)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: aborting at once")
        self.signum = signum
        log.warning(
            "%s: stopping after this step and writing a checkpoint (send it again to abort)",
            signal.Signals(signum).name,
        )

    def agreed(self, step: int) -> bool:
        """Whether to stop after ``step``: on every rank alike (a collective every
        ``check_every`` steps across processes)."""
        if not self.rt.distributed:
            return self.signum is not None
        if step % self.check_every:
            return False
        return self.rt.all_sum([float(self.signum is not None)])[0] > 0
