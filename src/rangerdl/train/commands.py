"""``rangerdl train``, ``rangerdl eval`` and ``rangerdl plot``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from rangerdl.train.run_folder import RunFolder

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the digits CNN)",
        description="Train from a TOML config. Override any value with --table.key=value "
        "(precedence: command line > TOML > defaults).",
        epilog=_config_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", nargs="?", type=Path, help="TOML config (default: the embedded digits CNN)"
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue this run from its latest checkpoint",
    )
    p.add_argument(
        "--trust-run-code",
        action="store_true",
        help="with --resume: allow the run's config.json to name a model factory to import",
    )
    p.set_defaults(run=_train, accepts_extra=True)

    p = sub.add_parser("eval", help="evaluate a run's (or a checkpoint's) model on the test split")
    p.add_argument("path", type=Path, metavar="RUN_DIR|CHECKPOINT_DIR")
    p.add_argument("--split", default="test", help="which split (default: test)")
    p.add_argument(
        "--trust-run-code",
        action="store_true",
        help="allow the run's config.json to name a model factory to import",
    )
    p.set_defaults(run=_eval)

    p = sub.add_parser("plot", help="loss and metric curves of runs against step and wall time")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.png")
    p.add_argument(
        "--tags", nargs="*", help="metric tags (default: train/loss val/loss val/accuracy)"
    )
    p.set_defaults(run=_plot)


def _config_keys() -> str:
    import dataclasses

    from rangerdl.train.config import Config

    lines = ["config tables and keys (defaults; docs in rangerdl/train/config.py):"]
    for table in dataclasses.fields(Config):
        values = getattr(Config(), table.name)
        keys = ", ".join(
            f"{f.name}={getattr(values, f.name)!r}" for f in dataclasses.fields(values)
        )
        lines.append(f"  [{table.name}] {keys}")
    return "\n".join(lines)


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from rangerdl.train.config import load_config

    if args.resume is not None:
        if args.config is not None:
            raise ValueError(
                "give either a CONFIG or --resume RUN_DIR (a resumed run keeps its config)"
            )
        saved = RunFolder(args.resume).config
        if not saved.is_file():
            raise FileNotFoundError(f"{saved} does not exist; is {args.resume} a run folder?")
        cfg = load_config(saved, extra, run_folder=True, trust_code=args.trust_run_code)
    else:
        dangling = extra and extra[-1].startswith("--") and "=" not in extra[-1]
        if args.config is not None and not args.config.exists() and dangling:
            raise ValueError(
                f"{extra[-1]} {args.config}: overrides are written --table.key=value "
                f"({extra[-1]}={args.config}); a CONFIG file comes first"
            )
        cfg = load_config(args.config, extra)
    from rangerdl.train.checkpoint import CheckpointError  # torch loads once the config is good
    from rangerdl.train.loop import TrainingError, train

    try:
        summary = train(cfg, resume=args.resume)
    except (TrainingError, CheckpointError) as exc:
        log.error("%s", exc)
        return 1
    if summary.get("stopped"):  # stop_at: 0; a signal: 128 + its number, as a shell reports it
        return 128 + summary["signal"] if summary.get("signal") else 0
    if _is_main():
        print(format_summary(summary))
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def format_summary(summary: dict[str, Any]) -> str:
    keys = [k for k in sorted(summary) if "/" in k] + [
        "step",
        "train_time_s",
        "samples_per_s",
        "world_size",
        *(["replica_groups"] if "replica_groups" in summary else []),
    ]
    from rangerdl.train.metrics import ddp_bytes_per_step, format_bytes, format_value

    width = max(len(k) for k in keys)
    lines = ["", "summary", "-" * (width + 16)]
    lines += [f"{k:<{width}}  {format_value(k, summary[k])}" for k in keys]
    params = summary.get("model/params")
    workers = summary["world_size"] * summary.get("replica_groups", 1)  # torchft: every group's
    if params and workers > 1 and "comm/bytes" in summary:
        ddp = ddp_bytes_per_step(int(params), workers) * summary["step"]
        lines.append(
            f"{'':<{width}}  (DDP would have sent {format_bytes(ddp)} per rank, "
            f"{ddp / max(summary['comm/bytes'], 1):.1f}x as many bytes)"
        )
    lines += [
        "-" * (width + 16),
        f"run folder:  {summary['run_dir']}",
        f"checkpoint:  {summary['checkpoint']}",
    ]
    lines.append(
        f"TensorBoard: tensorboard --logdir {RunFolder(Path(summary['run_dir'])).tensorboard}"
    )
    return "\n".join(lines)


def _eval(args: argparse.Namespace, extra: list[str]) -> int:
    if not args.path.exists():  # before torch loads: errors are instant
        raise FileNotFoundError(f"{args.path} does not exist")
    from rangerdl.train.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.path, split=args.split, trust_code=args.trust_run_code)
    for k, v in metrics.items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def _plot(args: argparse.Namespace, extra: list[str]) -> int:
    from rangerdl.train.plot import plot_runs

    tags = plot_runs(args.runs, args.out, args.tags)
    print(f"wrote {args.out} ({', '.join(tags)})")
    return 0
