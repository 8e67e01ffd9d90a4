"""Every number a user gives ``rangerdl plan`` or a training config either yields an answer in
bounded time and memory or a one-line error naming the option or key: no hang, no traceback, no
nan or inf in a table."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from rangerdl.cli import main
from rangerdl.distributed.cost import Link, allreduce_time
from rangerdl.train.config import LIMITS, Config, load_config
from rangerdl.workflow.plan import (
    DDP_BUCKET_BYTES,
    DDP_FIRST_BUCKET_BYTES,
    StepTimes,
    ddp_step_time,
)

REPO = Path(__file__).resolve().parents[2]
PLAN = ["plan", "--workers", "4", "--bandwidth", "1gbit", "--params", "1M", "--step-time", "0.1s"]
NON_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)


def _with(argv: list[str], option: str, *values: str) -> list[str]:
    """``argv`` with ``option`` set to ``values`` (replaced where present, else appended)."""
    if option in argv:
        i = argv.index(option)
        return [*argv[:i], option, *values, *argv[i + 2 :]]
    return [*argv, option, *values]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1, out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _simulated_ddp(times: StepTimes, numel: int, world_size: int, link: Link) -> float:
    """DDP's step, bucket by bucket: each all-reduce starts when its gradients exist and the one
    before it is done (the model of ``rangerdl.workflow.plan``, written out one bucket at a time)."""
    total, cap, free, done = 4 * numel, DDP_FIRST_BUCKET_BYTES, times.forward_s, 0
    while total > 0:
        size = min(cap, total)
        done += size // 4
        ready = times.forward_s + times.backward_s * done / numel
        free = max(ready, free) + allreduce_time(size // 4, 4, world_size, link)
        total, cap = total - size, DDP_BUCKET_BYTES
    return max(free, times.forward_s + times.backward_s) + times.optimizer_s


@pytest.mark.parametrize(
    ("numel", "times", "link"),
    [
        (1000, StepTimes(0.1, 0.2), Link(1e9, 0.0, 1.0)),  # one bucket
        (262_144 + 1, StepTimes(0.1, 0.2), Link(1e9, 1e-4)),  # the first bucket and one value
        (100_000_000, StepTimes(0.1, 0.2), Link(1e9, 1e-4)),  # the link falls behind backward
        (100_000_000, StepTimes(0.1, 30.0), Link(1e10, 1e-4)),  # the link keeps up
        (300_000_000, StepTimes(0.01, 2.0, 0.01), Link(1e10, 5e-2)),  # behind, then caught up
    ],
)
def test_ddp_estimate_matches_the_bucket_by_bucket_simulation(
    numel: int, times: StepTimes, link: Link
) -> None:
    _, estimate, _, _ = ddp_step_time(times, numel, 4, link)
    assert estimate == pytest.approx(_simulated_ddp(times, numel, 4, link), rel=1e-12)


def test_plan_for_a_quadrillion_parameters_answers_at_once() -> None:
    # 1.6e8 DDP buckets of 25 MiB: counted, never one list entry each
    done = subprocess.run(
        [sys.executable, "-m", "rangerdl", *_with(PLAN, "--params", "1e15")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "1,000,000,000,000,000 parameters" in done.stdout
    assert not NON_FINITE.search(done.stdout), done.stdout


@pytest.mark.parametrize(
    ("option", "values"),
    [
        ("--params", ["1e400"]),
        ("--params", ["1e16"]),
        ("--step-time", ["1e400s"]),
        ("--step-time", ["1e-300s"]),
        ("--bandwidth", ["1e400gbit"]),
        ("--bandwidth", ["1e-300bit"]),
        ("--latency", ["1e400ms"]),
        ("--workers", ["1"]),
        ("--workers", ["10000000000"]),
        ("--steps", ["0"]),
        ("--steps", ["100000000000000000000"]),
        ("--k", ["8", "0"]),
        ("--k", ["100000000000000000000"]),
        ("--max-share", ["nan"]),
        ("--max-share", ["inf"]),
        ("--efficiency", ["nan"]),
        ("--efficiency", ["1e-300"]),
    ],
)
def test_plan_option_out_of_range_is_a_one_line_error_naming_it(
    capsys: pytest.CaptureFixture[str], option: str, values: list[str]
) -> None:
    err = _one_line_error(capsys, _with(PLAN, option, *values))
    assert err.startswith("rangerdl plan: error: ") and option in err, err


@pytest.mark.parametrize(
    "extremes",
    [
        {
            "--params": "1e15",
            "--workers": "1000000",
            "--bandwidth": "1bit",
            "--latency": "3600s",
            "--step-time": "1ns",
            "--efficiency": "0.01",
            "--steps": "1000000000000",
        },
        {
            "--params": "1",
            "--workers": "2",
            "--bandwidth": "1000tbit",
            "--latency": "0s",
            "--step-time": "1000000s",
            "--efficiency": "1",
            "--steps": "1",
        },
    ],
)
def test_plan_at_the_ends_of_every_range_prints_finite_figures(
    capsys: pytest.CaptureFixture[str], extremes: dict[str, str]
) -> None:
    argv = [*PLAN, "--k", "1", "1000000000000"]
    for option, value in extremes.items():
        argv = _with(argv, option, value)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "speedup bound" in out and not NON_FINITE.search(out), out


def _numeric_keys() -> list[tuple[str, str, type]]:
    keys = []
    for table in dataclasses.fields(Config):
        section = getattr(Config(), table.name)
        for key, hint in typing.get_type_hints(type(section)).items():
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
            if base in (int, float):
                keys.append((table.name, key, base))
    return keys


def test_every_numeric_config_key_has_limits() -> None:
    missing = {f"{t}.{k}" for t, k, _ in _numeric_keys()} - set(LIMITS)
    assert not missing


def _bad_values(key_type: type, low: float) -> list[str]:
    if key_type is int:  # past any loop count or allocation, and below zero (or below a
        # documented "unset" value such as [run] data_seed = -1)
        return ["100000000000000000000", "-100000000000000000000", str(min(-1, int(low) - 1))]
    return ["nan", "inf", "-inf", "1e400"]


@pytest.mark.parametrize(
    ("table", "key", "text"),
    [
        (table, key, text)
        for table, key, key_type in _numeric_keys()
        for text in _bad_values(key_type, LIMITS[f"{table}.{key}"].low)
        if not (table == "optim" and key == "betas")
    ],
)
def test_config_number_out_of_range_is_an_error_naming_the_key(
    table: str, key: str, text: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"[{table}] {key}")):
        load_config(None, [f"--{table}.{key}={text}"])


@pytest.mark.parametrize(
    "override",
    [
        "--optim.betas=[nan, 0.999]",
        "--optim.betas=[0.9, inf]",
        "--train.log_every=0",  # every step % log_every
        "--data.batch_size=1000000000000",  # samples gathered per step
        "--data.eval_batch_size=1000000000000",
        "--data.seq_len=1000000000000",  # the GPT's position table
        "--data.num_workers=1000000",  # processes started
        "--train.threads=1000000",
        "--distributed.timeout_s=1e12",  # past what a timedelta holds
        "--distributed.timeout_s=0",
        "--schedule.min_lr_ratio=2",
    ],
)
def test_config_value_that_would_fail_later_is_refused_when_loaded(override: str) -> None:
    key = re.fullmatch(r"--(\w+)\.(\w+)=.*", override)
    assert key is not None
    with pytest.raises(ValueError, match=re.escape(f"[{key[1]}] {key[2]}")):
        load_config(None, [override])


def test_config_file_with_nan_is_a_one_line_cli_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[optim]\nlr = nan\n")
    err = _one_line_error(capsys, [*PLAN, str(config)])
    assert "[optim] lr" in err, err


def test_shipped_examples_are_within_limits() -> None:
    for example in sorted((REPO / "examples").glob("*.toml")):
        if "[sweep]" not in example.read_text():
            load_config(example)
