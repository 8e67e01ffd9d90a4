"""The run folder: where a run keeps its config, metrics, checkpoints and summary.

::

    RUN_DIR/
      config.json         the resolved config (``rangerdl train --resume`` and ``eval`` read it)
      metrics.jsonl       one JSON object per logged step
      tb/                 TensorBoard events
      checkpoints/        step-N/ folders, each complete when its MANIFEST.json exists
      summary.json        the final metrics, written once the run ends
      launch_id           the torchrun job id (TORCHELASTIC_RUN_ID) that created the run
      config_history.jsonl  what each resume changed (``{"step": N, "changed": {key: [old, new]}}``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = ["RunFolder", "choose_run_folder"]


@dataclass(frozen=True)
class RunFolder:
    """The layout of one run folder (paths only; nothing is created here)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def launch_id(self) -> Path:
        return self.path / "launch_id"

    @property
    def config_history(self) -> Path:
        return self.path / "config_history.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def __str__(self) -> str:
        return str(self.path)


def choose_run_folder(
    run_dir: str, name: str, model_name: str, resume: Path | None, policy: str = "never"
) -> RunFolder:
    """The run folder: ``resume`` as given, else ``run_dir/name`` (``name`` empty:
    ``MODEL-YYYYmmdd-HHMMSS``, or ``MODEL-RUN_ID`` under torchrun). A fresh run never writes into
    an existing run, except with ``policy = "auto"``, or when the folder is this torchrun job's own
    (named by its run id, or created by a launch with the same ``TORCHELASTIC_RUN_ID``, i.e. a
    restart of it on any node), which continues from its latest checkpoint. The decision is taken
    from the folder and the launch, not from ``TORCHELASTIC_RESTART_COUNT``, which is counted per
    node (pytorch/pytorch#108158).

    Raises:
        FileNotFoundError: ``resume`` has no ``config.json``.
        ValueError: a fresh run's folder exists and is not empty.
    """
    if resume is not None:
        folder = RunFolder(resume)
        if not folder.config.is_file():
            raise FileNotFoundError(f"{resume} is not a run folder (no {folder.config.name})")
        return folder
    model = model_name.replace(":", "-").replace(".", "-")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    name_given = bool(name)
    name = name or (
        f"{model}-{run_id}" if run_id else datetime.now().strftime(f"{model}-%Y%m%d-%H%M%S")
    )
    path = Path(run_dir) / name
    folder = RunFolder(path)
    recorded = folder.launch_id.read_text().strip() if folder.launch_id.is_file() else None
    own_job = bool(run_id) and (not name_given or recorded == run_id)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if path.exists() and any(path.iterdir()) and not (restarted or own_job or policy == "auto"):
        raise ValueError(
            f"run folder {path} already exists; continue it with `rangerdl train --resume {path}` "
            "(or set --run.resume=auto), or choose another name with --run.name=NAME"
        )
    return folder
