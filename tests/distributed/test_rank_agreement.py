"""The ranks of one job agree on what they read and where they write by content, not by name: a
relative ``[data] path`` or ``run.dir`` (or a per-node ``$RANGERDL_CACHE``) that resolves to
different folders per rank is refused at start on every rank, naming both; the same content
under different names trains. Real ``torchrun`` jobs (gloo), each rank in its own working
directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rangerdl.train.run_folder import CHECK_PREFIX

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TORCHRUN = Path(sys.executable).with_name("torchrun")
RANGERDL = Path(sys.executable).with_name("rangerdl")
TIMEOUT_S = 30  # the collective timeout of the jobs here; a refusal must come well before it

# Rank r starts in $DIRr with $DIRr/cache as its cache: one node per rank, as far as paths go.
# Each rank runs under setsid, in a process group of its own: torchrun stops the other workers'
# process groups as soon as one worker fails, which may be before a slower rank has printed its
# own error.
WRAP = """#!/bin/bash
if [ "$RANK" = 0 ]; then d=$DIR0; else d=$DIR1; fi
extra=()  # with $ABSOLUTE: this node's own absolute paths, spelled differently on each rank
if [ -n "$ABSOLUTE" ]; then extra=("--data.path=$d/ds" "--run.dir=$d/runs"); fi
cd "$d" && RANGERDL_CACHE="$d/cache" exec setsid --wait "$@" "${extra[@]}"
"""

ARGS = [
    "--model.name=mlp",
    "--train.steps=4",
    "--train.checkpoint_every=1",  # a step taken would leave a checkpoint
    "--train.eval_every=0",
    f"--distributed.timeout_s={TIMEOUT_S}",
    "--run.name=t",
    "--log.tensorboard=false",
    "--log.progress=false",
]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepared digits: ``seed0``, ``seed0-copy`` (the same bytes elsewhere), ``seed1``."""
    from rangerdl.data import prepare

    root = tmp_path_factory.mktemp("digits")
    prepare("digits", root / "seed0", seed=0)
    prepare("digits", root / "seed1", seed=1)
    shutil.copytree(root / "seed0", root / "seed0-copy")
    return {name: root / name for name in ("seed0", "seed0-copy", "seed1")}


def node(tmp_path: Path, rank: int, data: Path | None = None, cached: Path | None = None) -> Path:
    """``tmp_path/nodeR``, holding ``data`` as ``ds`` and ``cached`` as its cached digits."""
    folder = tmp_path / f"node{rank}"
    (folder / "cache").mkdir(parents=True)
    if data is not None:
        shutil.copytree(data, folder / "ds")
    if cached is not None:
        shutil.copytree(cached, folder / "cache" / "digits")
    return folder


def launch(
    tmp_path: Path, nodes: list[Path], *args: str, absolute: bool = False
) -> tuple[int, str, float]:
    """``rangerdl train`` on 2 ranks, rank r in ``nodes[r]``: (exit code, output, seconds).
    ``absolute``: each rank is given ``--data.path`` and ``--run.dir`` as its node's own absolute
    paths."""
    wrap = tmp_path / "wrap.sh"
    wrap.write_text(WRAP)
    wrap.chmod(0o755)
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "--no-python", str(wrap)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIR0": str(nodes[0]), "DIR1": str(nodes[1])}
    env["ABSOLUTE"] = "1" if absolute else ""
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, str(RANGERDL), "train", *ARGS, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def train_checksum(dataset: Path) -> str:
    from rangerdl.data import open_splits

    return open_splits(dataset)["train"].checksum[:16]


def refusal(out: str, start: str) -> str:
    """The error holding ``start``, printed alike by every rank, which shows no traceback
    (torchrun's own, for a worker that exited 1, is no rank's)."""
    # Split at the prefix, not by line: print() writes the message and its newline apart, so
    # two ranks printing at the same moment give "error: A" "error: B" "\n" "\n".
    errors = [chunk.split("\n")[0] for chunk in out.split("rangerdl train: error: ")[1:]]
    assert len(errors) == 2 and errors[0] == errors[1], out[-3000:]
    assert start in errors[0], out[-3000:]
    assert not worker_tracebacks(out), out[-3000:]
    return errors[0]


def worker_tracebacks(out: str) -> list[str]:
    """The tracebacks' first frames, but torchrun's own (it shows one for a worker that failed)."""
    chunks = out.split("Traceback (most recent call last):")[1:]
    frames = [chunk.split("\n")[1] if "\n" in chunk else chunk for chunk in chunks]
    return [frame for frame in frames if str(TORCHRUN) not in frame]


