"""Run outputs on rank 0: ``metrics.jsonl``, TensorBoard events, Weights & Biases, a progress bar,
the summary."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from rangerdl._fileio import atomic_write_text
from rangerdl.train.run_folder import RunFolder
from rangerdl.units import format_bytes

log = logging.getLogger(__name__)

COUNT_TAGS = ("step", "world_size", "comm/syncs", "model/params")
"""Tags whose values are counts: printed as integers."""


def format_value(tag: str, value: Any) -> str:
    """One metric for the console: bytes in kB/MB/GB, counts as integers with thousands
    separators, seconds and rates with units, other floats with 4 decimals (or 4 significant
    digits when small)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    name = tag.rsplit("/", 1)[-1]
    if name == "bytes" or name.endswith("_bytes"):
        return format_bytes(value)
    if tag in COUNT_TAGS or isinstance(value, int):
        return f"{int(value):,}"
    if name.endswith("_s") and not name.endswith("per_s"):
        return f"{value:.1f} s"
    if name.endswith("per_s"):
        return f"{value:,.0f}"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"


def format_metrics(values: dict[str, Any]) -> str:
    """``{"val/loss": 0.1234, ...}`` -> ``"val/loss 0.1234  val/accuracy 0.9750"``."""
    return "  ".join(f"{tag} {format_value(tag, v)}" for tag, v in values.items())


def ddp_bytes_per_step(num_params: int, world_size: int) -> int:
    """What DistributedDataParallel sends per rank and step: a ring all-reduce of the fp32
    gradients (:func:`rangerdl.distributed.cost.ring_bytes`)."""
    from rangerdl.distributed.cost import ring_bytes

    return ring_bytes(num_params, 4, world_size)


class Throughput:
    """Samples per second smoothed by an exponential moving average over the reported values,
    so a console line shows the trend, not the last step's jitter."""

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.value: float | None = None

    def update(self, samples_per_s: float) -> float:
        if self.value is None:
            self.value = samples_per_s
        else:
            self.value += self.smoothing * (samples_per_s - self.value)
        return self.value


class MetricsLogger:
    """Writes one JSON object per logged step (``{"step": N, "train/loss": ...}``) and the same
    tags to TensorBoard. Only rank 0 makes one with ``enabled=True``; the others get a no-op.

    On resume, lines past ``start_step`` (written by the run that stopped) are dropped so the
    file holds exactly one history.

    ``config`` (the resolved config as a dict; default: the run's ``config.json``) switches on
    Weights & Biases when ``[log] wandb = true``.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        progress: bool,
        total_steps: int,
        start_step: int,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = RunFolder(run_dir).metrics
        self._tb: Any = None
        self._bar: Any = None
        self._wandb: WandbSink | None = None
        self._last_line = time.monotonic()
        self.total_steps = total_steps
        self._throughput = Throughput()
        if not enabled:
            return
        kept = []
        if start_step > 0 and self.path.exists():
            kept = [
                row for row in _read_rows(self.path, torn_tail="drop") if row["step"] <= start_step
            ]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 - open for the whole run
        if tensorboard:
            from rangerdl.train.tb_events import ScalarEventWriter

            self._tb = ScalarEventWriter(
                RunFolder(run_dir).tensorboard, purge_step=start_step + 1 if start_step else None
            )
        if config is None and (run_dir / "config.json").is_file():
            config = json.loads((run_dir / "config.json").read_text())
        if config is not None and config.get("log", {}).get("wandb"):
            self._wandb = WandbSink(run_dir, config)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write ``values`` at ``step``; validation and test metrics also go to the console."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, values)
        evaluated = {k: v for k, v in values.items() if k.startswith(("val/", "test/"))}
        if evaluated:
            self._console(f"step {step}/{self.total_steps}  {format_metrics(evaluated)}")

    def describe_model(self, model: Any, world_size: int) -> None:
        """A console line at the start: the parameter count and, with several workers, what
        DistributedDataParallel would send per step (to compare with ``comm/bytes``)."""
        if not self.enabled:
            return
        n = sum(p.numel() for p in model.parameters())
        line = f"model: {n:,} parameters ({format_bytes(4 * n)} in fp32)"
        if world_size > 1:
            per_step = ddp_bytes_per_step(n, world_size)
            line += (
                f"; {world_size} workers: DDP would send {format_bytes(per_step)} per rank and "
                f"step ({format_bytes(per_step * self.total_steps)} over {self.total_steps:,} steps)"
            )
        self._console(line)

    def progress(self, step: int, loss: float, samples_per_s: float) -> None:
        """The progress bar, or a log line every 5 s; throughput smoothed (:class:`Throughput`)."""
        if not self.enabled:
            return
        speed = self._throughput.update(samples_per_s)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{speed:,.0f}", refresh=False)
            self._bar.refresh()
        elif time.monotonic() - self._last_line > 5.0 or step == self.total_steps:
            self._last_line = time.monotonic()
            log.info(
                "step %d/%d  loss %.4f  %s samples/s",
                step,
                self.total_steps,
                loss,
                format_value("perf/samples_per_s", speed),
            )

    def _console(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            log.info("%s", line)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Flush and close every sink; ``summary`` (the run's final values) goes to W&B."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish(summary or {})
        self._file.close()


class WandbSink:
    """One Weights & Biases run per run folder: the config, every logged tag against ``step``,
    and at the end the summary (``summary.json``'s values, else the last of each tag).

    The W&B run id is stored in ``RUN_DIR/wandb_run_id`` and reused with ``resume="allow"``, so a
    resumed run (``rangerdl train --resume``) continues the same W&B run; steps the resumed run
    repeats are logged again (W&B cannot rewind a history). W&B's files go to ``$WANDB_DIR`` or,
    unset, ``RUN_DIR/wandb``.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "[log] wandb = true needs the wandb package: pip install 'rangerdl[wandb]'"
            ) from None
        opts = config["log"]
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file():
            from rangerdl._fileio import atomic_write_text

            atomic_write_text(id_file, run_id + "\n")
        wandb_dir = None if os.environ.get("WANDB_DIR") else run_dir
        if wandb_dir is not None:
            wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.run = wandb.init(
            project=opts.get("wandb_project") or "rangerdl",
            entity=opts.get("wandb_entity") or None,
            tags=list(opts.get("wandb_tags") or []) or None,
            mode=opts.get("wandb_mode") or None,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            config=config,
            dir=str(wandb_dir) if wandb_dir is not None else None,
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if k != "run_dir"})
        self.run.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (a torn last line, from a crash or a full disk, is
    skipped with a warning).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line before the last one (names the file and line).
    """
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a run folder?")
    return _read_rows(path, torn_tail="skip")


def _read_rows(path: Path, *, torn_tail: str) -> list[dict[str, Any]]:
    lines = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as exc:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}: line {number} is malformed ({exc})") from None
            action = "dropped" if torn_tail == "drop" else "skipped"
            log.warning("%s: the last line is torn (a crash or a full disk); %s", path, action)
            break
        rows.append(row)
    return rows
