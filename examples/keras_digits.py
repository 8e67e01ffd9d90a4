"""Train a Keras model with rangerdl.keras.Ranger on scikit-learn's digits, with TensorBoard logs.

    python examples/keras_digits.py                        # TensorFlow if installed, else JAX, else PyTorch
    KERAS_BACKEND=jax python examples/keras_digits.py --epochs 40
    tensorboard --logdir runs/keras_digits

Needs ``pip install "rangerdl[keras]"`` and one Keras backend. Keras' TensorBoard callback writes
through TensorFlow; without TensorFlow the same scalars are written with torch's SummaryWriter.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

# Keras reads its backend once, at import: choose before importing it.
if "KERAS_BACKEND" not in os.environ:
    for _backend in ("tensorflow", "jax", "torch"):
        if importlib.util.find_spec(_backend) is not None:
            os.environ["KERAS_BACKEND"] = _backend
            break

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rangerdl.keras import Ranger


class ScalarBoard(keras.callbacks.Callback):
    """Epoch-level ``train/...`` and ``val/...`` scalars through torch's SummaryWriter."""

    def __init__(self, log_dir: str) -> None:
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        for name, value in (logs or {}).items():
            split, metric = ("val", name[4:]) if name.startswith("val_") else ("train", name)
            self.writer.add_scalar(f"{split}/{metric}", value, epoch)
        self.writer.flush()

    def on_train_end(self, logs: dict[str, float] | None = None) -> None:
        self.writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--logdir", default="runs/keras_digits")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int32), test_size=0.2, random_state=0, stratify=y
    )

    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=Ranger(learning_rate=args.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if importlib.util.find_spec("tensorflow") is not None:
        board: keras.callbacks.Callback = keras.callbacks.TensorBoard(log_dir=args.logdir)
    else:
        board = ScalarBoard(args.logdir)
    model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=args.epochs,
        validation_split=0.1,
        callbacks=[board],
        verbose=2,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"Backend: {keras.backend.backend()}; TensorBoard logs: {args.logdir}")
    print(f"Test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
