"""Keras tests: one backend per process, chosen by ``KERAS_BACKEND`` before Keras is imported.

``make test`` runs this folder three times: inside the main pytest run (PyTorch backend, the default
set here), then as ``KERAS_BACKEND=tensorflow`` and ``KERAS_BACKEND=jax`` runs of this folder alone.
Without Keras installed the folder is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

keras = pytest.importorskip("keras")


@pytest.fixture(autouse=True)
def _fresh_keras_state() -> Iterator[None]:
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
