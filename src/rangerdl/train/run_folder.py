"""The run folder: where a run keeps its config, metrics, checkpoints and summary.

::

    RUN_DIR/
      config.json         the resolved config (``rangerdl train --resume`` and ``eval`` read it)
      metrics.jsonl       one JSON object per logged step
      tb/                 TensorBoard events
      checkpoints/        step-N/ folders, each complete when its MANIFEST.json exists
      summary.json        the final metrics, written once the run ends
      launch_id           the torchrun job id (TORCHELASTIC_RUN_ID) that created the run
      config_history.jsonl  what each resume changed (``{"step": N, "changed": {key: [old, new]}}``)
      .rank-check-TOKEN   only while a distributed job starts: proves every rank sees this folder
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rangerdl._fileio import atomic_write_text, fsync_dir
from rangerdl._lock import FolderLock
from rangerdl.train.config import Config, config_changes

if TYPE_CHECKING:
    from rangerdl.train.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "RunFolder",
    "choose_run_folder",
    "commit",
    "latest_valid",
    "list_checkpoints",
    "open_run",
    "prune",
    "record_config",
    "staging_dir",
    "verify",
]


@dataclass(frozen=True)
class RunFolder:
    """The layout of one run folder (paths only; nothing is created here)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def launch_id(self) -> Path:
        return self.path / "launch_id"

    @property
    def config_history(self) -> Path:
        return self.path / "config_history.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def __str__(self) -> str:
        return str(self.path)


def choose_run_folder(
    run_dir: str,
    name: str,
    model_name: str,
    resume: Path | None,
    policy: str = "never",
    suffix: str = "",
) -> RunFolder:
    """The run folder: ``resume`` as given, else ``run_dir/name`` (``name`` empty:
    ``MODEL-YYYYmmdd-HHMMSS``, or ``MODEL-RUN_ID`` under torchrun), ``suffix`` appended (a
    torchft replica group's ``-group{i}``). A fresh run never writes into
    an existing run, except with ``policy = "auto"``, or when the folder is this torchrun job's own
    (named by its run id, or created by a launch with the same ``TORCHELASTIC_RUN_ID``, i.e. a
    restart of it on any node), which continues from its latest checkpoint. The decision is taken
    from the folder and the launch, not from ``TORCHELASTIC_RESTART_COUNT``, which is counted per
    node (pytorch/pytorch#108158).

    Raises:
        FileNotFoundError: ``resume`` has no ``config.json``.
        ValueError: a fresh run's folder exists and is not empty.
    """
    if resume is not None:
        folder = RunFolder(resume)
        if not folder.config.is_file():
            raise FileNotFoundError(f"{resume} is not a run folder (no {folder.config.name})")
        return folder
    model = model_name.replace(":", "-").replace(".", "-")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    name_given = bool(name)
    name = name or (
        f"{model}-{run_id}" if run_id else datetime.now().strftime(f"{model}-%Y%m%d-%H%M%S")
    )
    path = Path(run_dir) / f"{name}{suffix}"
    folder = RunFolder(path)
    recorded = folder.launch_id.read_text().strip() if folder.launch_id.is_file() else None
    own_job = bool(run_id) and (not name_given or recorded == run_id)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    used = path.exists() and any(not p.name.startswith(CHECK_PREFIX) for p in path.iterdir())
    if used and not (restarted or own_job or policy == "auto"):
        raise ValueError(
            f"run folder {path} already exists; continue it with `rangerdl train --resume {path}` "
            "(or set --run.resume=auto), or choose another name with --run.name=NAME"
        )
    return folder


