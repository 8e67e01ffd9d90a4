"""``rangerdl sweep``: trials are real `rangerdl train` subprocesses on digits (a few steps each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

SWEEP = """
[sweep]
metric = "val/loss"
direction = "minimize"
n_trials = {n_trials}
pruner = "{pruner}"
pruner_startup_trials = 2
sampler = "random"
enqueue = {enqueue}

[sweep.params]
"optim.lr" = {{ low = 1e-7, high = 0.3, log = true }}

[model]
name = "mlp"
[model.args]
hidden = 32

[optim]
name = "adamw"

[data]
batch_size = 32

[train]
steps = 20
eval_every = 5
eval_batches = 2
checkpoint_every = 0

[log]
tensorboard = false
progress = false
"""


def _write(tmp_path: Path, n_trials: int, pruner: str, lrs: list[float]) -> Path:
    enqueue = "[" + ", ".join(f'{{ "optim.lr" = {lr!r} }}' for lr in lrs) + "]"
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(n_trials=n_trials, pruner=pruner, enqueue=enqueue))
    return path


def _sweep_cmd(path: Path, folder: Path) -> list[str]:
    return [sys.executable, "-m", "rangerdl", "sweep", str(path), f"--dir={folder}"]


@pytest.fixture
def env(data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("RANGERDL_CACHE", str(data_cache))
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    return dict(os.environ)


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}")


@pytest.mark.slow
def test_sweep_prunes_bad_learning_rates_and_writes_the_best_config(
    tmp_path: Path, env: dict[str, str]
) -> None:
    from optuna.trial import TrialState

    from rangerdl.train.config import load_config

    folder = tmp_path / "sw"
    # a good lr, then lrs far too small: the median rule stops those after the startup trials
    path = _write(tmp_path, 4, "median", [0.03, 1e-7, 2e-7, 3e-7])
    proc = subprocess.run(_sweep_cmd(path, folder), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(folder).get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 4
    assert TrialState.PRUNED in states, [(t.params, t.intermediate_values) for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best, worst = min(complete, key=lambda t: t.value), max(complete, key=lambda t: t.value)
    assert best.params["optim.lr"] == 0.03 and best.value < worst.value - 0.3
    cfg = load_config(folder / "best.toml")  # what `rangerdl train best.toml` runs
    assert cfg.optim.lr == 0.03 and cfg.optim.name == "adamw" and cfg.model.args == {"hidden": 32}
    assert (folder / "history.png").stat().st_size > 0
    assert (folder / "importances.png").stat().st_size > 0
    assert "pruned" in proc.stdout and "rangerdl train" in proc.stdout
    for t in trials:  # every trial is an ordinary run folder
        assert (Path(t.user_attrs["run_dir"]) / "config.json").is_file()


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_requested_number_of_trials(
    tmp_path: Path, env: dict[str, str]
) -> None:
    from optuna.trial import TrialState

    folder = tmp_path / "sw"
    path = _write(tmp_path, 3, "none", [0.03, 0.01, 0.003, 0.001])
    proc = subprocess.Popen(
        _sweep_cmd(path, folder),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # kill the whole sweep (and its training subprocess) in the middle of trial 1
        deadline = time.monotonic() + 240
        while not (folder / "trials" / "trial-1" / "metrics.jsonl").is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _study(folder).get_trials()[1].state == TrialState.RUNNING

    again = subprocess.run(_sweep_cmd(path, folder), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(folder).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert trials[1].state == TrialState.FAIL  # the killed one, not rerun in its folder
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == len(trials) == 4
    assert [t.params["optim.lr"] for t in complete] == [0.03, 0.003, 0.001]
    assert all((Path(t.user_attrs["run_dir"]) / "summary.json").is_file() for t in complete)


def test_sweep_file_errors_name_the_key(tmp_path: Path) -> None:
    from rangerdl.workflow.sweep import load_sweep

    path = tmp_path / "s.toml"
    path.write_text('[sweep]\n[sweep.params]\n"optim.lrr" = { low = 1e-4, high = 1e-1 }\n')
    with pytest.raises(ValueError, match="lrr"):
        load_sweep(path)
    path.write_text('[sweep]\npruner = "asha"\n[sweep.params]\n"optim.lr" = [0.1]\n')
    with pytest.raises(ValueError, match="pruner"):
        load_sweep(path)
    path.write_text('[sweep]\n[sweep.params]\n"optim.lr" = { low = 0.0, high = 1.0, log = true }\n')
    with pytest.raises(ValueError, match="low > 0"):
        load_sweep(path)


def test_dump_toml_round_trips_a_config() -> None:
    import tomllib

    from rangerdl.train.config import Config
    from rangerdl.workflow.sweep import config_with, dump_toml

    cfg = config_with(Config(), {"optim.lr": 1e-3, "model.args.hidden": 64, "optim.name": "adamw"})
    again = Config.from_dict(tomllib.loads(dump_toml(cfg.to_dict())))
    assert again == cfg and again.model.args == {"hidden": 64}
