"""``rangerdl sweep``: trials are real `rangerdl train` subprocesses on digits (a few steps each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    assert "trial-3 starts (3/4 trials finished)" in proc.stderr  # progress, one worker
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
    path.write_text('[sweep]\nseed = -1\n[sweep.params]\n"optim.lr" = [0.1]\n')
    with pytest.raises(ValueError, match="seed"):
        load_sweep(path)


def test_ctrl_c_is_one_line_that_says_how_to_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rangerdl.cli import main
    from rangerdl.workflow import sweep

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    path = _write(tmp_path, 2, "none", [0.01])
    assert main(["sweep", str(path), f"--dir={tmp_path / 'sw'}"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Run the same command again" in err
    assert "Traceback" not in err


def test_dump_toml_round_trips_a_config() -> None:
    import tomllib

    from rangerdl.train.config import Config
    from rangerdl.workflow.sweep import config_with, dump_toml

    cfg = config_with(Config(), {"optim.lr": 1e-3, "model.args.hidden": 64, "optim.name": "adamw"})
    again = Config.from_dict(tomllib.loads(dump_toml(cfg.to_dict())))
    assert again == cfg and again.model.args == {"hidden": 64}


@pytest.mark.slow
def test_concurrent_workers_share_one_study_without_duplicates_or_extra_trials(
    tmp_path: Path, env: dict[str, str]
) -> None:
    import json
    import tomllib

    from optuna.trial import TrialState

    folder = tmp_path / "sw"
    path = tmp_path / "sweep.toml"
    # TPE with the default seed, three workers started together, two trials in all: a worker
    # seeded alike would repeat a point, and each worker running a trial would make three.
    # adamw: it moves from the first step, so distinct learning rates give distinct losses
    path.write_text(
        '[sweep]\nn_trials = 2\npruner = "none"\n'
        '[sweep.params]\n"optim.lr" = { low = 1e-3, high = 1e-1, log = true }\n'
        '[model]\nname = "mlp"\n[model.args]\nhidden = 8\n[optim]\nname = "adamw"\n'
        "[data]\nbatch_size = 16\n"
        "[train]\nsteps = 4\neval_every = 2\neval_batches = 1\ncheckpoint_every = 0\n"
        "[log]\ntensorboard = false\nprogress = false\n"
    )
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = []
    for log in logs:
        with open(log, "w") as out:
            workers.append(
                subprocess.Popen(_sweep_cmd(path, folder), stdout=out, stderr=subprocess.STDOUT)
            )
    try:
        for worker, log in zip(workers, logs, strict=True):
            assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for worker in workers:
            worker.kill()

    trials = _study(folder).get_trials()
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert all(t.state == TrialState.FAIL for t in trials if t not in ran)
    assert [t.state for t in ran] == [TrialState.COMPLETE] * 2, [t.state for t in trials]
    lrs = [t.params["optim.lr"] for t in ran]
    assert len(set(lrs)) == len(lrs), lrs
    listed = json.loads((folder / "trials.json").read_text())
    assert sorted(r["number"] for r in listed) == [t.number for t in ran]
    best = min(ran, key=lambda t: t.value)
    assert listed[0]["number"] == best.number and listed[0]["value"] == best.value
    assert (
        tomllib.loads((folder / "best.toml").read_text())["optim"]["lr"] == best.params["optim.lr"]
    )


def _spec(tmp_path: Path, n_trials: int = 2, sampler: str = "tpe") -> Any:
    from rangerdl.train.config import Config
    from rangerdl.workflow.sweep import SearchParam, SweepSpec

    lr = SearchParam("optim.lr", low=1e-3, high=1e-1, log=True)
    return SweepSpec(tmp_path, "s", Config(), [lr], n_trials=n_trials, sampler=sampler)


def _worker(spec: Any, storage: Any) -> optuna.Study:
    """One worker's view of a shared study: its own sampler, as a separate process has."""
    from rangerdl.workflow.sweep import _sampler

    return optuna.create_study(
        storage=storage, study_name="s", sampler=_sampler(spec), load_if_exists=True
    )


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_workers_sample_distinct_points_and_one_worker_repeats_its_points(
    tmp_path: Path, sampler: str
) -> None:
    spec = _spec(tmp_path, sampler=sampler)

    def alone() -> list[float]:
        study = _worker(spec, optuna.storages.InMemoryStorage())
        return [study.ask().suggest_float("x", 0, 1) for _ in range(3)]

    assert alone() == alone()
    shared = optuna.storages.InMemoryStorage()
    workers = [_worker(spec, shared) for _ in range(3)]
    points = [w.ask().suggest_float("x", 0, 1) for w in workers for _ in range(2)]
    assert len(set(points)) == len(points), points


def test_a_trial_created_beyond_n_trials_is_not_run(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from rangerdl.workflow.sweep import SurplusTrial, _claim_place

    study = optuna.create_study()
    first, second, late = study.ask(), study.ask(), study.ask()  # three workers asked at once
    _claim_place(first, 2)
    _claim_place(second, 2)
    with pytest.raises(SurplusTrial, match="trial 2 is not run"):
        _claim_place(late, 2)
    assert late.user_attrs == {"surplus": True}
    study.tell(late, state=TrialState.FAIL)
    study.tell(first, state=TrialState.FAIL)  # a place freed: the next trial takes it
    _claim_place(study.ask(), 2)


def test_a_worker_waits_while_other_workers_trials_fill_n_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from optuna.trial import TrialState

    from rangerdl.workflow import sweep

    monkeypatch.setattr(sweep, "WAIT_S", 0.01)
    spec = _spec(tmp_path, n_trials=2)
    study = optuna.create_study()
    done, elsewhere = study.ask(), study.ask()
    study.tell(done, 1.0)
    timer = threading.Timer(0.3, study.tell, (elsewhere,), {"state": TrialState.FAIL})
    timer.start()
    started = time.monotonic()
    assert sweep._wait_for_place(study, spec)  # the failed trial's place is free again
    assert time.monotonic() - started >= 0.25
    study.tell(study.ask(), 2.0)
    assert not sweep._wait_for_place(study, spec)


def test_a_worker_with_another_base_config_does_not_replace_the_running_one(
    tmp_path: Path,
) -> None:
    from rangerdl.workflow.sweep import _write_base

    study = optuna.create_study()
    spec = _spec(tmp_path)
    _write_base(study, spec)
    first = (tmp_path / "base.toml").read_text()
    running = study.ask()
    spec.base.train.steps += 1  # e.g. a worker started with other overrides
    with pytest.raises(ValueError, match=r"trials \[0\] of this study run from it"):
        _write_base(study, spec)
    assert (tmp_path / "base.toml").read_text() == first
    study.tell(running, 1.0)  # nothing runs from it any more: a later run may change it
    _write_base(study, spec)
    assert (tmp_path / "base.toml").read_text() != first
