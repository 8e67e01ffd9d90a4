"""What the console shows: sizes in kB/MB/GB, counts as integers, a smoothed throughput."""

from __future__ import annotations

import pytest

from rangerdl.distributed.cost import ring_bytes
from rangerdl.train.commands import format_summary
from rangerdl.train.metrics import Throughput, format_bytes, format_metrics, format_value


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (512, "512 B"),
        (1500, "1.5 kB"),
        (22752000.0, "22.8 MB"),
        (700.4e6, "700 MB"),
        (2.5e9, "2.5 GB"),
    ],
)
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("tag", "value", "text"),
    [
        ("comm/bytes", 22752000.0, "22.8 MB"),
        ("mem/outer_state_bytes", 4.0e6, "4 MB"),
        ("comm/syncs", 100.0, "100"),
        ("model/params", 1234567, "1,234,567"),
        ("step", 600, "600"),
        ("val/accuracy", 0.99722, "0.9972"),
        ("val/loss", 2.5e-5, "2.500e-05"),
        ("train_time_s", 11.234, "11.2 s"),
        ("samples_per_s", 3456.7, "3,457"),
    ],
)
def test_format_value(tag: str, value: float, text: str) -> None:
    assert format_value(tag, value) == text


def test_format_metrics_joins_tags() -> None:
    assert format_metrics({"val/loss": 0.5, "val/accuracy": 0.75}) == (
        "val/loss 0.5000  val/accuracy 0.7500"
    )


def test_throughput_is_smoothed() -> None:
    meter = Throughput()
    shown = [meter.update(v) for v in [300.0, 31.0, 568.0] * 20]
    assert max(shown[30:]) - min(shown[30:]) < 0.25 * (568 - 31)
    assert 250 < shown[-1] < 400  # near the mean rate, not the last value


def test_summary_formats_and_compares_with_ddp() -> None:
    summary = {
        "run_dir": "runs/x",
        "checkpoint": "runs/x/checkpoints/step-600",
        "step": 600,
        "train_time_s": 11.2,
        "samples_per_s": 3456.7,
        "world_size": 2,
        "model/params": 1_000_000,
        "comm/bytes": 400e6,
        "comm/syncs": 100.0,
        "test/accuracy": 0.9972,
    }
    text = format_summary(summary)
    assert "comm/bytes     400 MB" in text and "comm/syncs     100\n" in text
    assert "model/params   1,000,000" in text
    ddp = ring_bytes(1_000_000, 4, 2) * 600
    assert f"DDP would have sent {format_bytes(ddp)} per rank, {ddp / 400e6:.1f}x as many" in text
    assert ".0000" not in text


def test_a_torchft_summary_compares_with_ddp_over_every_groups_workers() -> None:
    """A replica group's ``world_size`` is its own processes: DDP would all-reduce across the
    workers of every group (here 3 groups of one process, where the group alone is one)."""
    summary = {
        "run_dir": "runs/x-group1",
        "checkpoint": "runs/x-group1/checkpoints/step-600",
        "step": 600,
        "train_time_s": 11.2,
        "samples_per_s": 3456.7,
        "world_size": 1,
        "replica_group": 1,
        "replica_groups": 3,
        "model/params": 1_000_000,
        "comm/bytes": 100e6,
    }
    text = format_summary(summary)
    assert "replica_groups  3" in text, text
    ddp = ring_bytes(1_000_000, 4, 3) * 600
    assert f"DDP would have sent {format_bytes(ddp)} per rank, {ddp / 100e6:.1f}x as many" in text