def test_different_datasets_under_one_relative_path_are_refused_at_start(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    """Both ranks read ``ds``, which holds another split of digits on each: rank 0's test samples
    would be rank 1's training samples."""
    nodes = [node(tmp_path, 0, digits["seed0"]), node(tmp_path, 1, digits["seed1"])]
    rc, out, elapsed = launch(tmp_path, nodes, "--data.path=ds", f"--run.dir={tmp_path / 'runs'}")
    assert rc != 0, out[-3000:]
    line = refusal(out, "rank 1 reads a different dataset than rank 0: train split checksum")
    for folder in nodes:
        assert train_checksum(folder / "ds") in line, line
        assert f"({folder.resolve() / 'ds'})" in line, line
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()  # no step taken
    assert elapsed < TIMEOUT_S, elapsed


def test_builtin_source_under_per_node_caches_with_different_data_is_refused_at_start(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    nodes = [node(tmp_path, 0, cached=digits["seed0"]), node(tmp_path, 1, cached=digits["seed1"])]
    rc, out, elapsed = launch(tmp_path, nodes, "--data.source=digits", f"--run.dir={tmp_path}/r")
    assert rc != 0, out[-3000:]
    line = refusal(out, "rank 1 reads a different dataset than rank 0: train split checksum")
    for folder in nodes:
        assert train_checksum(folder / "cache" / "digits") in line, line
        assert f"({folder.resolve() / 'cache' / 'digits'})" in line, line
    assert not (tmp_path / "r" / "t" / "checkpoints").exists()
    assert elapsed < TIMEOUT_S, elapsed


def test_relative_run_dir_resolving_to_different_folders_is_refused_at_start(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    """Each rank writes its own ``state-rank{R}.pt`` into the run folder's checkpoints: rank 1's
    ``runs`` is another folder, so the first checkpoint would fail (or a resume miss its state)."""
    nodes = [node(tmp_path, 0), node(tmp_path, 1)]
    rc, out, elapsed = launch(tmp_path, nodes, f"--data.path={digits['seed0']}", "--run.dir=runs")
    assert rc != 0, out[-3000:]
    line = refusal(out, "rank 1 does not see the run folder rank 0 writes to")
    assert f"rank 0 uses {nodes[0].resolve() / 'runs' / 't'}," in line, line
    assert f"this rank's resolves to {nodes[1].resolve() / 'runs' / 't'} " in line, line
    assert "state-rank" in line, line  # why the folder must be shared
    for folder in nodes:
        assert not (folder / "runs" / "t" / "checkpoints").exists()
    assert not list((nodes[0] / "runs" / "t").iterdir())  # the check leaves nothing behind
    assert elapsed < TIMEOUT_S, elapsed


def test_same_content_under_different_names_trains(digits: dict[str, Path], tmp_path: Path) -> None:
    """Identical copies of the dataset, and one run folder reached through a different link on
    each rank: agreement is by content, so the job trains and both ranks checkpoint into it."""
    nodes = [node(tmp_path, 0, digits["seed0"]), node(tmp_path, 1, digits["seed0-copy"])]
    shared = tmp_path / "shared"
    shared.mkdir()
    for folder in nodes:
        (folder / "runs").symlink_to(shared)
    rc, out, _ = launch(tmp_path, nodes, "--data.path=ds", "--run.dir=runs")
    assert rc == 0, out[-3000:]
    final = shared / "t" / "checkpoints" / "step-4"
    assert sorted(p.name for p in final.glob("state-rank*.pt")) == [
        "state-rank0.pt",
        "state-rank1.pt",
    ]
    assert not list((shared / "t").glob(f"{CHECK_PREFIX}*"))


def test_per_node_absolute_paths_to_the_same_content_train(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    """Each node names its copy of the data and its mount of the run folder by its own absolute
    path: the strings differ, the content agrees, so the job trains (a string comparison of the
    configs refused it)."""
    nodes = [node(tmp_path, 0, digits["seed0"]), node(tmp_path, 1, digits["seed0-copy"])]
    shared = tmp_path / "shared"
    shared.mkdir()
    for folder in nodes:
        (folder / "runs").symlink_to(shared)
    rc, out, _ = launch(tmp_path, nodes, absolute=True)
    assert rc == 0, out[-3000:]
    assert len(list((shared / "t" / "checkpoints" / "step-4").glob("state-rank*.pt"))) == 2


def test_rank_0_refusing_the_run_folder_is_an_error_on_every_rank(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    """A fresh run into an existing run: rank 0 refuses the folder, and the other ranks, waiting
    for rank 0's choice, refuse with its reason instead of failing in the next collective."""
    nodes = [node(tmp_path, 0), node(tmp_path, 1)]
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}\n")
    rc, out, elapsed = launch(
        tmp_path, nodes, f"--data.path={digits['seed0']}", f"--run.dir={run.parent}"
    )
    assert rc != 0, out[-3000:]
    reason = f"run folder {run} already exists"
    assert f"rangerdl train: error: {reason}" in out, out[-3000:]
    assert f"rangerdl train: error: rank 0 cannot use the run folder: {reason}" in out, out[-3000:]
    assert not worker_tracebacks(out), out[-3000:]
    assert elapsed < TIMEOUT_S, elapsed