def open_run(
    cfg: Config, rt: Runtime, resume: Path | None, held: contextlib.ExitStack
) -> tuple[RunFolder, Path | None]:
    """The run folder (chosen and locked on rank 0: a second job in it is refused, naming the
    holder's PID) and the checkpoint to continue from, if any (rank 0's pick). Ranks that
    disagree on the config, or that do not see the folder rank 0 chose (a relative ``run.dir``
    from another working directory, a node without the shared file system), fail here on every
    rank, naming the keys or both folders.

    Raises:
        ValueError: ranks with different configs, or not seeing one folder; a fresh run in an
            existing folder; a folder another job holds (naming its PID).
        FileNotFoundError: a run whose checkpoints are all damaged.
    """
    everyone = rt.all_gather_object(cfg.rank_agreed())
    differ = sorted({k for other in everyone for k, v in other.items() if everyone[0].get(k) != v})
    if differ:
        raise ValueError(
            f"the ranks of this job were given different configs: {', '.join(differ)} differ "
            "(every rank must get the same config file and overrides)"
        )
    from rangerdl.train.runtime import peer_error, raise_peer_error  # (imports torch)

    chosen, offer = None, None
    suffix, policy = "", cfg.run.resume
    if cfg.distributed.backend == "torchft":  # each replica group its own folder
        suffix = f"-group{cfg.distributed.group_index()}"
        if cfg.run.name:  # a restarted group continues its folder, then heals from its peers
            policy = "auto"
    if rt.is_main:
        try:
            chosen = choose_run_folder(
                cfg.run.dir, cfg.run.name, cfg.model.name, resume, policy, suffix
            )
            chosen.path.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(FolderLock(chosen.path, what="run folder"))
            offer = _offer_folder(chosen, rt)
        except (ValueError, OSError) as exc:
            if not rt.distributed:
                raise
            rt.broadcast_object(
                {"error": peer_error(exc)}
            )  # the other ranks refuse with it, not hang
            raise
    offer = rt.broadcast_object(offer)
    if "error" in offer:
        raise_peer_error(offer["error"], "rank 0 cannot use the run folder")
    run = chosen if chosen is not None else RunFolder(resume or Path(cfg.run.dir) / offer["name"])
    if rt.distributed:
        _check_same_folder(run, offer["path"], offer["token"], rt)
    return run, _resume_point(run, rt)


CHECK_PREFIX = ".rank-check-"
"""A file rank 0 writes into the run folder at start (named and filled with a fresh random token)
so that each rank can prove it sees that very folder; removed once every rank looked."""


def _offer_folder(chosen: RunFolder, rt: Runtime) -> dict[str, Any]:
    """Rank 0's folder as the others check it: its resolved path, name and check token."""
    token = ""
    if rt.distributed:
        token = secrets.token_hex(16)
        chosen.path.mkdir(exist_ok=True)
        atomic_write_text(chosen.path / f"{CHECK_PREFIX}{token}", token)
    return {"path": str(chosen.path.resolve()), "name": chosen.path.name, "token": token}


def _check_same_folder(run: RunFolder, main_path: str, token: str, rt: Runtime) -> None:
    """Every rank looks for rank 0's check file in its own ``run`` (the name does not matter: a
    link or another mount point of the same folder passes); all refuse if one does not see it."""
    check = run.path / f"{CHECK_PREFIX}{token}"
    try:
        seen = check.read_text() == token
    except OSError:
        seen = False
    problem = None
    if not seen:
        why = "another folder, without rank 0's check file"
        if not run.path.is_dir():
            why = "which does not exist on this rank"
        problem = (
            f"rank {rt.rank} does not see the run folder rank 0 writes to: rank 0 uses "
            f"{main_path}, this rank's resolves to {run.path.resolve()} ({why}); every rank "
            "writes its own state-rank{R}.pt into the checkpoints there, so all ranks need one "
            "shared folder: give run.dir (or --resume) as an absolute path on a file system "
            "every node mounts"
        )
    everyone = rt.all_gather_object(problem)
    if rt.is_main:
        check.unlink(missing_ok=True)
    first = next((p for p in everyone if p), None)
    if first:
        raise ValueError(first)


