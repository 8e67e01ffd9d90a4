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
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

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
        if c.program == "torchft":  # the peer's own options: test_torchft_peer.py
            continue
        cfg = load_config(proto.WORKLOADS["gpt"].config, c.overrides(1e-3))
        assert cfg.optim.name == c.optimizer, c.name
        if c.strategy == "lookahead":
            assert cfg.optim.k == c.sync_every and cfg.distributed.sync_every == 0
            assert cfg.distributed.overlap == c.overlap
            assert cfg.distributed.comm_dtype == c.comm_dtype
            assert not c.overlap or cfg.distributed.eager == c.eager, c.name
        elif c.strategy is not None:
            assert cfg.distributed.strategy == c.strategy


@pytest.mark.long
@pytest.mark.slow
def test_ttq_quick_mode_writes_the_promised_fields(tmp_path: Path) -> None:
    results = tmp_path / "results"
    out = f"--out={results / 'ttq_protocol.json'}"
    ttq = str(BENCH / "ttq_protocol.py")
    # ranger_k8_bf16 takes ranger_k8's tuned lr (TUNED_AS)
    _run([ttq, "--quick", "tune", "--entries", "ddp_adamw", "ranger_k8", out], timeout_s=300)
    cell = "gpt-2h-100mbit"
    run = [ttq, "--quick", "run", "--no-netsim", "--cells", cell, "--entries", "ranger_k8_bf16"]
    _run([*run, out], timeout_s=600)
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
    finals = [r["curve"][-1][2] for r in runs if r["cell"] == "gpt-2h-target"]
    assert len(finals) == 2  # --quick: two target seeds, their median the target
    assert analysed["target_val_loss"] == pytest.approx(statistics.median(finals))
    assert [r["entry"] for r in analysed["rows"]] == ["ddp_adamw", "ranger_k8_bf16"]
    assert (results / "ttq_protocol.png").stat().st_size > 0
    for name in ("ttq_headline", "ttq_cells", "ttq_tuning"):
        assert f"<!-- table: {name} -->" in printed
    assert "| ranger_k8_bf16 |" in printed


@pytest.mark.slow
def test_convergence_quick_mode_writes_the_promised_fields(tmp_path: Path) -> None:
    results = tmp_path / "results"
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

    conv = json.loads((results / "convergence.json").read_text())
    assert {"command", "rows", "runs", "seeds", "lr_factors", "optimizers"} <= conv.keys()
    assert len(conv["runs"]) == 4 and all("rangerdl train" in r["command"] for r in conv["runs"])
    for row in conv["rows"]:
        loss = row["final_loss"]
        assert row["seeds"] == [0, 1] and not row["diverged_seeds"]
        assert loss["min"] <= loss["mean"] <= loss["max"] and loss["std"] is not None
        assert row["is_best_lr"]  # one lr per optimizer in quick mode: it is the best
    assert (results / "convergence.png").stat().st_size > 0
    assert "<!-- table: convergence -->" in printed and "| adamw |" in printed


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


def _ddp_runs(cell: str, lr: float, finals: dict[int, float]) -> list[dict[str, object]]:
    """DDP AdamW's target seeds (loopback) with these final losses, its run in ``cell`` (200 s)
    and with no rate limit (50 s)."""
    ddp = dict(entry="ddp_adamw", lr=lr, steps=1024, start=3.0, comm_time_s=None)
    runs = [
        _synthetic_run(**ddp, cell="gpt-2h-target", seed=s, secs=60.0, end=e)
        for s, e in finals.items()
    ]
    runs.append(_synthetic_run(**ddp, cell=cell, seed=0, secs=200.0, end=2.0))
    runs[-1]["bytes_per_rank_counted"] = 1e9
    runs.append(_synthetic_run(**ddp, cell="gpt-2h-nolimit", seed=0, secs=50.0, end=2.0))
    return runs


