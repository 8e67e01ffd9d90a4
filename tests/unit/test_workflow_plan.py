"""The cost model of ``rangerdl plan`` against hand-computed values (alpha-beta ring model)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rangerdl.distributed.cost import Link, all_gather_time, allreduce_time, broadcast_time
from rangerdl.units import parse_bandwidth, parse_count, parse_duration
from rangerdl.workflow.plan import StepTimes, ddp_step_time, local_row, make_plan

REPO = Path(__file__).resolve().parents[2]


def test_units() -> None:
    assert parse_bandwidth("100mbit") == 1e8
    assert parse_bandwidth("10Gbit/s") == 1e10
    assert parse_bandwidth("1.25GB/s") == 1e10
    assert parse_duration("1ms") == pytest.approx(1e-3) and parse_duration("0.4s") == 0.4
    assert parse_count("1.3B") == 1_300_000_000 and parse_count("350M") == 350_000_000
    for bad in ("100m", "fast"):
        with pytest.raises(ValueError, match="bandwidth"):
            parse_bandwidth(bad)


def test_ring_allreduce_matches_the_alpha_beta_formula() -> None:
    link = Link(1e9, latency_s=1e-4, efficiency=1.0)
    # 20 ranks, 250M fp32 values (1 GB): 2*19 alpha + 2*19/20 * 1e9 B * 8 / 1e9 bit/s
    assert allreduce_time(250_000_000, 4, 20, link) == pytest.approx(38e-4 + 1.9 * 8)
    assert all_gather_time(250_000_000, 2, 20, link) == pytest.approx(19e-4 + 0.95 * 4)
    assert broadcast_time(1000, 4, 4, link) == pytest.approx(2 * (1e-4 + 4000 * 8e-9))
    assert allreduce_time(10, 4, 1, link) == 0.0


def test_ddp_bounds_and_bucket_overlap() -> None:
    link = Link(1e9, 0.0, 1.0)
    times = StepTimes(0.1, 0.2, 0.0)
    best, est, worst, comm = ddp_step_time(times, 100_000_000, 2, link)  # 400 MB: 17 buckets
    assert comm == pytest.approx(3.2) and worst == pytest.approx(3.5) and best == pytest.approx(3.3)
    assert best <= est <= worst
    tiny = ddp_step_time(times, 1000, 2, link)  # one bucket, ready at the end of backward
    assert tiny[1] == pytest.approx(tiny[2])


def test_local_rows_count_syncs_bytes_and_overlap() -> None:
    link = Link(1e8, 0.0, 1.0)
    times = StepTimes.from_total(0.05)
    n = 1_000_000  # 4 MB: 0.32 s per fp32 all-reduce on 2 ranks at 100 Mbit/s
    fp32 = local_row(times, n, 2, link, 100, k=8)
    assert fp32.syncs == 13 and fp32.bytes_per_rank == 13 * 4_000_000  # finish() syncs the rest
    bf16 = local_row(times, n, 2, link, 100, k=8, comm_dtype="bf16")
    assert bf16.bytes_per_rank == fp32.bytes_per_rank / 2
    assert bf16.comm_s == pytest.approx(fp32.comm_s / 2, rel=1e-3)
    over = local_row(times, n, 2, link, 96, k=8, overlap=True)  # 12 syncs, the last exposed
    per = fp32.comm_s / 13
    # 7 steps of 0.05 s cover a 0.32 s all-reduce: only the last sync blocks
    assert over.overlap_steps == 7 and over.comm_s == pytest.approx(per, rel=1e-3)
    short = local_row(times, n, 2, link, 96, k=4, overlap=True)  # overlap_steps capped at k
    assert short.overlap_steps == 4
    assert short.comm_s == pytest.approx(23 * (per - 4 * 0.05) + per, rel=1e-3)
    plsgd = local_row(times, n, 2, link, 100, k=8, strategy="post_local_sgd")
    assert plsgd.syncs == 12
    both = local_row(times, n, 2, link, 96, k=8, comm_dtype="bf16", overlap=True)
    # a 0.16 s bf16 exchange: 4 steps cover it, half the bytes of fp32
    assert both.label == "distributed Ranger k=8, bf16, overlap_steps 4"
    assert both.settings.splitlines() == [
        "[distributed]", "sync_every = 8", 'compression = "bf16"', "overlap = true",
        "overlap_steps = 4",
    ]  # fmt: skip
    assert both.overlap_steps == 4 and both.bytes_per_rank == over.bytes_per_rank / 2
    assert both.comm_s == pytest.approx(per / 2, rel=1e-3)


def test_smallest_k_keeps_the_share_under_the_target() -> None:
    plan = make_plan(
        numel=250_000_000,
        times=StepTimes.from_total(0.5),
        world_size=20,
        link=Link(1e10, 1e-4),
        steps=1000,
        ks=(10,),
        max_share=0.1,
    )
    k = plan.smallest_k["fp32"]
    assert k is not None
    share = [
        local_row(plan.times, plan.numel, 20, plan.link, 1000, k=j).comm_share for j in (k - 1, k)
    ]
    assert share[0] > 0.1 >= share[1]


def test_plan_cli_prints_and_writes_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rangerdl",
            "plan",
            "--workers",
            "20",
            "--bandwidth",
            "10gbit",
            "--params",
            "250M",
            "--step-time",
            "0.5s",
            "--k",
            "10",
            "--json",
            str(tmp_path / "p.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "distributed Ranger k=10, bf16" in out.stdout and "speedup bound" in out.stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    row = next(r for r in plan["rows"] if r["label"] == "distributed Ranger k=10")
    assert row["bytes_per_rank"] == 60 * 1_900_000_000  # 600 steps / 10, 2*19/20 GB each


def test_plan_cli_takes_the_block_size_from_the_config() -> None:
    from rangerdl.cli import main

    rows = {}
    for block in (256, 32):
        out = io.StringIO()
        argv = ["plan", "--workers", "2", "--bandwidth", "20mbit", "--params", "1M"]
        argv += ["--step-time", "60ms", "--k", "8", f"--distributed.block_size={block}"]
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
        rows[block] = next(
            line
            for line in out.getvalue().splitlines()
            if line.startswith("distributed Ranger k=8, int4 ")
        )
    assert rows[256] != rows[32]  # one fp32 scale per 32 values costs more bytes than per 256


def test_plan_check_benchmark_reproduces(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "plan_check.py"),
            "--out",
            str(tmp_path / "c.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "c.json").read_text())
    assert (
        result["summary"]["allreduce"]["within_target"] == result["summary"]["allreduce"]["cells"]
    )


def test_a_busy_machine_is_named_under_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    from rangerdl.workflow import plan

    monkeypatch.setattr(plan.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert plan.busy_note([0.010, 0.011, 0.012], 2, cpus=2) is None
    spread = plan.busy_note([0.010, 0.011, 0.040], 2, cpus=2)  # one step 4x the fastest
    assert spread is not None and "the timed steps varied 4.0x" in spread
    monkeypatch.setattr(plan.os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    load = plan.busy_note([0.010, 0.011, 0.012], 2, cpus=2)
    assert load is not None and "--train.threads=1" in load
    assert "the load average is 6.0 on 2 CPUs (the timed steps agreed within 1.2x)" in load
    made = make_plan(
        numel=450_000, times=StepTimes.from_total(0.06), world_size=2, link=Link(1e8, 1e-4),
        steps=600,
    )  # fmt: skip
    made.caution = load
    lines = plan.format_plan(made).splitlines()
    assert lines[0].startswith("verdict: ") and load in lines[:10]


def test_verdict_names_the_smallest_k_of_a_lossless_payload_first() -> None:
    from rangerdl.workflow.plan import verdict

    def plan(bps: float) -> str:
        times = StepTimes.from_total(0.06)
        return verdict(
            make_plan(numel=450_000, times=times, world_size=2, link=Link(bps, 1e-4), steps=600)
        )

    slow = plan(1e8)
    assert slow.startswith("verdict: DDP spends 69% of each step communicating here")
    assert "from k = 2 (bf16 overlap)" in slow  # not topk's k = 1, which costs quality
    assert "or k = 1 with compression = topk (check its loss)" in slow
    # and says it as TOML to paste into the training config, overlap_steps included
    assert slow.splitlines()[1] == "# in the training config (k = 2, bf16 overlap):"
    toml = "\n".join(slow.splitlines()[1:])
    assert tomllib.loads(toml) == {
        "distributed": {"sync_every": 2, "compression": "bf16", "overlap": True, "overlap_steps": 2}
    }
    assert "DDP is fine on this link" in plan(1e11)


def test_plan_piped_into_head_ends_without_a_traceback() -> None:
    cmd = f"{sys.executable} -m rangerdl plan --workers 2 --bandwidth 100mbit --params 1M "
    cmd += "--step-time 50ms | head -1"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("verdict: ") and out.stderr == ""


def test_busy_note_suggests_one_thread_only_to_a_run_with_more() -> None:
    from rangerdl.workflow.plan import busy_note

    one, two = busy_note([0.01, 0.1], threads=1), busy_note([0.01, 0.1], threads=2)
    assert one is not None and two is not None
    assert "--train.threads=1" not in one and "Rerun on an idle machine or give" in one
    assert "--train.threads=1" in two
