"""torchft's DiLoCo as a benchmark contender (benchmarks/peers): two replica groups on loopback
with the Lighthouse, the run folder the time-to-quality runner reads, its byte count, and what
the peer refuses."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchft", reason="make setup installs torchft (benchmarks/peers)")

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.append(str(BENCH))  # after everything else: shadows nothing
launch = importlib.import_module("peers.launch")
torchft_train = importlib.import_module("peers.torchft_train")
runner = importlib.import_module("ttq.runner")
proto = importlib.import_module("ttq.protocol")

CONFIG = BENCH / "configs" / "ttq_gpt.toml"
C, T, V = 32, 32, 256  # n_embd, seq_len, byte vocabulary
TINY = [
    "--model.args.n_layer=1",
    f"--model.args.n_embd={C}",
    f"--data.seq_len={T}",
    "--train.eval_batches=1",
    "--train.final_eval_batches=1",
    "--train.threads=1",
    "--optim.name=adamw",
    "--optim.lr=2e-3",
]


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rangerdl.data import prepare

    cache = tmp_path_factory.mktemp("cache")
    prepare("text", cache / f"text-L{T}", seq_len=T)
    return cache


def _gpt_params() -> int:
    """The tiny GPT's parameters by hand: embeddings (the head is tied to wte), one block
    (2 LayerNorms, qkv, projection, MLP 4x), the final LayerNorm."""
    block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + block + 2 * C


@pytest.mark.slow
@pytest.mark.distributed
def test_outer_lr_one_keeps_groups_equal_and_counts_ring_bytes(
    tmp_path: Path, text_cache: Path
) -> None:
    steps, every = 16, 8
    args = [
        str(CONFIG),
        *TINY,
        f"--train.steps={steps}",
        f"--train.eval_every={every}",
        f"--diloco.sync_every={every}",
        "--diloco.outer_lr=1.0",
        "--diloco.outer_momentum=0.0",
        "--diloco.nesterov=false",
        "--run.name=d",
        f"--run.dir={tmp_path / 'runs'}",
    ]
    env = {"RANGERDL_CACHE": str(text_cache), "OMP_NUM_THREADS": "1"}
    results = launch.run_loopback(args, 2, env=env, log_dir=tmp_path / "logs", timeout_s=120)
    for r in results:
        assert r.ok, f"group {r.host} rc {r.returncode} killed {r.killed}:\n{r.stderr[-3000:]}"
    digests = [
        json.loads(line)["weights_sha256"]
        for r in results
        for line in r.stdout.splitlines()
        if line.startswith('{"replica_group"')
    ]
    assert len(digests) == 2 and digests[0] == digests[1]  # bitwise equal after the last sync

    run = runner.read_run(tmp_path / "runs" / "d")
    assert [point[0] for point in run["curve"]] == [every, steps]
    assert all(point[2] > 0 for point in run["curve"])
    assert run["steps"] == steps and run["syncs"] == steps // every
    # ring all-reduce of fp32 pseudo-gradients: 2 (W-1)/W x 4 bytes x parameters, per sync
    assert run["bytes_per_rank_counted"] == 2 * (2 - 1) / 2 * 4 * _gpt_params() * (steps // every)
    assert 0 < run["comm_time_s"] < run["train_time_s"]


def _refusal(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = torchft_train.main([str(CONFIG), *TINY, "--train.threads=0", *args])
    assert rc == 2
    return capsys.readouterr().err


def test_refuses_evaluations_between_syncs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REPLICA_GROUP_ID", "0")
    monkeypatch.setenv("NUM_REPLICA_GROUPS", "2")
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:1")  # never reached
    err = _refusal(["--train.steps=16", "--train.eval_every=4", "--diloco.sync_every=8"], capsys)
    assert "eval_every = 4 is not a multiple of --diloco.sync_every=8" in err


def test_refuses_more_fragments_than_layers(
    text_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANGERDL_CACHE", str(text_cache))
    monkeypatch.setenv("REPLICA_GROUP_ID", "0")
    monkeypatch.setenv("NUM_REPLICA_GROUPS", "2")
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:1")  # never reached
    args = ["--train.steps=16", "--train.eval_every=8", "--diloco.sync_every=8"]
    err = _refusal([*args, "--diloco.fragments=8"], capsys)
    # one block: the embeddings, the block and the final LayerNorm (the head is tied to wte)
    assert "--diloco.fragments=8: the model has 4 layers to split (wte, wpe, blocks.0, ln_f)" in err


def test_refuses_unknown_options_and_other_optimizers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REPLICA_GROUP_ID", "0")
    monkeypatch.setenv("NUM_REPLICA_GROUPS", "2")
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:1")
    assert "--diloco.sync_evry: unknown" in _refusal(["--diloco.sync_evry=8"], capsys)
    err = _refusal(["--optim.name=ranger", "--train.steps=16", "--train.eval_every=8"], capsys)
    assert "the inner optimizer here is torch AdamW" in err


def test_protocol_entries_reach_the_peer() -> None:
    from rangerdl.train.config import load_config

    peers = [e.contender for e in proto.ENTRIES.values() if e.contender.program == "torchft"]
    assert {c.name for c in peers} >= {"diloco_k8", "diloco_k8_outer1", "streaming_diloco_k32_f4"}
    for c in peers:
        mine, rest = torchft_train.split_arguments(c.overrides(1e-3))
        opts = torchft_train.parse_diloco(mine)
        cfg = load_config(CONFIG, [*rest, f"--train.steps={proto.B['gpt']}"])
        torchft_train.check_config(cfg, opts, 2)
        assert (opts.sync_every, cfg.optim.name, cfg.optim.lr) == (c.sync_every, "adamw", 1e-3)
    outer1 = torchft_train.parse_diloco(
        torchft_train.split_arguments(proto.ENTRIES["diloco_k8_outer1"].contender.overrides(1))[0]
    )
    assert (outer1.outer_lr, outer1.outer_momentum, outer1.nesterov) == (1.0, 0.0, False)
