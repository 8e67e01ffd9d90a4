"""The first SIGINT/SIGTERM asks to stop after the step; a second one aborts at once."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from rangerdl.train.interrupt import StopRequest
from rangerdl.train.runtime import Runtime


def test_first_signal_requests_a_stop_the_second_aborts() -> None:
    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(rt) as stop:
        assert not stop.agreed(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(2) and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="aborting at once"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
