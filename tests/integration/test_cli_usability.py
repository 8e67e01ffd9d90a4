"""The CLI as a newcomer meets it: errors before torch loads, the user's model files, progress
and metrics on the console."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rangerdl.cli import main
from rangerdl.train import evaluate as evaluate_module

CHECK_THEN_REPORT_TORCH = textwrap.dedent(
    """
    import sys
    from rangerdl.cli import main
    rc = main(sys.argv[1:])
    print("torch imported:", "torch" in sys.modules)
    sys.exit(rc)
    """
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--optim.name=bogus"], "[optim] name = 'bogus': expected one of ranger"),
        (["train", "--schedule.name=bogus"], "[schedule] name = 'bogus': expected one of"),
        (["train", "--train.on_nan=bogus"], "[train] on_nan = 'bogus'"),
        (["train", "--distributed.backend=mpi"], "[distributed] backend = 'mpi'"),
        (["train", "--distributed.strategy=x"], "[distributed] strategy = 'x'"),
        (["train", "--data.source=x"], "[data] source = 'x'"),
        (["train", "--train.steps=0"], "[train] steps must be >= 1"),
        (["eval", "no/such/run"], "no/such/run does not exist"),
    ],
)
def test_config_errors_come_before_torch_is_imported(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK_THEN_REPORT_TORCH, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert "torch imported: False" in done.stdout


def test_optim_package_keeps_its_names_when_loaded_lazily() -> None:
    import importlib

    ranger_module = importlib.import_module("rangerdl.optim.ranger")
    from rangerdl.optim import Ranger, ranger, use_slow_weights

    assert callable(ranger) and ranger is ranger_module.ranger
    assert Ranger is ranger_module.Ranger and callable(use_slow_weights)


USER_MODEL = textwrap.dedent(
    """
    import math

    import torch

    def tiny(input_shape, num_classes):
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), num_classes)
        )
    """
)


def _console_env(data_cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    return env | {"RANGERDL_CACHE": str(data_cache)}


def test_console_script_imports_a_model_file_from_the_working_directory(
    tmp_path: Path, data_cache: Path
) -> None:
    (tmp_path / "mymodels.py").write_text(USER_MODEL)
    script = Path(sys.executable).with_name("rangerdl")
    done = subprocess.run(
        [
            str(script),
            "train",
            "--model.name=mymodels:tiny",
            "--train.steps=3",
            "--train.eval_every=0",
            "--train.eval_batches=1",
            "--log.tensorboard=false",
            "--log.progress=false",
            "--run.dir=runs",
            "--run.name=t",
        ],
        cwd=tmp_path,
        env=_console_env(data_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "t" / "summary.json").is_file()


def test_a_missing_model_module_says_where_it_looked(
    tmp_path: Path,
    data_cache: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANGERDL_CACHE", str(data_cache))
    rc = main(
        [
            "train",
            "--model.name=nosuchmodels:tiny",
            f"--run.dir={tmp_path / 'runs'}",
            "--log.tensorboard=false",
            "--log.progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot import 'nosuchmodels'" in err
    assert f"{tmp_path}" in err and "sys.path" in err


def test_eval_reports_progress(
    tiny: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["train", *tiny, "--train.steps=4", "--train.eval_every=0"]) == 0
    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY_S", 0.0)
    run = Path(tiny[0].split("=", 1)[1]) / "t"
    with caplog.at_level(logging.INFO, logger="rangerdl.train.evaluate"):
        assert main(["eval", str(run)]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "rangerdl.train.evaluate"]
    assert any("samples" in line for line in lines)
    assert "eval test: batch 1/2" in " ".join(lines) and "batch 2/2" in lines[-1]
    assert "s left)" in lines[-1]


def test_an_uncapped_final_evaluation_says_how_to_cap_it(
    tiny: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="rangerdl.train.loop"):
        assert main(["train", *tiny, "--train.steps=2", "--train.eval_every=0"]) == 0
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "rangerdl.train.loop")
    assert "the whole splits (cap them with --train.final_eval_batches=N)" in text


def test_training_console_shows_params_validation_and_smoothed_speed(
    tiny: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="rangerdl.train.metrics"):
        assert main(["train", *tiny, "--train.steps=20", "--train.eval_every=10"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "rangerdl.train.metrics"]
    assert any(line.startswith("model: ") and " parameters (" in line for line in lines)
    assert any(
        line.startswith("step 10/20  val/loss ") and "val/accuracy" in line for line in lines
    )
    assert any(line.startswith("step 20/20  val/loss ") and " test/loss " in line for line in lines)
    assert any("samples/s" in line for line in lines)


def test_an_override_with_a_space_says_to_use_equals(capsys: pytest.CaptureFixture[str]) -> None:
    from rangerdl.cli import main

    assert main(["train", "--train.steps", "5"]) == 1
    assert "--train.steps=5" in capsys.readouterr().err
