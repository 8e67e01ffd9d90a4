"""Outside contenders of the time-to-quality benchmark, trained on rangerdl's model, data,
schedule and evaluation: torchft's DiLoCo and Streaming DiLoCo (``torchft_train.py``), launched
one replica group per simulated host by ``launch.py``. Nothing in ``src/`` imports torchft."""
