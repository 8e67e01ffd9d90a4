"""Smoke tests of the evidence benchmarks (benchmarks/ttq/, ttq_protocol.py, convergence.py,
report.py).

The tiny modes run end to end (the protocol's tune and run stages over plain torchrun) and must
write every field the report promises. Checked against exact identities, not against the scripts'
own numbers: DDP sends one fp32 all-reduce of the parameters per step and distributed Ranger with
bf16 transport one of half the bytes per k steps.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.append(str(BENCH))  # after everything else: shadows nothing
proto = importlib.import_module("ttq.protocol")
ttq_report = importlib.import_module("ttq.report")


def _run(args: list[str], timeout_s: float) -> str:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_time_to_target_interpolates_between_evaluations() -> None:
    curve = [[32, 10.0, 3.0], [64, 20.0, 2.0], [96, 30.0, 1.5]]
    assert proto.time_to_target(curve, 2.5) == pytest.approx(15.0)
    assert proto.time_to_target(curve, 2.0) == pytest.approx(20.0)
    assert proto.time_to_target(curve, 3.5) == 10.0  # first evaluation already below: its time
    assert proto.time_to_target(curve, 1.0) is None


def test_contender_overrides_reach_the_trainer() -> None:
    from rangerdl.train.config import load_config

    ablation = importlib.import_module("outer_ablation")
    contenders = [*(e.contender for e in proto.ENTRIES.values()), *ablation.ROWS.values()]
    for c in contenders:
        cfg = load_config(proto.WORKLOADS["gpt"].config, c.overrides(1e-3))
        assert cfg.optim.name == c.optimizer, c.name
        if c.strategy == "lookahead":
            assert cfg.optim.k == c.sync_every and cfg.distributed.sync_every == 0
            assert cfg.distributed.overlap == c.overlap
            assert cfg.distributed.comm_dtype == c.comm_dtype
            assert not c.overlap or cfg.distributed.eager == c.eager, c.name
        elif c.strategy is not None:
            assert cfg.distributed.strategy == c.strategy


@pytest.mark.slow
def test_quick_modes_write_the_promised_fields(tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = f"--out={results / 'ttq_protocol.json'}"
    ttq = str(BENCH / "ttq_protocol.py")
    # ranger_k8_bf16 takes ranger_k8's tuned lr (TUNED_AS)
    _run([ttq, "--quick", "tune", "--entries", "ddp_adamw", "ranger_k8", out], timeout_s=300)
    cell = "gpt-2h-100mbit"
    run = [ttq, "--quick", "run", "--no-netsim", "--cells", cell, "--entries", "ranger_k8_bf16"]
    _run([*run, out], timeout_s=600)
    _run(
        [
            str(BENCH / "convergence.py"),
            "--quick",
            "--tasks",
            "digits",
            "--optimizers",
            "ranger",
            "adamw",
            "--seeds",
            "0",
            "1",
            f"--out={results / 'convergence.json'}",
            f"--workdir={tmp_path / 'conv'}",
        ],
        timeout_s=300,
    )
    printed = _run([str(BENCH / "report.py"), f"--results={results}"], timeout_s=60)

    data = json.loads((results / "ttq_protocol.json").read_text())
    assert {"command", "protocol", "constants", "entries", "cells", "runs"} <= data.keys()
    runs = [r for r in data["runs"] if r["stage"] == "run"]
    assert {r["entry"] for r in runs} == {"ddp_adamw", "ranger_k8_bf16"}
    for r in data["runs"]:
        assert r["ok"], (r["entry"], r.get("error"))
        assert "rangerdl train" in r["command"]
        assert math.isfinite(r["final_val_loss"]) and r["train_time_s"] > 0
        times = [t for _, t, _ in r["curve"]]
        assert times == sorted(times) and r["curve"][-1][0] == r["steps_budget"]
    for r in runs:  # one fp32 all-reduce per step against one bf16 all-reduce per k = 8 steps
        if r["entry"] == "ddp_adamw":
            assert r["syncs"] == r["steps"]
            ddp_per_sync = r["bytes_per_rank_counted"] / r["syncs"]
        else:
            assert r["syncs"] == r["steps"] // 8
    for r in runs:
        if r["entry"] == "ranger_k8_bf16":
            assert r["bytes_per_rank_counted"] / r["syncs"] == pytest.approx(ddp_per_sync / 2)
    (analysed,) = data["cells"]
    assert analysed["cell"] == cell and analysed["limit"] is not None
    ddp = next(r for r in runs if r["entry"] == "ddp_adamw" and r["cell"] == cell)
    assert analysed["target_val_loss"] == pytest.approx(ddp["curve"][-1][2])
    assert [r["entry"] for r in analysed["rows"]] == ["ddp_adamw", "ranger_k8_bf16"]
    assert (results / "ttq_protocol.png").stat().st_size > 0

    conv = json.loads((results / "convergence.json").read_text())
    assert {"command", "rows", "runs", "seeds", "lr_factors", "optimizers"} <= conv.keys()
    assert len(conv["runs"]) == 4 and all("rangerdl train" in r["command"] for r in conv["runs"])
    for row in conv["rows"]:
        loss = row["final_loss"]
        assert row["seeds"] == [0, 1] and not row["diverged_seeds"]
        assert loss["min"] <= loss["mean"] <= loss["max"] and loss["std"] is not None
        assert row["is_best_lr"]  # one lr per optimizer in quick mode: it is the best
    assert (results / "convergence.png").stat().st_size > 0

    for name in ("ttq_headline", "ttq_cells", "ttq_tuning", "convergence"):
        assert f"<!-- table: {name} -->" in printed
    assert "| ranger_k8_bf16 |" in printed and "| adamw |" in printed


def _synthetic_run(**kw: object) -> dict[str, object]:
    """A run row as the protocol's runner writes it; curve [step, seconds, loss] falls linearly in time."""
    steps, secs, start, end = kw.pop("steps"), kw.pop("secs"), kw.pop("start"), kw.pop("end")
    n = 4
    curve = [
        [steps * (i + 1) // n, secs * (i + 1) / n, start + (end - start) * (i + 1) / n]
        for i in range(n)
    ]
    row = {"ok": True, "curve": curve, "final_val_loss": end, "train_time_s": secs}
    return row | {"steps_budget": steps, "stage": "run", "others_cpu_share": 0.01} | kw


def test_ttq_protocol_ladder_targets_and_speedups(tmp_path: Path) -> None:
    """Analysis of the protocol on made-up runs with known answers: the target is DDP's mean
    final loss over its seeds, the rung is the first that reaches it, speedup = DDP's time /
    time to target, the limit = DDP's time / DDP's time with no rate limit."""
    assert proto.rung_steps("gpt", 8) == [1024, 1280, 1536, 2048, 3072]
    assert all(s % 32 == 0 for s in proto.rung_steps("gpt", 32))
    cell, lr = "gpt-2h-100mbit", 1e-3
    ddp = dict(entry="ddp_adamw", cell=cell, lr=lr, steps=1024, comm_time_s=None)
    runs = [
        _synthetic_run(**ddp, seed=s, secs=200.0, start=3.0, end=e, bytes_per_rank_counted=1e9)
        for s, e in ((0, 1.9), (1, 2.0), (2, 2.1))
    ]
    runs.append(
        _synthetic_run(
            entry="ddp_adamw",
            cell="gpt-2h-nolimit",
            lr=lr,
            seed=0,
            steps=1024,
            secs=50.0,
            start=3.0,
            end=2.0,
        )
    )
    name = next(c for c in proto.CELLS if c.key == cell).entries[-1]  # a local contender
    lk = dict(entry=name, cell=cell, lr=lr, seed=0, bytes_per_rank_counted=1e8)
    runs.append(_synthetic_run(**lk, steps=1024, secs=50.0, start=3.0, end=2.2, comm_time_s=1.0))
    # rung 1024 ends at 2.2 (not reached); rung 1280 reaches 2.0 at (3 - 2) / (3 - 1.8) of 60 s
    runs.append(_synthetic_run(**lk, steps=1280, secs=60.0, start=3.0, end=1.8, comm_time_s=1.0))
    analysed = {c["cell"]: c for c in proto.analyse({"runs": runs})}[cell]
    assert analysed["target_val_loss"] == pytest.approx(2.0)
    assert analysed["limit"] == pytest.approx(4.0)
    rows = {r["entry"]: r for r in analysed["rows"]}
    row = rows[name]
    assert row["rung"] == 1280
    assert row["time_to_target_s"] == pytest.approx(50.0)  # between (45 s, 2.1) and (60 s, 1.8)
    assert row["speedup"] == pytest.approx(200.0 / row["time_to_target_s"])
    assert row["fraction_of_limit"] == pytest.approx(row["speedup"] / 4.0)
    assert row["bytes_fewer_than_ddp"] == pytest.approx(10.0)
    assert row["vs_ddp"] == pytest.approx(0.1) and not row["matches_ddp"]  # 2.2 vs 2.0 +- 0.1
    assert rows["ddp_adamw"]["equal_tokens"]["sd"] == pytest.approx(0.1)
    payload = {"runs": runs}
    text = ttq_report.tables(payload)
    assert name in text and "1280" in text
    ttq_report.plot(payload, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_ttq_protocol_rung_is_the_first_that_every_seed_reaches() -> None:
    """Seed 0 reaches the target at B but seed 1 only at 1.25 B: the row's rung is 1.25 B (its
    time the mean over seeds there); without every seed's run at a reaching rung, no time."""
    cell, lr = "gpt-2h-100mbit", 1e-3
    runs = [
        _synthetic_run(
            entry="ddp_adamw", cell=cell, lr=lr, seed=s, steps=1024, secs=200.0, start=3, end=2
        )
        for s in (0, 1)
    ]
    bf = dict(entry="ranger_k8_bf16", cell=cell, lr=lr)
    seed0_b = _synthetic_run(**bf, seed=0, steps=1024, secs=40.0, start=3.0, end=1.9)
    seed1_b = _synthetic_run(**bf, seed=1, steps=1024, secs=40.0, start=3.0, end=2.1)
    seed1_r = _synthetic_run(**bf, seed=1, steps=1280, secs=50.0, start=3.0, end=1.5)
    seed0_r = _synthetic_run(**bf, seed=0, steps=1280, secs=50.0, start=3.0, end=1.5)

    def row(extra: list[dict[str, object]]) -> dict[str, object]:
        analysed = {c["cell"]: c for c in proto.analyse({"runs": runs + extra})}[cell]
        return {r["entry"]: r for r in analysed["rows"]}["ranger_k8_bf16"]

    partial = row([seed0_b, seed1_b, seed1_r])  # seed 0 has no 1280 run yet
    assert "rung" not in partial and partial["seed0_rung"] == 1024
    assert partial.get("time_to_target_s") is None
    full = row([seed0_b, seed1_b, seed1_r, seed0_r])
    assert full["rung"] == 1280
    # both 1280 runs fall 3 -> 1.5 in 50 s: 2.0 at (3 - 2) / 1.5 of 50 s
    assert full["time_to_target_s"] == pytest.approx(50.0 * 2 / 3)
    assert full["time_to_target_per_seed"] == pytest.approx([50.0 * 2 / 3] * 2)