def _resume_point(run: RunFolder, rt: Runtime) -> Path | None:
    """The newest complete checkpoint, picked on rank 0 (which moves damaged ones aside) so that
    every rank continues from the same step."""
    picked = None
    if rt.is_main:
        start = latest_valid(run.checkpoints, move_damaged=True) if run.path.exists() else None
        damaged = [] if start else sorted(d.name for d in run.checkpoints.glob("damaged-step-*"))
        picked = (start.name if start else None, damaged)
    name, damaged = rt.broadcast_object(picked)
    if damaged:
        raise FileNotFoundError(
            f"{run} holds no complete checkpoint to resume from; the damaged ones were moved "
            f"aside: {', '.join(damaged)}"
        )
    if name is None and run.config.is_file() and rt.is_main:
        log.warning("%s has no complete checkpoint yet: starting it from step 0", run)
    return run.checkpoints / name if name else None


def record_config(run: RunFolder, cfg: Config, step: int) -> None:
    """Save the config (a resume's changes also go to the history) and this launch's torchrun id
    (a restart of the same job continues the run: see ``choose_run_folder``)."""
    run.path.mkdir(parents=True, exist_ok=True)
    changed = {}
    if run.config.is_file():
        changed = config_changes(Config.from_dict(json.loads(run.config.read_text())), cfg)
        if changed:
            log.info("resuming at step %d with changes: %s", step, changed)
            with open(run.config_history, "a") as fh:
                fh.write(json.dumps({"step": step, "changed": changed}) + "\n")
    if changed or not run.config.is_file():
        cfg.save(run.config)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        atomic_write_text(run.launch_id, os.environ["TORCHELASTIC_RUN_ID"] + "\n")


# ------------------------------------------------------------------ checkpoint folders
# ``checkpoints/step-N/`` folders as files: staged in ``.tmp-step-N/``, complete once
# MANIFEST.json (every file's SHA-256) is in place; what they hold is checkpoint.py's.
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    _verified.add(final)
    if keep > 0:
        prune(checkpoints, step, keep)
    return final


_verified: set[Path] = set()  # checkpoint folders this process wrote or verified


def prune(checkpoints: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints that verify, at or below ``step`` (the one just
    written counts first); delete older ones. A damaged one is moved aside with a warning and
    never counted, so retention never deletes the last good checkpoints."""
    found = [c for c in list_checkpoints(checkpoints) if int(c.name.split("-")[1]) <= step]
    kept = 0
    for folder in reversed(found):
        if kept >= keep:
            _verified.discard(folder)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        problem = None if folder in _verified else verify(folder)
        if problem is None:
            _verified.add(folder)
            kept += 1
            continue
        _move_aside(folder, problem)


def _move_aside(folder: Path, problem: str) -> None:
    aside = folder.with_name(f"damaged-{folder.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    log.warning("skipping checkpoint %s: %s; moved aside to %s", folder, problem, aside)


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
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise ValueError("'files' is not a table of file names and checksums")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{manifest} is unreadable: {exc}"
    for name, digest in files.items():
        if "/" in name or name.startswith("."):
            return f"{manifest} names a file outside the checkpoint: {name!r}"
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        with path.open("rb") as f:  # streamed: a large model.pt is not read into memory
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                return f"{path} does not match its checksum (damaged)"
    return None


def latest_valid(checkpoints: Path, *, move_damaged: bool = False) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning.

    ``move_damaged`` (a run about to continue from the result): each damaged checkpoint newer
    than it is renamed ``damaged-step-N`` (named in the warning), so retention never counts it and
    the steps it covered are written again.
    """
    for folder in reversed(list_checkpoints(checkpoints)):
        problem = verify(folder)
        if problem is None:
            _verified.add(folder)
            return folder
        if move_damaged:
            _move_aside(folder, problem)
        else:
            log.warning("skipping checkpoint %s: %s", folder, problem)
    return None
