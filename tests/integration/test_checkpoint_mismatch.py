"""A checkpoint that no longer fits its model (``config.json``'s ``[model]`` edited, or a
checkpoint file replaced with its manifest checksum updated) is a one-line error naming the file,
the key and both shapes, for ``rangerdl eval`` and ``rangerdl train --resume``; shapes are
compared before any tensor data is read."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rangerdl.cli import main


def run_dir(tiny: list[str]) -> Path:
    return Path(tiny[0].split("=", 1)[1]) / "t"


def rangerdl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rangerdl", *args], capture_output=True, text=True, timeout=120
    )


def edit_model_args(run: Path, **args: object) -> Path:
    config = run / "config.json"
    raw = json.loads(config.read_text())
    raw["model"]["args"].update(args)
    config.write_text(json.dumps(raw))
    return config


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def rewrite_checkpoint_file(folder: Path, name: str, obj: object) -> Path:
    """Replace ``folder/name`` and record its new checksum, so the checkpoint still verifies."""
    path = folder / name
    torch.save(obj, path)
    manifest = folder / "MANIFEST.json"
    raw = json.loads(manifest.read_text())
    raw["files"][name] = sha256(path)
    manifest.write_text(json.dumps(raw))
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rangerdl eval: error: "), proc.stderr[-3000:]
    for part in parts:
        assert part in last, last
    return last


def test_eval_with_edited_model_args_names_config_key_and_shapes(tiny: list[str]) -> None:
    assert main(["train", *tiny, "--train.steps=10"]) == 0
    run = run_dir(tiny)
    config = edit_model_args(run, hidden=64)
    last = assert_one_line_error(
        rangerdl("eval", str(run)),
        str(run / "checkpoints" / "step-10" / "model.pt"),
        str(config),
        "'hidden': 64",
        "1.weight",
        "(32, 64)",  # in the file
        "(64, 64)",  # in the model
    )
    assert last.index("(32, 64)") < last.index("(64, 64)")


def test_eval_with_rewritten_model_file_names_it_key_and_shapes(tiny: list[str]) -> None:
    assert main(["train", *tiny, "--train.steps=10"]) == 0
    folder = run_dir(tiny) / "checkpoints" / "step-10"
    weights = torch.load(folder / "model.pt", weights_only=True)
    weights["4.weight"] = torch.zeros(33, 32)
    weights["extra.bias"] = torch.zeros(3)
    del weights["7.bias"]
    path = rewrite_checkpoint_file(folder, "model.pt", weights)
    assert_one_line_error(
        rangerdl("eval", str(folder)),
        str(path),
        "4.weight",
        "(33, 32)",
        "(32, 32)",
        "7.bias",
        "extra.bias",
    )


def test_resume_with_edited_model_args_names_key_and_shapes(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    run = run_dir(tiny)
    config = edit_model_args(run, hidden=16)
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    state = run / "checkpoints" / "step-10" / "state-rank0.pt"
    for part in (f"{state}: the saved model state does not fit", str(config), "1.weight"):
        assert part in err
    assert "(32, 64) in the file" in err and "(16, 64) in the model" in err


def test_resume_with_rewritten_state_file_names_the_key(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    folder = run_dir(tiny) / "checkpoints" / "step-10"
    state = torch.load(folder / "state-rank0.pt", weights_only=True)
    state["model"]["7.weight"] = torch.zeros(10, 31)
    path = rewrite_checkpoint_file(folder, "state-rank0.pt", state)
    assert main(["train", "--resume", str(run_dir(tiny))]) == 1
    err = capsys.readouterr().err
    assert f"{path}: the saved model state does not fit" in err
    assert "7.weight has shape (10, 31) in the file and (10, 32) in the model" in err


def test_resume_with_another_optimizer_is_a_clear_error(
    tiny: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny, "--train.stop_at=10"]) == 0
    run = run_dir(tiny)
    folder = run / "checkpoints" / "step-10"
    state = torch.load(folder / "state-rank0.pt", weights_only=True)
    first = next(iter(state["optimizer"]["state"].values()))
    key = next(k for k, v in first.items() if isinstance(v, torch.Tensor) and v.ndim == 2)
    first[key] = torch.zeros(2, 2)
    path = rewrite_checkpoint_file(folder, "state-rank0.pt", state)
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: the saved optimizer state does not fit" in err
    assert f"{key} of parameter 0 has shape (2, 2) in the file and (32, 64) in the model" in err


PEAK_MEMORY_SCRIPT = """
    import sys
    from pathlib import Path
    from rangerdl.train.evaluate import evaluate_checkpoint

    def peak_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the resident size now
    except OSError:
        pass
    before = peak_bytes()
    try:
        evaluate_checkpoint(Path(sys.argv[1]))
    except ValueError as exc:
        print(exc)
    print(peak_bytes() - before)
"""


def test_shapes_are_compared_before_tensor_data_is_read(tiny: list[str]) -> None:
    assert main(["train", *tiny, "--train.steps=10"]) == 0
    folder = run_dir(tiny) / "checkpoints" / "step-10"
    weights = torch.load(folder / "model.pt", weights_only=True)
    big = torch.empty(1 << 16, 1 << 10)  # 256 MiB, never touched: its pages stay unbacked
    weights["1.weight"] = big
    rewrite_checkpoint_file(folder, "model.pt", weights)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_MEMORY_SCRIPT), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, growth = proc.stdout.strip().rsplit("\n", 1)
    assert "1.weight has shape (65536, 1024) in the file and (32, 64) in the model" in message
    # Reading the tensor (to hash the file, or to load it) would raise the peak by its size.
    assert int(growth) < big.nbytes // 4, f"peak memory grew by {int(growth) >> 20} MiB"
