"""TensorBoard events: written without importing TensorFlow, read back by TensorBoard itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rangerdl.train.tb_events import ScalarEventWriter

# TensorBoard's own reader, in a child process: it may import TensorFlow, which the pytest
# process should not pay for. Prints {tag: [[step, value], ...]} after purging as TensorBoard does.
READ = """
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], purge_orphaned_data=True)
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"""


def read_scalars(log_dir: Path) -> dict[str, list[list[float]]]:
    done = subprocess.run(
        [sys.executable, "-c", READ, str(log_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_scalars_and_purge_read_back_in_tensorboard(tmp_path: Path) -> None:
    first = ScalarEventWriter(tmp_path)
    for step in range(1, 11):
        first.add_scalar("train/loss", 10.0 - step, step)
    first.close()
    # A run resumed from step 6: TensorBoard drops the first file's steps 7-10.
    resumed = ScalarEventWriter(tmp_path, purge_step=7)
    for step in range(7, 13):
        resumed.add_scalar("train/loss", 100.0 + step, step)
    resumed.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    rows = read_scalars(tmp_path)["train/loss"]
    assert [s for s, _ in rows] == list(range(1, 13))
    assert [v for _, v in rows] == [10.0 - s for s in range(1, 7)] + [
        100.0 + s for s in range(7, 13)
    ]


WRITE_AND_CHECK = """
import sys, time
start = time.perf_counter()
from rangerdl.cli import main
assert main(sys.argv[1:]) == 0
print("tensorflow" in sys.modules, "torch.utils.tensorboard" in sys.modules)
"""


@pytest.mark.slow
def test_train_with_tensorboard_imports_no_tensorflow(tiny: list[str], tmp_path: Path) -> None:
    """Whether or not TensorFlow is installed (it is in the dev environment), `rangerdl train`
    writes its events without importing it: no banner, no seconds of start-up."""
    args = [a for a in tiny if a != "--log.tensorboard=false"] + ["--log.tensorboard=true"]
    done = subprocess.run(
        [sys.executable, "-c", WRITE_AND_CHECK, "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False"
    for banner in ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "tensorflow"):
        assert banner not in done.stderr
    run = tmp_path / "runs" / "t"
    rows = read_scalars(run / "tb")
    assert [s for s, _ in rows["train/loss"]] == list(range(1, 31))
    assert [s for s, _ in rows["val/loss"]] == [10, 20, 30]
