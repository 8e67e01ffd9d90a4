"""``rangerdl train / eval / plot`` end to end, in-process, with tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rangerdl.cli import main
from rangerdl.train.metrics import read_metrics


def run_dir(tiny: list[str]) -> Path:
    return Path(tiny[0].split("=", 1)[1]) / "t"


def final_state(run: Path) -> dict[str, torch.Tensor]:
    step = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    state = torch.load(run / "checkpoints" / f"step-{step}" / "state-rank0.pt", weights_only=True)
    return state["model"]  # type: ignore[no-any-return]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run) if "train/loss" in r]


def test_train_writes_the_run_folder(tiny: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["train", *tiny, "--log.tensorboard=true", "--train.steps=60", "--train.eval_every=20"]
        )
        == 0
    )
    run = run_dir(tiny)
    out = capsys.readouterr().out
    assert "test/accuracy" in out and str(run) in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 60 and summary["test/accuracy"] > 0.6
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 60 and config["model"]["args"] == {"hidden": 32}
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 61))
    assert {"optim/lr", "perf/samples_per_s", "time/train_s"} <= set(rows[0])
    assert [r["step"] for r in rows if "val/loss" in r] == [
        20,
        40,
        60,
    ]  # periodic, then the final pass
    assert any("test/accuracy" in r for r in rows)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    kept = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert kept == [20, 30, 40, 50, 60]  # every 10 steps, the last 5 kept


@pytest.mark.parametrize("cut", [7, 44], ids=["mid-epoch", "epoch-end"])
def test_resume_is_bitwise_identical(tiny: list[str], tmp_path: Path, cut: int) -> None:
    # 1438 training digits / 32: 44 full batches per epoch, so step 44 ends epoch 0.
    common = [
        *tiny[1:],
        "--train.steps=60",
        "--train.checkpoint_every=0",
    ]
    straight = tmp_path / "straight"
    assert main(["train", f"--run.dir={straight}", *common]) == 0
    cut_dir = tmp_path / "cut"
    assert main(["train", f"--run.dir={cut_dir}", *common, f"--train.stop_at={cut}"]) == 0
    assert not (cut_dir / "t" / "summary.json").exists()
    assert main(["train", "--resume", str(cut_dir / "t")]) == 0
    assert losses(cut_dir / "t") == losses(straight / "t")
    a, b = final_state(straight / "t"), final_state(cut_dir / "t")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_config_and_seed_give_identical_runs(tiny: list[str], tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["train", *tiny, f"--run.name={name}", "--train.steps=12"]) == 0
    base = run_dir(tiny).parent
    assert losses(base / "a") == losses(base / "b")
    other = [*tiny, "--run.name=c", "--train.steps=12", "--run.seed=1"]
    assert main(["train", *other]) == 0
    assert losses(base / "c") != losses(base / "a")


def test_data_seed_sets_the_data_order_alone(tiny: list[str]) -> None:
    base = run_dir(tiny).parent
    runs = {"s0": [], "s1": ["--run.seed=1"], "s1d1": ["--run.seed=1", "--run.data_seed=1"]}
    runs |= {"s0d1": ["--run.data_seed=1"], "s1d0": ["--run.seed=1", "--run.data_seed=0"]}
    for name, args in runs.items():
        assert main(["train", *tiny, f"--run.name={name}", "--train.steps=6", *args]) == 0
    got = {name: losses(base / name) for name in runs}
    assert got["s1d1"] == got["s1"]  # data_seed = -1 is seed
    assert len({tuple(v) for v in got.values()}) == 4  # init and order each change the run
    # the same data order with other weights: one init, two orders -- the batches are the same
    orders = {}
    for name in ("s0", "s1d0", "s1", "s0d1"):
        config = json.loads((base / name / "config.json").read_text())
        orders[name] = config["run"]["data_seed"], config["run"]["seed"]
    assert orders == {"s0": (-1, 0), "s1d0": (0, 1), "s1": (-1, 1), "s0d1": (1, 0)}


def test_eval_and_plot(tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *tiny]) == 0
    run = run_dir(tiny)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    accuracy = float(
        next(line for line in out.splitlines() if line.startswith("test/accuracy")).split()[-1]
    )
    assert accuracy == pytest.approx(summary["test/accuracy"], abs=1e-6)
    assert main(["eval", str(run / "checkpoints" / "step-10")]) == 0
    assert main(["train", *tiny, "--run.name=other", "--optim.name=adamw", "--optim.lr=1e-3"]) == 0
    png = tmp_path / "cmp.png"
    assert main(["plot", str(run), str(run.parent / "other"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_saved_model_is_the_lookahead_slow_weights(tiny: list[str]) -> None:
    # stop at step 8: Ranger (k=6) synced at step 6, so the fast weights have moved past phi.
    # (The MLP has no BatchNorm: the model's state is exactly its parameters.)
    assert main(["train", *tiny, "--train.stop_at=8", "--train.checkpoint_every=0"]) == 0
    folder = run_dir(tiny) / "checkpoints" / "step-8"
    model = torch.load(folder / "model.pt", weights_only=True)
    state = torch.load(folder / "state-rank0.pt", weights_only=True)
    slow = [s["slow_buffer"] for _, s in sorted(state["optimizer"]["state"].items())]
    weights = [
        v for k, v in state["model"].items() if "running" not in k and "num_batches" not in k
    ]
    assert len(slow) == len(weights)
    saved = [v for k, v in model.items() if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(a, b) for a, b in zip(saved, slow, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights, slow, strict=True))


def test_damaged_checkpoint_is_skipped_for_the_previous_one(
    tiny: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["train", *tiny, "--train.stop_at=20"]) == 0
    run = run_dir(tiny)
    state = run / "checkpoints" / "step-20" / "state-rank0.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert main(["train", "--resume", str(run)]) == 0
    assert "skipping checkpoint" in caplog.text and "checksum" in caplog.text
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == list(range(1, 31))


def test_all_checkpoints_damaged_is_a_clear_error(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    (run_dir(tiny) / "checkpoints" / "step-10" / "MANIFEST.json").unlink()
    assert main(["train", "--resume", str(run_dir(tiny))]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step(tiny: list[str], caplog: pytest.LogCaptureFixture) -> None:
    args = [*tiny, "--model.name=user_models:nan_after", "--model.args.after=13"]
    assert main(["train", *args]) == 1
    assert "step 13: the loss is nan" in caplog.text
    ckpts = sorted(p.name for p in (run_dir(tiny) / "checkpoints").iterdir())
    assert ckpts == ["step-10"]  # written before the NaN; nothing after it


def test_nan_loss_can_be_skipped(tiny: list[str], caplog: pytest.LogCaptureFixture) -> None:
    args = [
        *tiny,
        "--model.name=user_models:nan_after",
        "--model.args.after=25",
        "--train.on_nan=skip",
    ]
    assert main(["train", *args]) == 0
    assert caplog.text.count("skipping the update") == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optim.nme=adamw"], "unknown key 'nme' in [optim]; valid keys: name, lr"),
        (["--optimizer.name=adamw"], "unknown table [optimizer]; valid tables: run, data"),
        (["--train.steps=ten"], "[train] steps = 'ten': expected int"),
        (["--optim.name=adam"], "[optim] name = 'adam': expected one of ranger, adamw"),
        (["--data.path=/nonexistent/data"], "/nonexistent/data"),
        (["--model.args.width=3"], "unknown argument(s) width for model 'mlp'"),
    ],
)
def test_config_errors_name_the_key(
    tiny: list[str], args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, *args]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert not (run_dir(tiny) / "checkpoints").exists()


def test_toml_config_with_command_line_precedence(tiny: list[str], tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[optim]\nname = "sgd"\nlr = 0.05\n[train]\nsteps = 4\n')
    assert main(["train", str(config), *tiny[:2], "--train.steps=6", "--log.progress=false"]) == 0
    saved = json.loads((run_dir(tiny) / "config.json").read_text())
    assert (
        saved["optim"]["name"] == "sgd"
        and saved["optim"]["lr"] == 0.05
        and saved["train"]["steps"] == 6
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 4\nbogus = 1\n")
    assert main(["train", str(bad), *tiny[:2]]) == 1


def test_existing_run_folder_is_not_overwritten(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, "--train.steps=2"]) == 0
    assert main(["train", *tiny, "--train.steps=2"]) == 1
    assert "--resume" in capsys.readouterr().err


def test_examples_parse_and_digits_cnn_is_the_default() -> None:
    from rangerdl.train.config import Config, load_config

    examples = Path(__file__).resolve().parents[2] / "examples"
    sweeps = {p for p in examples.glob("*.toml") if "[sweep]" in p.read_text()}
    from rangerdl.workflow.sweep import load_sweep

    assert sweeps and all(load_sweep(p).n_trials > 0 for p in sweeps)
    configs = {p.stem: load_config(p) for p in sorted(set(examples.glob("*.toml")) - sweeps)}
    assert set(configs) >= {"digits_cnn", "charlm", "tabular_mlp"}
    assert configs["digits_cnn"].to_dict() == Config().to_dict()
    assert configs["charlm"].model.name == "gpt" and configs["charlm"].data.source == "text"


def test_tabular_arrays_classification_and_regression(
    tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    w = rng.normal(size=5).astype(np.float32)
    csv = tmp_path / "table.csv"
    rows = [",".join([*(f"{v:.5f}" for v in r), "yes" if r @ w > 0 else "no"]) for r in x]
    csv.write_text("a,b,c,d,e,label\n" + "\n".join(rows) + "\n")

    def prepare_arrays(*args: str) -> int:
        return main(["data", "prepare", "arrays", *args])

    assert (
        prepare_arrays("--x", str(csv), "--label-column", "label", "--out", str(tmp_path / "cls"))
        == 0
    )
    args = [*tiny, "--train.steps=60", "--model.args.hidden=16"]
    assert main(["train", *args, f"--data.path={tmp_path / 'cls'}", "--run.name=cls"]) == 0
    summary = json.loads((run_dir(tiny).parent / "cls" / "summary.json").read_text())
    assert summary["test/accuracy"] > 0.8

    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x @ w).astype(np.float32))
    xy = ["--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy")]
    assert prepare_arrays(*xy, "--out", str(tmp_path / "reg")) == 0
    assert (
        main(
            [
                "train",
                *args,
                f"--data.path={tmp_path / 'reg'}",
                "--run.name=reg",
                "--train.steps=150",
            ]
        )
        == 0
    )
    summary = json.loads((run_dir(tiny).parent / "reg" / "summary.json").read_text())
    assert summary["test/rmse"] < 0.5 * float(np.std(x @ w))


def test_wine_with_default_standardisation_trains_like_the_tabular_example(
    tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Raw wine features (magnitudes 0.1 to 1,680) gave test accuracy 0.64.
    import numpy as np
    from sklearn.datasets import load_wine

    wine = load_wine()
    np.save(tmp_path / "x.npy", wine.data)
    np.save(tmp_path / "y.npy", wine.target)
    out = tmp_path / "wine"
    xy = ["--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy")]
    assert main(["data", "prepare", "arrays", *xy, "--out", str(out)]) == 0
    example = Path(__file__).resolve().parents[2] / "examples" / "tabular_mlp.toml"
    # the example's model, optimizer and steps; only the folders and logging from `tiny`
    keep = ("--run.dir=", "--log.")
    args = [*(a for a in tiny if a.startswith(keep)), "--train.threads=1"]
    assert main(["train", str(example), *args, f"--data.path={out}", "--run.name=wine"]) == 0
    run = run_dir(tiny).parent / "wine"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 1000 and summary["test/accuracy"] >= 0.95
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out_text = capsys.readouterr().out
    line = next(s for s in out_text.splitlines() if s.startswith("test/accuracy"))
    assert float(line.split()[-1]) == pytest.approx(summary["test/accuracy"], abs=1e-6)


@pytest.mark.parametrize("final_batches", [0, 2])
def test_final_eval_batches_scores_the_periodic_windows(
    tiny: list[str], tmp_path: Path, final_batches: int
) -> None:
    """``final_eval_batches = eval_batches``: the final val/ point scores the same windows as the
    periodic ones (one metric along the curve); 0 keeps the whole split. lr = 0: the weights do
    not move, so equal windows give equal losses."""
    args = ["train", *tiny, "--optim.lr=0", "--train.steps=20", "--train.eval_every=10"]
    args.append("--data.eval_batch_size=16")  # 2 batches: 32 of the split's ~180 windows
    assert main([*args, f"--train.final_eval_batches={final_batches}"]) == 0
    rows = [r for r in read_metrics(run_dir(tiny)) if "val/loss" in r]
    assert [r["step"] for r in rows] == [10, 20]
    periodic, final = rows[0]["val/loss"], rows[1]["val/loss"]
    summary = json.loads((run_dir(tiny) / "summary.json").read_text())
    assert summary["val/loss"] == final and "test/loss" in summary
    if final_batches:
        assert final == periodic
    else:  # the whole split: other windows, another mean
        assert abs(final - periodic) > 1e-6
