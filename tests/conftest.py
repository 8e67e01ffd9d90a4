"""Shared test configuration: gpu tests skip without CUDA; slow tests first; offline.

Tests run with 2 torch threads, or 1 per worker under ``pytest -n N`` (pytest-xdist, as ``make
test`` runs them): N workers with 2 threads each would oversubscribe the cores, and OpenMP threads
spinning against each other cost more than they give.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the processes the tests start
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The longest tests first, then the other slow and multi-process ones (a stable sort keeps
    # each group's order): with several workers (and --dist worksteal, which hands a worker that
    # ran out the queued tests of another), no worker is left running a long test alone at the end.
    items.sort(
        key=lambda item: (
            "long" not in item.keywords,
            not ({"slow", "distributed"} & set(item.keywords)),
        )
    )
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
