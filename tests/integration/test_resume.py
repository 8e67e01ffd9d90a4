"""What a resume may change: allowed overrides apply and are recorded,
the rest are refused naming the key; extending a run's steps is deliberate about its schedule."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from rangerdl.cli import main
from rangerdl.train.metrics import read_metrics


def run_dir(tiny: list[str]) -> Path:
    return Path(tiny[0].split("=", 1)[1]) / "t"


def lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["optim/lr"] for r in read_metrics(run) if "optim/lr" in r}


def test_resume_applies_and_records_allowed_overrides(tiny: list[str]) -> None:
    assert main(["train", *tiny, "--train.steps=20", "--schedule.name=constant"]) == 0
    run = run_dir(tiny)
    resume = ["train", "--resume", str(run), "--train.steps=40", "--optim.lr=1e-5"]
    assert main(resume) == 0
    assert all(lr == pytest.approx(1e-5) for step, lr in lrs(run).items() if step > 20)
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 40
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 20
    assert history[-1]["changed"]["optim.lr"] == [0.1, 1e-5]
    assert history[-1]["changed"]["train.steps"] == [20, 40]


@pytest.mark.parametrize(
    "override",
    ["--optim.name=adamw", "--model.args.hidden=64", "--run.seed=3", "--data.batch_size=16"],
)
def test_resume_refuses_changes_the_checkpoint_cannot_follow(
    tiny: list[str], capsys: pytest.CaptureFixture[str], override: str
) -> None:
    assert main(["train", *tiny, "--train.steps=10"]) == 0
    run = run_dir(tiny)
    before = (run / "config.json").read_text()
    assert main(["train", "--resume", str(run), "--train.steps=12", override]) == 1
    key = (
        override[2:].split("=")[0].rsplit(".", 1)[0]
        if ".args." in override
        else override[2:].split("=")[0]
    )
    assert key in capsys.readouterr().err
    assert (run / "config.json").read_text() == before


def test_extending_a_finished_annealed_run_says_how(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny]) == 0  # flat_anneal to 0 at step 30
    run = run_dir(tiny)
    assert main(["train", "--resume", str(run), "--train.steps=60"]) == 1
    assert "--schedule.name=constant" in capsys.readouterr().err
    fine_tune = ["--schedule.name=constant", "--optim.lr=0.01"]
    assert main(["train", "--resume", str(run), "--train.steps=40", *fine_tune]) == 0
    assert all(lr == pytest.approx(0.01) for step, lr in lrs(run).items() if step > 30)


def test_extending_during_the_flat_part_uses_the_new_length(tiny: list[str]) -> None:
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    run = run_dir(tiny)
    assert main(["train", "--resume", str(run), "--train.steps=60"]) == 0
    lr = lrs(run)
    assert all(lr[s] == pytest.approx(0.1) for s in range(1, 44))  # flat to 0.72 * 60
    assert lr[60] < 0.01


def test_extending_during_the_anneal_continues_from_the_current_lr(tiny: list[str]) -> None:
    assert main(["train", *tiny, "--train.stop_at=25"]) == 0  # annealing since step 22
    run = run_dir(tiny)
    assert main(["train", "--resume", str(run), "--train.steps=60"]) == 0
    lr = lrs(run)
    after = [lr[s] for s in range(26, 61)]
    assert after[0] == pytest.approx(lr[25], rel=0.01)  # no jump back to the peak
    assert all(a >= b for a, b in itertools.pairwise(after)) and after[-1] < 1e-3


def test_resuming_to_fewer_steps_than_done_says_so(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny]) == 0
    assert main(["train", "--resume", str(run_dir(tiny)), "--train.steps=20"]) == 1
    assert "already at step 30" in capsys.readouterr().err


def test_a_run_saved_before_eager_existed_resumes_without_it(tmp_path: Path) -> None:
    # [distributed] eager defaults to true; a run folder whose config.json predates the key
    # merged its overlapped syncs without it, and resuming must go on the same way
    from rangerdl.train.config import load_config

    saved = load_config(None).to_dict()
    saved["distributed"] |= {"overlap": True}
    del saved["distributed"]["eager"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    assert load_config(path, run_folder=True).distributed.eager is False
    assert load_config(None).distributed.eager is True
    saved["distributed"]["eager"] = True
    path.write_text(json.dumps(saved))
    assert load_config(path, run_folder=True).distributed.eager is True
