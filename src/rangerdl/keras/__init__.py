"""Ranger and Lookahead for Keras 3, on the TensorFlow, JAX and PyTorch backends.

Importing this package imports Keras (and so its backend, chosen by ``KERAS_BACKEND``); importing
``rangerdl`` does not. Both optimizers are registered as Keras serializables (package
``rangerdl``), so ``keras.models.load_model`` finds them once this package is imported.
Distributed training stays on the PyTorch side (``rangerdl.optim``, ``rangerdl.distributed``).
"""

from rangerdl.keras.lookahead import Lookahead
from rangerdl.keras.ranger import Ranger

__all__ = ["Lookahead", "Ranger"]
