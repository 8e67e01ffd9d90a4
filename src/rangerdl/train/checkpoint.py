"""Checkpoints as ``RUN_DIR/checkpoints/step-N/`` folders that appear only when complete.

A checkpoint folder holds ``model.pt`` (the weights worth keeping: the Lookahead slow weights),
``state-rank{R}.pt`` per rank (fast weights, optimizer, scheduler, data position, RNG states, step)
and ``MANIFEST.json`` last, listing every file with its SHA-256. Everything is written into
``.tmp-step-N/`` and renamed; tensors and plain types only, read with
``torch.load(weights_only=True)``. A damaged or partial checkpoint is skipped with a warning and
the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rangerdl._fileio import atomic_write_bytes, atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_file(folder: Path, name: str, obj: Any) -> str:
    """Write one ``torch.save`` file into a (temporary) checkpoint folder; returns its SHA-256."""
    data = tensor_bytes(obj)
    atomic_write_bytes(folder / name, data)
    return hashlib.sha256(data).hexdigest()


def staging_dir(checkpoints: Path, step: int) -> Path:
    """The temporary folder of step ``step`` (created empty)."""
    tmp = checkpoints / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(checkpoints: Path, step: int, digests: dict[str, str], keep: int) -> Path:
    """Write the manifest (the completion marker), rename into place, prune to ``keep``."""
    tmp = checkpoints / f".tmp-step-{step}"
    atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": digests}, indent=2) + "\n")
    fsync_dir(tmp)
    final = checkpoints / f"step-{step}"
    if final.exists():  # re-written after a resume from an earlier step
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(checkpoints)
    if keep > 0:
        for old in list_checkpoints(checkpoints)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Completed-looking checkpoint folders, oldest first (not verified)."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify(folder: Path) -> str | None:
    """``None`` when every file listed in the manifest is present with its checksum, else why not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (incomplete checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest} is unreadable: {exc}"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return f"{path} does not match its checksum (damaged)"
    return None


def latest_valid(checkpoints: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
    for folder in reversed(list_checkpoints(checkpoints)):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def resolve(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its latest valid checkpoint)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / MANIFEST).is_file():
        problem = verify(path)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
        return path
    found = latest_valid(path / "checkpoints")
    if found is None:
        raise FileNotFoundError(
            f"{path} holds no complete checkpoint (looked in {path / 'checkpoints'})"
        )
    return found


def load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
