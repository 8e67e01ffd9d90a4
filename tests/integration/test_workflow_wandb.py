"""W&B tracking, offline: the files wandb writes are read back (no account, no network)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _records(path: Path) -> list[Any]:
    """Decode a ``.wandb`` file: a 7-byte header, then LevelDB-log records (32 KiB blocks; each
    chunk: crc32c, length, type FULL/FIRST/MIDDLE/LAST) holding protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pos, parts = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def _history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in r.history.item
                }
            )
    return rows


@pytest.mark.slow
def test_offline_run_logs_config_metrics_summary_and_resumes_the_same_run(
    tiny: list[str], tmp_path: Path
) -> None:
    pytest.importorskip("wandb")
    env = dict(
        os.environ, WANDB_DIR=str(tmp_path / "wb"), WANDB_MODE="offline", WANDB_SILENT="true"
    )
    env.pop("WANDB_API_KEY", None)
    (tmp_path / "wb").mkdir()
    args = [*tiny, "--log.wandb=true", '--log.wandb_mode="offline"', '--log.wandb_tags=["ci"]']
    first = [sys.executable, "-m", "rangerdl", "train", *args, "--train.stop_at=10"]
    proc = subprocess.run(first, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "t"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    resume = [
        sys.executable,
        "-m",
        "rangerdl",
        "train",
        "--resume",
        str(run_dir),
        "--log.progress=false",
    ]
    proc = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id

    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, twice
    first_records = _records(runs[0] / f"run-{run_id}.wandb")
    records = _records(runs[1] / f"run-{run_id}.wandb")
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == run_id and list(run_record.tags) == ["ci"]
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert config["optim"]["lr"] == 0.1 and config["log"]["wandb"] is True

    logged = _history(first_records) + _history(records)
    steps = sorted({row["step"] for row in logged if "train/loss" in row})
    assert steps == list(range(1, 31))  # every step, across the stop and the resume
    tags = set().union(*logged)
    assert {"train/loss", "optim/lr", "val/loss", "val/accuracy", "test/accuracy"} <= tags
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert any(row.get("test/accuracy") == final["test/accuracy"] for row in logged)

    summary: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary |= {u.key: json.loads(u.value_json) for u in r.summary.update}
    expected = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_time_s"] == expected["train_time_s"] and summary["step"] == 30


def test_missing_wandb_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rangerdl.train.config import Config
    from rangerdl.train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = Config()
    cfg.log.wandb = True
    with pytest.raises(ValueError, match=r"rangerdl\[wandb\]"):
        MetricsLogger(
            tmp_path,
            enabled=True,
            tensorboard=False,
            progress=False,
            total_steps=1,
            start_step=0,
            config=cfg.to_dict(),
        )


def test_importing_rangerdl_imports_neither_optuna_nor_wandb() -> None:
    code = (
        "import sys, rangerdl, rangerdl.cli, rangerdl.train.metrics, rangerdl.workflow.commands; "
        "rangerdl.cli.build_parser(); "
        "print(sorted(m for m in ('optuna', 'wandb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
