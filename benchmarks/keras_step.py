"""Median step time of rangerdl.keras.Ranger against Keras' own AdamW, on each Keras backend.

One process per backend (Keras chooses its backend at import). In each, the contenders update the
same GPT-like variables (Keras layout) with the same gradients, interleaved round-robin so that
machine noise hits all of them alike, each step compiled the way ``model.fit`` compiles it:
TensorFlow ``tf.function(jit_compile=True)`` (fit's default when XLA supports the model), JAX
``jax.jit`` of ``stateless_apply`` with the state donated (as the JAX trainer does), PyTorch eager
(fit's default there). Prints a table and writes ``benchmarks/results/keras_step.json``.

    python benchmarks/keras_step.py [--repeats 30] [--backends tensorflow jax torch]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("tensorflow", "jax", "torch")


def keras_gpt_shapes(
    num_layers: int = 6, width: int = 384, vocab: int = 6144
) -> list[tuple[int, ...]]:
    """A small GPT's variables in Keras layout (output axis last): embedding, per layer 2
    LayerNorms, qkv, proj and a 4x MLP."""
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(num_layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width)]
        shapes += [(width,)]
    return shapes


def contenders() -> dict[str, Any]:
    import keras

    from rangerdl.keras import Ranger

    return {
        "keras AdamW": lambda: keras.optimizers.AdamW(learning_rate=1e-3),
        "rangerdl Ranger": lambda: Ranger(learning_rate=1e-3),
        "rangerdl Ranger GC off": lambda: Ranger(learning_rate=1e-3, use_gc=False),
    }


def _step_fn(backend: str, optimizer: Any, variables: list[Any], grads: list[Any]) -> Any:
    """A no-argument callable that runs one compiled optimizer step and waits for it."""
    optimizer.build(variables)
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda: optimizer.apply(grads, variables), jit_compile=True)
        return lambda: step()
    if backend == "jax":
        import jax

        apply = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))
        state = {
            "opt": [v.value for v in optimizer.variables],
            "vars": [v.value for v in variables],
        }

        def run() -> None:
            new_vars, new_opt = apply(state["opt"], grads, state["vars"])
            jax.block_until_ready(new_vars)
            state["vars"], state["opt"] = new_vars, new_opt

        return run
    return lambda: optimizer.apply(grads, variables)


def worker(repeats: int, warmup: int) -> dict[str, Any]:
    import keras
    import numpy as np

    backend = keras.backend.backend()
    shapes = keras_gpt_shapes()
    rng = np.random.default_rng(0)
    steps = {}
    for name, make in contenders().items():
        variables = [
            keras.Variable(rng.standard_normal(s).astype(np.float32) * 0.02) for s in shapes
        ]
        grads = [
            keras.ops.convert_to_tensor(rng.standard_normal(s).astype(np.float32) * 1e-3)
            for s in shapes
        ]
        steps[name] = _step_fn(backend, make(), variables, grads)
    for step in steps.values():  # compile and warm up
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    return {
        "backend": backend,
        "keras_version": keras.__version__,
        "num_tensors": len(shapes),
        "num_values": int(sum(np.prod(s) for s in shapes)),
        "median_ms": medians,
        "ratio_to_adamw": {n: m / medians["keras AdamW"] for n, m in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--out", type=Path, default=RESULTS / "keras_step.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.repeats, args.warmup)))
        return

    results = []
    for backend in args.backends:
        if importlib.util.find_spec(backend) is None:
            print(f"{backend}: not installed, skipped")
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats)]
        command += ["--warmup", str(args.warmup)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{backend} worker failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\n{results[0]['num_tensors']} tensors, {results[0]['num_values']:,} values\n")
    print("| backend | contender | median step (ms) | vs Keras AdamW |")
    print("|---|---|---|---|")
    for r in results:
        for name, ms in r["median_ms"].items():
            ratio = r["ratio_to_adamw"][name]
            print(f"| {r['backend']} | {name} | {ms:.1f} | {ratio:.2f}x |")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import atomic_write_json

    payload = {
        "command": "python benchmarks/keras_step.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "repeats": args.repeats,
        "results": results,
    }
    atomic_write_json(args.out, payload)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
