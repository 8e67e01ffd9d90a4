"""Shared test configuration: gpu tests skip without CUDA; tests run with 2 threads, offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
