"""``rangerdl eval``: the saved model of a run or checkpoint on a split of its dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rangerdl.train import checkpoint as ckpt
from rangerdl.train.config import load_config
from rangerdl.train.loop import Task, evaluate, open_data
from rangerdl.train.models import build_model
from rangerdl.train.runtime import Runtime, init_runtime


def evaluate_checkpoint(path: Path, split: str = "test") -> dict[str, Any]:
    folder = ckpt.resolve(path)
    run_dir = folder.parent.parent
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(
            f"{saved} does not exist; the checkpoint must sit in RUN_DIR/checkpoints/"
        )
    cfg = load_config(saved)
    rt: Runtime = init_runtime(
        cfg.train.device, "gloo", cfg.train.threads, cfg.distributed.timeout_s
    )
    splits = open_data(cfg, rt)
    if split not in splits:
        raise ValueError(f"the dataset has no {split!r} split; it has {', '.join(splits)}")
    task = Task.from_metadata(splits["train"].metadata)
    model = build_model(cfg.model.name, cfg.model.args, task.model_kwargs).to(rt.device)
    model.load_state_dict(ckpt.load(folder / "model.pt"))
    metrics = evaluate(model, splits[split], task, rt, cfg.data.eval_batch_size)
    return {"checkpoint": str(folder), **{f"{split}/{k}": v for k, v in metrics.items()}}
