"""TensorBoard scalar events, written without TensorFlow.

``torch.utils.tensorboard.SummaryWriter`` reaches ``tensorboard.compat.tf``, which imports
TensorFlow whenever it is installed (every Keras user's environment): seconds of start-up and
TensorFlow's log banner on every run. The trainer logs scalars only, so it writes the event file
itself with TensorBoard's own pieces: the ``Event``/``Summary`` protocol buffers and its
``RecordWriter`` (TFRecord framing with masked CRC-32C), none of which import TensorFlow. The file
is the one ``SummaryWriter`` writes (same name pattern, same first event, ``simple_value``
scalars, the same ``SessionLog.START`` marker for ``purge_step``), so TensorBoard reads it as
usual. Reference: ``torch/utils/tensorboard/writer.py`` and
``tensorboard/summary/writer/event_file_writer.py``.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

_file_counter = itertools.count()


class ScalarEventWriter:
    """Appends scalar summaries to a new ``events.out.tfevents.*`` file in ``log_dir``.

    ``purge_step`` (a resumed run's first step): TensorBoard hides the events of earlier files
    at or after this step, the ones the stopped run wrote past its last checkpoint. Every
    :meth:`add_scalar` is flushed to the OS, so a killed run loses nothing already logged.

    Raises ``OSError`` if ``log_dir`` cannot be created or written.
    """

    def __init__(self, log_dir: Path, *, purge_step: int | None = None) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        name = "events.out.tfevents.%010d.%s.%s.%s" % (  # noqa: UP031 - TensorBoard's own pattern
            time.time(),
            socket.gethostname(),
            os.getpid(),
            next(_file_counter),
        )
        self.path = log_dir / name
        self._file = open(self.path, "wb")  # noqa: SIM115 - open for the whole run
        self._records = RecordWriter(self._file)
        self._write(wall_time=time.time(), file_version="brain.Event:2")
        if purge_step is not None:
            from tensorboard.compat.proto.event_pb2 import SessionLog

            self._write(step=purge_step, file_version="brain.Event:2")
            self._write(step=purge_step, session_log=SessionLog(status=SessionLog.START))
        self._file.flush()

    def _write(self, **fields: object) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._records.write(Event(**fields).SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """One scalar at ``step`` (the training step, an int), stamped with the wall time."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self._write(wall_time=time.time(), step=step, summary=summary)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