def test_ttq_protocol_ladder_targets_and_speedups(tmp_path: Path) -> None:
    """Analysis of the protocol on made-up runs with known answers: the target is the median of
    DDP's seeds (one seed far off does not move it), the rung is the first whose median time
    reaches it, speedup = DDP's time / time to target, the limit = DDP's time / DDP's time with
    no rate limit, and distributed Ranger's speedup over the best peer."""
    assert proto.rung_steps("gpt", 8) == [1024, 1280, 1536, 2048]
    assert all(s % 32 == 0 for s in proto.rung_steps("gpt", 32))
    cell, lr = "gpt-2h-100mbit", 1e-3
    runs = _ddp_runs(cell, lr, {0: 1.9, 1: 2.0, 2: 2.1, 3: 1.95, 4: 5.0})  # seed 4 ends far off
    name = "ranger_k8_bf16"
    lk = dict(entry=name, cell=cell, lr=lr, bytes_per_rank_counted=1e8, comm_time_s=1.0)
    for seed in (0, 1, 2):  # rung 1024 ends at 2.2 (not reached); 1280 reaches 2.0 at 50 s
        runs.append(_synthetic_run(**lk, seed=seed, steps=1024, secs=50.0, start=3.0, end=2.2))
        runs.append(_synthetic_run(**lk, seed=seed, steps=1280, secs=60.0, start=3.0, end=1.8))
    peer = dict(entry="post_local_sgd_k8", cell=cell, lr=lr, comm_time_s=1.0)
    for seed in (0, 1, 2):  # reaches 2.0 at B: between (50 s, 2.2) and (75 s, 1.8)
        runs.append(_synthetic_run(**peer, seed=seed, steps=1024, secs=100.0, start=3.0, end=1.4))
    analysed = {c["cell"]: c for c in proto.analyse({"runs": runs})}[cell]
    assert analysed["target_val_loss"] == pytest.approx(2.0)  # median of 1.9 1.95 2.0 2.1 5.0
    assert analysed["target_seeds"]["max"] == pytest.approx(5.0)
    assert analysed["limit"] == pytest.approx(4.0)
    rows = {r["entry"]: r for r in analysed["rows"]}
    row = rows[name]
    assert row["rung"] == 1280 and row["seeds_crossing"] == "3/3"
    assert row["time_to_target_s"] == pytest.approx(50.0)  # between (45 s, 2.1) and (60 s, 1.8)
    assert row["speedup"] == pytest.approx(200.0 / row["time_to_target_s"])
    assert row["fraction_of_limit"] == pytest.approx(row["speedup"] / 4.0)
    assert rows["post_local_sgd_k8"]["time_to_target_s"] == pytest.approx(62.5)
    assert row["speedup_over_best_peer"] == pytest.approx(62.5 / 50.0)
    assert row["bytes_fewer_than_ddp"] == pytest.approx(10.0)
    assert row["vs_ddp"] == pytest.approx(0.1) and row["within_ddp_spread"]  # 2.2 <= max 5.0
    payload = {"runs": runs}
    text = ttq_report.tables(payload)
    assert name in text and "1280" in text and "median final loss of 5 DDP AdamW seeds" in text
    ttq_report.plot(payload, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_ttq_bound_is_the_best_peer_over_the_time_with_no_rate_limit() -> None:
    """The ``bound`` stage's runs (no rate limit, the cell's hosts): their median time to target
    (a miss counts as never), and the best peer's time in the cell over it: the most a
    contender can gain on the link alone."""
    cell, lr = "gpt-2h-100mbit", 1e-3
    runs = _ddp_runs(cell, lr, {0: 2.0, 1: 2.0, 2: 2.0})
    name = "ranger_k4_int8_overlap1_eager"
    me = dict(entry=name, cell=cell, lr=lr, bytes_per_rank_counted=1e8, comm_time_s=1.0)
    peer = dict(entry="post_local_sgd_k8", cell=cell, lr=lr, comm_time_s=1.0)
    free = dict(entry=name, cell="gpt-2h-nolimit", lr=lr, steps=1280, start=3.0)
    for seed in (0, 1, 2):
        runs.append(_synthetic_run(**me, seed=seed, steps=1024, secs=60.0, start=3.0, end=1.5))
        runs.append(_synthetic_run(**peer, seed=seed, steps=1024, secs=90.0, start=3.0, end=1.5))
        # with no limit: 3 -> 1.5 in 30 s crosses 2.0 at 20 s (seed 2 never crosses)
        runs.append(_synthetic_run(**free, seed=seed, secs=30.0, end=1.5 if seed < 2 else 2.5))
    payload = {"runs": runs}
    cells = proto.analyse(payload)
    (b,) = [x for x in proto.bounds(payload, cells) if x["cell"] == cell]
    assert b["entry"] == name and b["steps"] == 1280 and b["seeds_crossing"] == "2/3"
    assert b["no_limit_time_to_target_s"] == pytest.approx(20.0)  # the median with a never
    assert b["best_peer"] == "post_local_sgd_k8"
    assert b["best_peer_time_to_target_s"] == pytest.approx(60.0)  # 2/3 of 90 s
    assert b["time_to_target_s"] == pytest.approx(40.0) and b["rung"] == 1024
    assert b["most_over_best_peer"] == pytest.approx(3.0)
    line = ttq_report.bounds_table({"bounds": [b]}).splitlines()[-1]
    assert (
        "| 20.0 (20.0-never) | 2/3 | 40.0 (at 1024 steps) | 60.0 (post_local_sgd_k8) | 3.00x |"
        in line
    )


def test_ttq_recheck_compares_only_with_the_run_it_repeated() -> None:
    """A recheck's "committed" time to target is that of the committed run with the same key
    and the same losses; once a code change replaced that run (other losses), it is "-", not
    the new run's time."""
    cell, lr = "gpt-2h-100mbit", 1e-3
    runs = _ddp_runs(cell, lr, {0: 2.0, 1: 2.0, 2: 2.0})
    kw = dict(entry="ranger_k8_bf16", cell=cell, lr=lr, seed=0, steps=1024, start=3.0)
    committed = _synthetic_run(**kw, secs=40.0, end=1.5)  # crosses 2.0 at 2/3 of 40 s
    rerun = _synthetic_run(**kw, secs=60.0, end=1.5)  # the same losses, a slower clock
    check = {"cell": cell, "date": "d", "rows": [{"run": rerun, "committed_train_time_s": 40.0,
                                                 "train_time_s": 60.0}]}  # fmt: skip
    line = ttq_report.recheck_table({"runs": [*runs, committed], "rechecks": [check]})
    assert "| 26.7 | 40.0 | 1.500 |" in line.splitlines()[-1]
    replaced = _synthetic_run(**kw, secs=40.0, end=1.6)  # the code changed: other losses
    line = ttq_report.recheck_table({"runs": [*runs, replaced], "rechecks": [check]})
    assert line.splitlines()[-1].endswith("| - | 40.0 | - |")


def test_ttq_protocol_time_is_the_median_of_seeds_a_miss_counts_as_never() -> None:
    """2 of 3 seeds must cross: at B one seed crosses (no time); at 1.25 B two cross and the
    third never does: the time is the slower of the two crossings (the median with never)."""
    cell, lr = "gpt-2h-100mbit", 1e-3
    runs = _ddp_runs(cell, lr, {0: 2.0, 1: 2.0, 2: 2.0})
    bf = dict(entry="ranger_k8_bf16", cell=cell, lr=lr)
    runs += [
        _synthetic_run(**bf, seed=0, steps=1024, secs=40.0, start=3.0, end=1.5),
        _synthetic_run(**bf, seed=1, steps=1024, secs=40.0, start=3.0, end=2.1),
        _synthetic_run(**bf, seed=2, steps=1024, secs=40.0, start=3.0, end=2.1),
    ]

    def row(extra: list[dict[str, object]]) -> dict[str, object]:
        analysed = {c["cell"]: c for c in proto.analyse({"runs": runs + extra})}[cell]
        return {r["entry"]: r for r in analysed["rows"]}["ranger_k8_bf16"]

    assert row([]).get("time_to_target_s") is None and "rung" not in row([])
    seed0 = _synthetic_run(**bf, seed=0, steps=1280, secs=50.0, start=3.0, end=1.5)
    seed1 = _synthetic_run(**bf, seed=1, steps=1280, secs=50.0, start=3.0, end=1.75)
    seed2 = _synthetic_run(**bf, seed=2, steps=1280, secs=50.0, start=3.0, end=2.2)
    assert "rung" not in row([seed0, seed2])  # one of three crosses at 1280 so far
    full = row([seed0, seed1, seed2])
    assert full["rung"] == 1280 and full["seeds_crossing"] == "2/3"
    # seed 0: 3 -> 1.5 in 50 s crosses 2.0 at 2/3 of it; seed 1: 3 -> 1.75 at 4/5 of it
    assert full["time_to_target_per_seed"] == pytest.approx({0: 50 * 2 / 3, 1: 40.0, 2: None})
    assert full["time_to_target_s"] == pytest.approx(40.0)
    assert full["time_to_target_min_s"] == pytest.approx(50 * 2 / 3)
    assert full["time_to_target_max_s"] is None  # a seed never crossed


def test_ttq_protocol_tuning_grid_goes_past_a_winning_edge() -> None:
    assert proto.next_lr({0.008: 1.7, 0.016: 1.65, 0.032: 1.6}) == pytest.approx(0.0453)
    assert proto.next_lr({0.008: 1.5, 0.016: 1.65, 0.032: 1.6}) == pytest.approx(0.00566)
    assert proto.next_lr({0.008: 1.7, 0.016: 1.5, 0.032: 1.6}) is None
    assert proto.next_lr({}) is None and proto.next_lr({0.01: 1.0}) is None


def test_ttq_protocol_tunes_what_a_cell_needs_and_every_lr_has_a_source() -> None:
    """``tune --cells`` (``make bench-ttq``): every contender of the cells, or the entry whose
    lr it takes; never the entries that take a borrowed lr, each source tuned once."""
    every = [c.key for c in proto.CELLS]
    need = proto.tuning_entries(every)
    for spec in proto.CELLS:
        for name in spec.entries:
            assert proto.TUNED_AS.get(name, name) in need[spec.workload], (spec.key, name)
    for names in need.values():
        assert len(names) == len(set(names)) and not set(names) & set(proto.TUNED_AS)
    assert proto.tuning_entries(["gpt-2h-100mbit"])["gpt"][0] == "ddp_adamw"


def test_ttq_protocol_skips_only_rungs_another_cell_shows_cannot_cross() -> None:
    """A rung whose link-independent curves miss the target for 2 of 3 seeds at the same hosts
    in another cell is not rerun; the B rung always is; other hosts or a crossing never count."""
    spec = next(c for c in proto.CELLS if c.key == "gpt-2h-20mbit")

    def run(cell: str, seed: int, steps: int, loss: float) -> dict[str, Any]:
        return {
            "stage": "run", "cell": cell, "entry": "diloco_k32", "lr": 0.001, "seed": seed,
            "steps_budget": steps, "ok": True, "curve": [[steps, 10.0, loss]],
        }  # fmt: skip

    target = 1.6
    misses = [run("gpt-2h-100mbit", s, 1280, 1.7) for s in (0, 1)]  # cut short after 2 misses
    crosses = [run("gpt-2h-100mbit", s, 2048, loss) for s, loss in ((0, 1.5), (1, 1.7), (2, 1.5))]
    four_hosts = [run("gpt-4h-100mbit", s, 1536, 1.7) for s in (0, 1, 2)]
    payload = {"runs": misses + crosses + four_hosts}
    assert proto.known_miss(payload, spec, "diloco_k32", 0.001, 1280, target) == "gpt-2h-100mbit"
    assert proto.known_miss(payload, spec, "diloco_k32", 0.001, 2048, target) is None
    assert proto.known_miss(payload, spec, "diloco_k32", 0.001, 1536, target) is None
    assert proto.known_miss(payload, spec, "diloco_k32", 0.002, 1280, target) is None  # other lr
    one_miss = {"runs": [run("gpt-2h-100mbit", 0, 1280, 1.7), run("gpt-2h-100mbit", 1, 1280, 1.5)]}
    assert proto.known_miss(one_miss, spec, "diloco_k32", 0.001, 1280, target) is None


def test_ttq_runs_sent_the_bytes_counted() -> None:
    """Every committed run on a rate-limited netsim link: what each host's interface sent
    (``wire_tx_bytes_per_host``) is the counted ``comm/bytes`` in 1514-byte frames of 1448
    payload bytes, within 5% (the first broadcast, rendezvous and ACKs are not counted)."""
    from rangerdl.distributed.cost import TBF_EFFICIENCY

    data = json.loads((BENCH / "results" / "ttq_protocol.json").read_text())
    checked = 0
    for r in data["runs"]:
        wire, counted = r.get("wire_tx_bytes_per_host"), r.get("bytes_per_rank_counted")
        limited = not r["cell"].endswith("-nolimit")
        if r["stage"] == "run" and r.get("ok") and wire and counted and limited:
            ratio = wire * TBF_EFFICIENCY / counted
            assert abs(ratio - 1) <= 0.05, (r["cell"], r["entry"], r["seed"], ratio)
            checked += 1
    assert checked >= 50


def test_faults_counts_only_steps_that_reached_a_committed_sync() -> None:
    faults = importlib.import_module("faults")

    def rows(syncs: list[int], healed_at: int | None = None) -> list[dict[str, Any]]:
        return [
            {"comm/syncs": s, "comm/healed": int(healed_at is not None and i >= healed_at)}
            for i, s in enumerate(syncs)
        ]

    # killed after 6 steps, its last committed sync at step 4: 4 count
    assert faults.committed_steps(rows([0, 0, 0, 1, 1, 1]), finished=False) == 4
    # killed before its first sync: nothing counts
    assert faults.committed_steps(rows([0, 0, 0]), finished=False) == 0
    # restarted: 3 steps of its own, healed at its first sync (row 3), then 5 more and done
    assert faults.committed_steps(rows([0, 0, 0, 1, 1, 1, 1, 2, 2], healed_at=3), True) == 5
    # overlapped: the sync launched at step 3 is merged (counted) at step 4, the 4th step in
    # the next sync: 3 count
    assert faults.committed_steps(rows([0, 0, 0, 1, 1, 1]), finished=False, lag=1) == 3
    assert faults.committed_steps(rows([0, 0, 0]), finished=False, lag=1) == 0
    times = [{"time/train_s": t} for t in (0.0, 0.1, 0.2, 2.7, 2.8)]
    assert faults.max_gap(times) == pytest.approx(2.5)
    # goodput: 3 groups at 0.1 s a step for (110 - 10) s of wall train 3000 steps; the fixed
    # costs (10 s) and the step time are the clean runs' means
    faulted = {"committed_steps": 2400, "wall_s": 110.0}
    before = {"step_s": 0.08, "steps": 100, "wall_s": 16.0}  # 8 s of steps, 8 s fixed
    after = {"step_s": 0.12, "steps": 100, "wall_s": 24.0}  # 12 s of steps, 12 s fixed
    assert faults.goodput(faulted, [before, after], 3) == pytest.approx(2400 / 3000)
    assert faults.goodput(faulted, [before], 3) == pytest.approx(2400 / (3 / 0.08 * 102))
    assert faults.goodput(faulted, [{"step_s": None}], 3) is None
    # a path run on its own joins the cell of the other path at the same settings, each
    # faulted run keeping its own date; other settings make a cell of their own
    ft = {"link": "100mbit", "kill_every_s": 60.0, "cpu_per_host": 0.5, "date": "d1"}
    ft |= {"ft_faults": {"goodput": 0.9}, "heartbeat_timeout_ms": 1000}
    other = {**ft, "heartbeat_timeout_ms": 2000, "date": "d0"}
    tr = {**ft, "date": "d2", "torchrun_faults": {"goodput": 0.7, "date": "d2"}}
    del tr["ft_faults"]
    overlapped = {**ft, "overlap": True, "date": "d3"}
    merged = faults.merge_cell([other, ft, overlapped], tr)
    assert merged[:2] == [other, overlapped] and len(merged) == 3
    merged = [merged[0], merged[2]]
    both = merged[1]
    assert both["ft_faults"]["goodput"] == 0.9 and both["torchrun_faults"]["goodput"] == 0.7
    assert both["ft_faults"]["date"] == "d1" and both["date"] == "d2"


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.distributed
def test_faults_quick_mode_kills_heals_and_writes_the_promised_fields(tmp_path: Path) -> None:
    pytest.importorskip("torchft")
    out = tmp_path / "faults.json"
    _run([str(BENCH / "faults.py"), "--quick", f"--out={out}"], timeout_s=400)
    cell = json.loads(out.read_text())["cells"][0]
    ft, tr = cell["ft_faults"], cell["torchrun_faults"]
    said = json.dumps(cell, indent=1)[-4000:]
    assert cell["ft_clean"]["finished"] and ft["finished"] and tr["finished"], said
    assert ft["kills"] == 2 and tr["kills"] == 2, said
    # every restarted group healed from a live peer (or was killed again before it could)
    assert ft["healed"] >= 1 and any(t is not None and t < 15 for t in ft["heal_s"]), said
    assert ft["stalls_over_quorum_timeout"] == 0 and ft["equal"], said
    assert 0 < ft["committed_steps"] <= ft["steps"] * 2, said
    # torchrun restarted from a checkpoint (a kill during a restart's start-up resumes once for
    # both) and every worker reached the end
    assert tr["restarts_seen"] >= 1 and tr["committed_steps"] == tr["steps"] * 2, said
    assert ft["goodput"] > 0 and tr["goodput"] > 0, said
    # the clean run again after the faulted one: goodput against their mean, and each
    assert cell["ft_clean_after"]["finished"] and cell["heartbeat_timeout_ms"] == 1000, said
    assert ft["goodput_vs_before"] > 0 and ft["goodput_vs_after"] > 0, said


def test_cpp_workload_reads_torchs_headers_not_the_stdlib(tmp_path: Path) -> None:
    runner = importlib.import_module("ttq.runner")
    from rangerdl.data import open_splits

    runner.prepare_data(tmp_path, True, {"cpp"})
    (folder,) = (tmp_path / "cache").iterdir()
    splits = open_splits(folder)
    assert list(splits) == ["train", "val", "test"]
    assert "torch/include/**/*.h" in splits["train"].metadata["source"]
    assert sum(ds.nbytes for ds in splits.values()) > 10 << 20
    row = splits["val"].__getitems__(list(range(256)))
    text = b"".join(bytes(item["x"].to(torch.uint8).tolist()) for item in row)
    assert b"#include" in text or b"namespace" in text
    spec = next(s for s in proto.CELLS if s.workload == "cpp")
    assert "cpp" in proto.tuning_entries([spec.key])
    assert runner.periodic_batches("cpp") == runner.periodic_batches("gpt")
