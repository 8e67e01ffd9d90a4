"""The trainer under hostile input and faults: no code from run folders, nothing lost,
bounded retries, clear errors naming the file. Cases from ../shared/cases/trust/RELIABILITY.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rangerdl.cli import main
from rangerdl.train.metrics import read_metrics


def run_dir(tiny: list[str]) -> Path:
    return Path(tiny[0].split("=", 1)[1]) / "t"


def _tamper_model(run: Path, name: str, args: dict[str, object]) -> None:
    config = run / "config.json"
    raw = json.loads(config.read_text())
    raw["model"]["name"], raw["model"]["args"] = name, args
    config.write_text(json.dumps(raw))


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_run_folder_cannot_make_rangerdl_import_code(
    tiny: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """C5: a config.json naming ``os:system`` (or any module:factory) is never imported."""
    assert main(["train", *tiny, "--train.steps=10"]) == 0
    run = run_dir(tiny)
    pwned = tmp_path / "pwned"
    _tamper_model(run, "os:system", {"command": f"touch {pwned}"})
    argv = ["eval", str(run)] if command == "eval" else ["train", "--resume", str(run)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--trust-run-code" in err and "config.json" in err
    assert not pwned.exists()
    # Trusting the run still never calls a standard-library function as a model factory.
    assert main([*argv, "--trust-run-code"]) == 1
    assert "standard library" in capsys.readouterr().err and not pwned.exists()


def test_trusted_run_code_is_imported(tiny: list[str]) -> None:
    args = [*tiny, "--model.name=user_models:nan_after", "--model.args.after=1000"]
    assert main(["train", *args, "--train.steps=10", "--schedule.name=constant"]) == 0
    run = run_dir(tiny)
    assert main(["eval", str(run)]) == 1  # the run names code: refused
    assert main(["eval", str(run), "--trust-run-code"]) == 0
    assert main(["train", "--resume", str(run), "--train.steps=12", "--trust-run-code"]) == 0


def test_retention_never_deletes_the_good_checkpoints(tiny: list[str]) -> None:
    """C17: a damaged newest checkpoint is moved aside, never counted; keep=1 stays resumable."""
    steps = ["--train.steps=20", "--train.checkpoint_every=5", "--schedule.name=constant"]
    assert main(["train", *tiny, *steps]) == 0
    run = run_dir(tiny)
    (run / "checkpoints" / "step-20" / "model.pt").write_bytes(b"x" * 100)
    resume = ["train", "--resume", str(run), "--train.steps=40"]
    assert main([*resume, "--train.checkpoint_every=1", "--train.keep_checkpoints=1"]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["damaged-step-20", "step-40"]
    assert main([*resume, "--train.steps=45"]) == 0


def test_run_stopped_before_its_first_checkpoint_can_be_resumed(
    tiny: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """D3: a run folder with a config and no checkpoint starts over from step 0 on --resume."""
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    run = run_dir(tiny)
    import shutil

    shutil.rmtree(run / "checkpoints")  # as if killed before the first checkpoint
    assert main(["train", "--resume", str(run)]) == 0
    assert "no complete checkpoint yet: starting it from step 0" in caplog.text
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == list(range(1, 31))


def test_torn_metrics_tail_is_dropped_on_resume(
    tiny: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """D7: a torn last line of metrics.jsonl (full disk) does not block resuming."""
    assert main(["train", *tiny, "--train.stop_at=20"]) == 0
    run = run_dir(tiny)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 21, "train/lo')
    assert main(["train", "--resume", str(run)]) == 0
    assert "metrics.jsonl: the last line is torn" in caplog.text
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == list(range(1, 31))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 3 is malformed"):
        read_metrics(run)


def test_nan_skip_leaves_no_trace_in_batchnorm_buffers(tiny: list[str]) -> None:
    """E17: on_nan = skip with BatchNorm: the skipped forwards' writes to the running statistics
    are rolled back, so the saved model is finite."""
    args = [*tiny, "--model.name=user_models:nan_input_bn", "--model.args.at=12"]
    assert main(["train", *args, "--train.on_nan=skip"]) == 0
    model = torch.load(run_dir(tiny) / "checkpoints" / "step-30" / "model.pt", weights_only=True)
    assert all(bool(torch.isfinite(v.float()).all()) for v in model.values())
    state = torch.load(
        run_dir(tiny) / "checkpoints" / "step-30" / "state-rank0.pt", weights_only=True
    )
    assert all(bool(torch.isfinite(v.float()).all()) for v in state["model"].values())


def test_nan_in_the_input_is_named_as_the_cause() -> None:
    from rangerdl.train.nonfinite import NonFiniteGuard, TrainingError
    from rangerdl.train.runtime import Runtime

    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    guard = NonFiniteGuard(torch.nn.Linear(2, 2), rt, "stop", 10)
    nan = torch.tensor(float("nan"))
    with pytest.raises(TrainingError, match="this batch's input holds NaN/inf values"):
        guard.should_skip(3, nan, torch.tensor([[1.0, float("inf")]]), "CKPT")
    with pytest.raises(TrainingError, match="the input is finite: the model diverged"):
        guard.should_skip(3, nan, torch.ones(1, 2), "CKPT")


def test_too_many_skipped_steps_stop_the_run(tiny: list[str]) -> None:
    args = [*tiny, "--model.name=user_models:nan_after", "--model.args.after=3"]
    assert main(["train", *args, "--train.on_nan=skip", "--train.max_nan_skips=5"]) == 1


def test_checkpoint_write_error_names_the_last_good_one(
    tiny: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """D6: ENOSPC while writing a checkpoint: a clear error, no temporary files, the previous
    checkpoint intact."""
    import errno

    from rangerdl import _fileio

    real = _fileio.atomic_write_bytes
    calls = {"n": 0}

    def full_after_a_while(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr("rangerdl.train.checkpoint.atomic_write_bytes", full_after_a_while)
    assert main(["train", *tiny]) == 1
    err = caplog.text
    run = run_dir(tiny)
    assert "No space left" in err and "the last complete checkpoint is" in err and "step-10" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10"]


def test_config_json_that_is_not_a_table_names_the_file(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, "--train.steps=10"]) == 0
    run = run_dir(tiny)
    (run / "config.json").write_text("[1, 2]")
    assert main(["eval", str(run)]) == 1
    assert "config.json: not a valid config file" in capsys.readouterr().err


def test_malformed_checkpoint_manifest_is_skipped(
    tiny: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["train", *tiny, "--train.stop_at=20"]) == 0
    run = run_dir(tiny)
    (run / "checkpoints" / "step-20" / "MANIFEST.json").write_text("[]")
    assert main(["train", "--resume", str(run)]) == 0
    assert "skipping checkpoint" in caplog.text and "unreadable" in caplog.text


def test_pickled_checkpoint_file_is_refused_by_name(tiny: list[str], tmp_path: Path) -> None:
    from rangerdl.train import checkpoint as ckpt

    path = tmp_path / "evil.pt"
    torch.save({"x": Path("/")}, path)  # a pickled object that is not a tensor
    with pytest.raises(ValueError, match=r"evil\.pt: not a loadable checkpoint file.*refusing"):
        ckpt.load(path)


def test_changed_model_on_resume_names_the_checkpoint(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    run = run_dir(tiny)
    raw = json.loads((run / "config.json").read_text())
    raw["model"]["args"]["hidden"] = 64  # edited by hand: the saved weights no longer fit
    (run / "config.json").write_text(json.dumps(raw))
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert "state-rank0.pt: the saved model state does not fit" in err


def test_second_job_in_a_run_folder_is_refused_naming_the_holder(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """G1: two trainings in one run folder: the second is refused at once (an OS lock, released
    when its holder dies), naming the holder's PID."""
    import os

    from rangerdl._lock import FolderLock

    run = run_dir(tiny)
    run.parent.mkdir(parents=True)
    with FolderLock(run, what="run folder"):
        assert main(["train", *tiny]) == 1
        assert f"{os.getpid()}" in capsys.readouterr().err
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    with FolderLock(run, what="run folder"):
        assert main(["train", "--resume", str(run)]) == 1
    assert main(["train", "--resume", str(run)]) == 0


def test_run_resume_auto_continues_an_existing_run(tiny: list[str]) -> None:
    """Multi-node elastic restarts: ``[run] resume = "auto"`` continues the named run (from its
    latest checkpoint) instead of refusing the existing folder."""
    assert main(["train", *tiny, "--train.stop_at=20"]) == 0
    assert main(["train", *tiny]) == 1  # never: the folder exists
    assert main(["train", *tiny, "--run.resume=auto"]) == 0
    rows = [r["step"] for r in read_metrics(run_dir(tiny)) if "train/loss" in r]
    assert rows == list(range(1, 31))
