"""Fixtures for end-to-end tests: a digits cache prepared once per pytest run, tiny configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rangerdl.data import prepare

    cache = tmp_path_factory.mktemp("cache")
    prepare("digits", cache / "digits")
    return cache


@pytest.fixture
def tiny(tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Overrides for a run of a few seconds on digits; the run folder is tmp_path/runs/t."""
    monkeypatch.setenv("RANGERDL_CACHE", str(data_cache))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return [
        f"--run.dir={tmp_path / 'runs'}",
        "--run.name=t",
        "--model.name=mlp",
        "--model.args.hidden=32",
        "--optim.lr=0.1",
        "--data.batch_size=32",
        "--train.steps=30",
        "--train.eval_every=10",
        "--train.eval_batches=2",
        "--train.checkpoint_every=10",
        "--train.keep_checkpoints=5",
        "--log.tensorboard=false",
        "--log.progress=false",
    ]


@pytest.fixture(autouse=True)
def _no_stale_user_models() -> None:
    sys.modules.pop("user_models", None)
