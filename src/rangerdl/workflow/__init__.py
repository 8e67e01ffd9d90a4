"""The experiment workflow around ``rangerdl train``: ``rangerdl plan`` (the communication cost
model, before launching) and ``rangerdl sweep`` (hyperparameter search with Optuna).

Importing this package imports neither torch nor optuna; the commands import what they need."""
