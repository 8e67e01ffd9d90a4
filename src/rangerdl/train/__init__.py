"""The trainer: config, loop, checkpoints, metrics, models (``rangerdl train``)."""
