"""Checkpoints as ``RUN_DIR/checkpoints/step-N/`` folders that appear only when complete:
:class:`Checkpointer` saves and restores a run's state. The folders themselves (staging, the
manifest, verification, retention) are the run folder's (:mod:`rangerdl.train.run_folder`); this
module writes and reads what is in them.

A checkpoint folder holds ``model.pt`` (the weights worth keeping: the Lookahead slow weights),
``state-rank{R}.pt`` per rank (fast weights, optimizer, scheduler, data position, RNG states, step)
and ``MANIFEST.json`` last, listing every file with its SHA-256. Everything is written into
``.tmp-step-N/`` and renamed; tensors and plain types only, read with
``torch.load(weights_only=True)``. A damaged or partial checkpoint is skipped with a warning and
the previous one is used.

Loading into live objects goes through :func:`load_state`: the saved keys, shapes and dtypes are
compared with the model's (and the optimizer's per-parameter state with its parameters) while the
file is only mapped (``mmap=True``), so a checkpoint that does not fit is an error naming the file,
the keys and both shapes before any tensor data is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rangerdl._fileio import atomic_write_bytes
from rangerdl.optim import use_slow_weights
from rangerdl.train.optimizers import TrainOptimizer
from rangerdl.train.run_folder import (
    MANIFEST,
    RunFolder,
    commit,
    latest_valid,
    staging_dir,
    verify,
)
from rangerdl.train.runtime import Runtime, rng_state, set_rng_state


def tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_file(folder: Path, name: str, obj: Any) -> str:
    """Write one ``torch.save`` file into a (temporary) checkpoint folder; returns its SHA-256."""
    data = tensor_bytes(obj)
    atomic_write_bytes(folder / name, data)
    return hashlib.sha256(data).hexdigest()


def resolve(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its latest valid checkpoint)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / MANIFEST).is_file():
        problem = verify(path)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
        return path
    checkpoints = RunFolder(path).checkpoints
    found = latest_valid(checkpoints)
    if found is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (looked in {checkpoints})")
    return found


def load(path: Path, *, mmap: bool = False) -> Any:
    """A checkpoint file: tensors and plain types only (``weights_only=True``). ``mmap``: the
    tensors view the file (read on first use), so their shapes can be checked before any data
    is read; copy what outlives the check (see :func:`load_state`).

    Raises:
        ValueError: the file holds other objects (pickled code) or is not a torch file.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            first = "it holds objects other than tensors and plain types"
        raise ValueError(
            f"{path}: not a loadable checkpoint file ({first}); refusing to load it"
        ) from None


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed (a full disk, ...); the message names it and the last complete
    one, and the partial files are gone."""


class CheckpointMismatchError(ValueError):
    """A saved state does not fit the live object it is loaded into (other keys, shapes or
    dtypes); the message names the file, the keys and both shapes. Bad input, so a
    ``ValueError``: the CLI reports it as one line."""


_SHOWN = 4
"""Mismatching keys named in full in an error; the rest are counted."""


def load_state(
    target: Any, state: Any, *, path: Path, part: str, built_by: str = "", hint: str = ""
) -> None:
    """``target.load_state_dict(state)``, every mismatch a :class:`CheckpointMismatchError`.

    For an ``nn.Module`` the keys, shapes and dtypes are compared with ``target.state_dict()``
    first, and for an optimizer the parameter groups and the shape of each parameter's state,
    so a state loaded with ``load(path, mmap=True)`` is rejected before its data is read (and
    an optimizer never steps with state of another shape). ``state`` is only read here: an
    optimizer keeps the tensors it is given, so pass it copies of mapped ones.

    Args:
        target: the live object (model, optimizer, scheduler, sampler).
        state: its saved ``state_dict()``.
        path: the file it came from (named in the error).
        part: what it is (``"model"``, ``"optimizer"``, ...), named in the error.
        built_by: what built ``target`` (a config file and its arguments), named in the error.
        hint: what to check, appended to the error.

    Raises:
        CheckpointMismatchError: naming ``path``, ``part``, the keys and both shapes.
    """
    if isinstance(target, nn.Module):
        problems = module_mismatches(target, state)
    elif isinstance(target, torch.optim.Optimizer):
        problems = optimizer_mismatches(target, state)
    else:
        problems = []
    whose = built_by or f"this job's {part}"
    if not problems:
        try:
            target.load_state_dict(state)
            return
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            problems = [str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)]
    raise CheckpointMismatchError(
        f"{path}: the saved {part} state does not fit {whose}: {'; '.join(problems)}"
        + (f"; {hint}" if hint else "")
    )


def module_mismatches(module: nn.Module, state: Any) -> list[str]:
    """How ``state`` differs from ``module.state_dict()`` in keys, shapes and dtypes (empty when it
    fits); reads no tensor data."""
    if not isinstance(state, Mapping):
        return [f"it holds a {type(state).__name__}, not a state dict"]
    expected = module.state_dict()
    differ = []
    for key, want in expected.items():
        got = state.get(key)
        if key not in state or not isinstance(want, Tensor):
            continue
        if not isinstance(got, Tensor):
            differ.append(f"{key} is a {type(got).__name__} in the file, a tensor in the model")
        elif got.shape != want.shape:
            differ.append(
                f"{key} has shape {_shape(got)} in the file and {_shape(want)} in the model"
            )
        elif got.dtype != want.dtype:
            differ.append(f"{key} has dtype {got.dtype} in the file and {want.dtype} in the model")
    problems = _first(differ)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing from the file: {', '.join(_first(missing))}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(_first(unexpected))}")
    return problems


def optimizer_mismatches(optimizer: torch.optim.Optimizer, state: Any) -> list[str]:
    """How ``state`` (an optimizer's saved ``state_dict()``) does not fit ``optimizer``: other
    parameter groups, or per-parameter state of another shape than its parameter. Reads no
    tensor data."""
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list):
        return ["it holds no parameter groups (not an optimizer state dict)"]
    saved = [g.get("params", []) if isinstance(g, Mapping) else [] for g in state["param_groups"]]
    live = [group["params"] for group in optimizer.param_groups]
    if len(saved) != len(live):
        return [f"{len(saved)} parameter group(s) in the file, {len(live)} in the optimizer"]
    for n, (ids, group) in enumerate(zip(saved, live, strict=True)):
        if len(ids) != len(group):
            return [
                f"group {n} has {len(ids)} parameters in the file, {len(group)} in the optimizer"
            ]
    params = [p for ps in live for p in ps]
    differ = []
    for entries in (state, state.get("inner")):  # Lookahead keeps the inner optimizer's apart
        if not isinstance(entries, Mapping) or not isinstance(entries.get("state"), Mapping):
            continue
        groups = entries.get("param_groups")
        groups = groups if isinstance(groups, list) else []
        ids = [i for g in groups if isinstance(g, Mapping) for i in g.get("params", [])]
        if len(ids) != len(params):  # load_state_dict names this one
            continue
        for n, (i, p) in enumerate(zip(ids, params, strict=True)):
            values = entries["state"].get(i)
            for key, value in values.items() if isinstance(values, Mapping) else ():
                if isinstance(value, Tensor) and value.ndim and value.shape != p.shape:
                    differ.append(
                        f"{key} of parameter {n} has shape {_shape(value)} in the file and "
                        f"{_shape(p)} in the model"
                    )
    return _first(differ)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _first(items: list[str]) -> list[str]:
    """``items``, the ones past :data:`_SHOWN` counted (an error stays one readable line)."""
    if len(items) <= _SHOWN:
        return list(items)
    return [*items[:_SHOWN], f"{len(items) - _SHOWN} more not shown"]


def in_memory(obj: Any) -> Any:
    """``obj`` with every tensor copied into memory (out of a file loaded with ``mmap=True``)."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: in_memory(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(in_memory(v) for v in obj)
    return obj


@dataclass
class Checkpointer:
    """Saves the run's state every ``every`` steps (and when asked) and restores it.

    Per rank, ``state-rank{R}.pt`` holds :attr:`PARTS` (each object's ``state_dict()``), the RNG
    states, the step, the world size and the training seconds so far; ``model.pt`` (rank 0) holds
    the model with the slow weights swapped in. All ranks take part in :meth:`save`.
    """

    PARTS = ("model", "optimizer", "schedule", "sampler")
    """The objects whose ``state_dict()`` a checkpoint holds (attributes of this class)."""

    run: RunFolder
    rt: Runtime
    model: nn.Module
    optimizer: TrainOptimizer
    schedule: Any
    sampler: Any
    every: int
    keep: int

    def due(self, step: int, last_step: int) -> bool:
        """A periodic checkpoint is due after ``step`` (the last step's is written by the caller,
        after the final sync)."""
        return bool(self.every) and step % self.every == 0 and step < last_step

    def save(self, step: int, elapsed_s: float) -> Path:
        """Write ``step-{step}`` (a collective: every rank writes its state, rank 0 the model and
        the manifest); prune to the newest ``keep``. Returns the folder."""
        folder = self.run.checkpoints
        tmp = folder / f".tmp-step-{step}"
        try:
            return self._save(step, elapsed_s, folder, tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            last = latest_valid(folder)
            raise CheckpointError(
                f"writing checkpoint {self.run.checkpoint(step)} failed: {exc}; the temporary files "
                f"were removed; the last complete checkpoint is "
                f"{last if last is not None else 'none'}"
            ) from exc

    def _save(self, step: int, elapsed_s: float, folder: Path, tmp: Path) -> Path:
        if self.rt.is_main:
            staging_dir(folder, step)
        self.rt.barrier()
        state = {
            "step": step,
            "world_size": self.rt.world_size,
            "elapsed_s": elapsed_s,
            **{name: self._part(name).state_dict() for name in self.PARTS},
            "rng": rng_state(),
        }
        name = f"state-rank{self.rt.rank}.pt"
        digests = {name: write_file(tmp, name, state)}
        with use_slow_weights(self.optimizer):
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.rt.distributed:
            digests = {k: v for d in self.rt.all_gather_object(digests) for k, v in d.items()}
        if self.rt.is_main:
            digests["model.pt"] = write_file(tmp, "model.pt", weights)
            commit(folder, step, digests, self.keep)
        self.rt.barrier()
        return self.run.checkpoint(step)

    def restore(self, folder: Path) -> tuple[int, float]:
        """Load this rank's state from ``folder``; returns ``(step, training seconds so far)``.

        Raises:
            FileNotFoundError: this rank's file is missing (another world size?).
            ValueError: the checkpoint was written by another number of workers.
            CheckpointMismatchError: a saved state does not fit this job's model, optimizer,
                schedule or sampler (naming the keys and shapes).
        """
        path = folder / f"state-rank{self.rt.rank}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: was {folder} written by a job with another world size?"
            )
        state = load(path, mmap=True)  # shapes are checked before any tensor data is read
        if not isinstance(state, dict) or not all(
            k in state for k in (*self.PARTS, "rng", "step", "elapsed_s", "world_size")
        ):
            raise ValueError(f"{path}: not a rangerdl training state (missing entries)")
        if state["world_size"] != self.rt.world_size:
            raise ValueError(
                f"{folder} was written by {state['world_size']} workers, this job has "
                f"{self.rt.world_size}: each worker's optimizer state is its own, so resume with "
                "the same number of workers"
            )
        hint = "was the model, optimizer or dataset changed since the checkpoint was written?"
        for name in self.PARTS:
            if name == "model":  # copies the tensors into its own
                built_by = self._model_source()
                load_state(
                    self.model, state[name], path=path, part=name, built_by=built_by, hint=hint
                )
            else:  # the others keep the tensors they are given: copy them out of the map
                part = self._part(name)
                load_state(part, in_memory(state[name]), path=path, part=name, hint=hint)
        set_rng_state(in_memory(state["rng"]))
        return int(state["step"]), float(state["elapsed_s"])

    def _model_source(self) -> str:
        """This job's model, with the ``[model]`` table of the run's ``config.json``."""
        config = self.run.config
        try:
            table = json.loads(config.read_text())["model"]
            described = f"name={table['name']!r}, args={table.get('args', {})!r}"
        except (OSError, ValueError, KeyError, TypeError):
            return "this job's model"
        return f"this job's model ({config} has [model] {described})"

    def _part(self, name: str) -> Any:
        return self.optimizer.optimizer if name == "optimizer" else getattr(self, name)
