"""``rangerdl sweep``: hyperparameter search with Optuna, every trial an ordinary run folder.

The sweep file (``[sweep]``, ``[sweep.params]`` and training tables) is read and checked by
:mod:`rangerdl.workflow.sweep_spec`; this module runs the study.

Each trial runs ``python -m rangerdl train SWEEP/base.toml --run.dir=SWEEP/trials
--run.name=trial-N --key=value ...`` as a subprocess, so a trial is exactly a run that ``rangerdl
train`` would make (its log in ``SWEEP/logs/trial-N.log``). While it runs, the sweep tails its
``metrics.jsonl`` and reports ``metric`` at every evaluation to the trial; when the pruner says so,
the subprocess is terminated and the trial marked pruned. The final value is read from the run's
``summary.json`` (``val/X`` falls back to ``test/X`` only for runs with ``[data] val_fraction = 0``
on a dataset without a val split, which validate on the test split).

Storage: Optuna's RDB storage, by default the SQLite file ``SWEEP/study.db``. Running the same
command again continues the study: finished trials (complete or pruned) count toward
``n_trials``; a trial whose sweep process died is marked failed (at once when that process ran on
this machine, otherwise by Optuna's heartbeat after ``grace_period_s``), and so is a trial whose
training exits with an error; the sweep goes on. ``--storage`` takes any SQLAlchemy URL, e.g.
``postgresql+psycopg2://user:password@host/db``: several machines running the same command share
one study.

Workers: the same command started several times (on one machine, or on several with one
``--storage``) runs one study together.

- Distinct points: each trial is sampled by a fresh ``[sweep] sampler`` seeded from ``[sweep] seed``
  and the trial's number, which the storage hands out once per study. Workers sample different
  points, and a single worker samples the same points on every fresh run with the same seed.
- ``n_trials`` in all: a worker starts a trial only while fewer than ``n_trials`` trials are
  finished (complete or pruned) or running. When the others' running trials fill the rest, it
  waits for them, since one that fails frees its place, and it exits once ``n_trials`` are
  finished. Workers that pass that check at the same moment each create a trial. A created trial
  with ``n_trials`` trials numbered below it that are finished, running or waiting (enqueued) is not
  run: it is marked failed with the user attribute ``surplus`` and left out of ``trials.json``.
  Trials numbered below a trial were created before it, and states only move forward (waiting,
  running, then finished or failed): had ``n_trials + 1`` trials finished, the highest-numbered
  of them would have counted the others at its check and not run. So the study never holds more
  than ``n_trials`` finished trials, and it holds exactly ``n_trials`` when the workers exit
  (unless trials keep failing: a worker stops with an error after ``n_trials`` failures of its
  own).
- One study, one set of outputs: the worker that creates the study enqueues ``[sweep] enqueue``,
  once. Workers that share the sweep folder open the study and write the outputs in turn, holding
  the lock file ``SWEEP/.sweep.lock``; a worker whose config differs from ``SWEEP/base.toml``
  while trials run from it stops with an error. The outputs are written from the study's state,
  every file replaced atomically and ``trials.json`` last, and a worker exits only once the study
  is done: the first worker to finish writes the complete result, and the others find
  ``trials.json`` already current and leave the files as they are.

Outputs in the sweep folder: ``trials.json`` and a ranked table on stdout, ``best.toml`` (the base
config with the best trial's values: ``rangerdl train SWEEP/best.toml`` reruns it), and
``history.png`` / ``importances.png`` (``optuna.visualization.matplotlib``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rangerdl._lock import FolderInUseError, FolderLock, pid_alive
from rangerdl.workflow import sweep_spec
from rangerdl.workflow.sweep_spec import (
    SearchParam,
    SweepSpec,
    config_with,
    dump_toml,
    load_sweep,
    toml_value,
)

log = logging.getLogger(__name__)

__all__ = ["SearchParam", "SweepSpec", "dump_toml", "load_sweep", "run_sweep"]

POLL_S = 0.2
WAIT_S = 1.0  # how often a worker whose remaining trials all run elsewhere looks at the study


# ---------------------------------------------------------------- one trial


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the trial gets SIGTERM when the sweep process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TrialCrashed(RuntimeError):
    """The trial's training exited with an error; the trial is marked failed."""


class _Tail:
    """New complete lines of a growing ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def lines(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def run_trial(spec: SweepSpec, trial: Any) -> float:
    """The Optuna objective: train one config as a subprocess, report, prune, return the metric."""
    import optuna

    values = {p.key: p.suggest(trial) for p in spec.params}
    name = f"trial-{trial.number}"
    run_dir = spec.folder / "trials" / name
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    cmd = [
        sys.executable,
        "-m",
        "rangerdl",
        "train",
        str(spec.folder / "base.toml"),
        f"--run.dir={spec.folder / 'trials'}",
        f"--run.name={name}",
        "--log.progress=false",
        *(f"--{k}={toml_value(v)}" for k, v in values.items()),
    ]
    log_path = spec.folder / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(trial.study.get_trials(deepcopy=False, states=done_states))
    log.info(
        "%s starts (%d/%d trials finished): %s",
        name,
        done,
        spec.n_trials,
        " ".join(f"{k}={v!r}" for k, v in values.items()),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        tail, reported = _Tail(run_dir / "metrics.jsonl"), set()
        try:
            while True:
                finished = proc.poll() is not None
                for line in tail.lines():
                    step = int(line["step"])
                    if spec.metric in line and step not in reported:
                        reported.add(step)
                        trial.report(float(line[spec.metric]), step)
                        if trial.should_prune():
                            _stop(proc)
                            raise optuna.TrialPruned(f"pruned at step {step}")
                if finished:
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                _stop(proc)
    if proc.returncode != 0:
        raise TrialCrashed(f"{name}: training exited with code {proc.returncode}; see {log_path}")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise TrialCrashed(f"{name}: no {summary_path}; see {log_path}")
    return final_value(json.loads(summary_path.read_text()), spec.metric, name)


def final_value(summary: dict[str, Any], metric: str, name: str = "run") -> float:
    """``metric`` from a run's summary. A run with ``[data] val_fraction = 0`` on a dataset without
    a val split validates on its test split and has no final ``val/``: ``val/X`` falls back to
    ``test/X`` there."""
    for key in (metric, metric.replace("val/", "test/", 1) if metric.startswith("val/") else None):
        if key is not None and key in summary:
            return float(summary[key])
    tags = ", ".join(k for k in sorted(summary) if "/" in k)
    raise TrialCrashed(f"{name}: summary.json has no {metric!r}; it has {tags}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- the study


@contextmanager
def _sweep_lock(spec: SweepSpec) -> Iterator[None]:
    """Held while a worker opens the study or writes the outputs, so that workers sharing the
    sweep folder take turns; the kernel releases it if its holder dies."""
    lock = FolderLock(spec.folder / "sweep", what="sweep folder")  # SWEEP/.sweep.lock
    while True:
        try:
            lock.acquire()
            break
        except FolderInUseError:
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.release()


def _storage(spec: SweepSpec, url: str | None) -> Any:
    import optuna
    from sqlalchemy.exc import IntegrityError

    url = url or f"sqlite:///{(spec.folder / 'study.db').resolve()}"
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # several processes on one file wait, not fail

    def connect() -> Any:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=spec.heartbeat_s,
            grace_period=spec.grace_period_s,
        )

    for _ in range(2):
        try:
            return connect()
        except IntegrityError:
            # Workers on other machines setting up the same new database at once: one of them
            # writes its schema version first; the others find it on the next try.
            time.sleep(1.0)
    return connect()


def _sampler(spec: SweepSpec) -> Any:
    """``[sweep] sampler``, made anew for each trial and seeded from ``[sweep] seed`` and the
    trial's number: unique in the study, so workers sharing it sample distinct points, and the
    same for every fresh run, so a single worker is reproducible."""
    import numpy as np
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial, TrialState

    def make(seed: int) -> optuna.samplers.BaseSampler:
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # constant_liar: other workers' running trials count as bad guesses, so TPE samples away
        # from them (the default from Optuna 5, experimental before)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    class TrialSeeded(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._number: int | None = None
            self._sampler: optuna.samplers.BaseSampler | None = None

        def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
            if self._sampler is None or trial.number != self._number:
                seed = np.random.SeedSequence([spec.seed, trial.number]).generate_state(1)[0]
                self._number, self._sampler = trial.number, make(seed=int(seed))
            return self._sampler

        def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
            self._for(trial).before_trial(study, trial)

        def infer_relative_search_space(
            self, study: optuna.Study, trial: FrozenTrial
        ) -> dict[str, BaseDistribution]:
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(
            self,
            study: optuna.Study,
            trial: FrozenTrial,
            search_space: dict[str, BaseDistribution],
        ) -> dict[str, Any]:
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(
            self,
            study: optuna.Study,
            trial: FrozenTrial,
            param_name: str,
            param_distribution: BaseDistribution,
        ) -> Any:
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def after_trial(
            self,
            study: optuna.Study,
            trial: FrozenTrial,
            state: TrialState,
            values: Any,
        ) -> None:
            self._for(trial).after_trial(study, trial, state, values)

    return TrialSeeded()


def _open_study(spec: SweepSpec, storage: str | None) -> Any:
    """Create the study, or load it where another worker (or an earlier run) created it."""
    import optuna

    kwargs: dict[str, Any] = {
        "storage": _storage(spec, storage),
        "study_name": spec.study_name,
        "sampler": _sampler(spec),
        "pruner": _pruner(spec),
    }
    try:
        study = optuna.create_study(direction=spec.direction, **kwargs)  # type: ignore[arg-type]
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kwargs)
    for params in spec.enqueue:  # by the one worker that created the study: each point once
        study.enqueue_trial(params)
    return study


def _pruner(spec: SweepSpec) -> Any:
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=spec.pruner_warmup_steps
        )
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, spec.base.train.eval_every or 1),
            max_resource=spec.base.train.steps,
        )
    return optuna.pruners.NopPruner()


def _fail_dead_local_trials(study: Any) -> None:
    """RUNNING trials started on this machine by a process that no longer exists: failed now
    (Optuna's heartbeat would do it after the grace period)."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue
        log.warning(
            "trial %d: its sweep process (pid %s) is gone; marking it failed", t.number, pid
        )
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def _alive(pid: int) -> bool:
    return pid == os.getpid() or pid_alive(pid)


class SurplusTrial(RuntimeError):
    """Created by a worker while ``n_trials`` trials numbered below it were finished, running or
    waiting (workers that started a trial at the same moment); marked failed, never run."""


def _claim_place(trial: Any, n_trials: int) -> None:
    """Raise :class:`SurplusTrial` unless fewer than ``n_trials`` trials numbered below ``trial``
    may still finish."""
    from optuna.trial import TrialState

    may_finish = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    trials = trial.study.get_trials(deepcopy=False, states=may_finish)
    ahead = sum(t.number < trial.number for t in trials)
    if ahead >= n_trials:
        trial.set_user_attr("surplus", True)
        raise SurplusTrial(
            f"trial {trial.number} is not run: {ahead} trials numbered below it make up "
            f"n_trials = {n_trials} (workers started trials at the same moment)"
        )


def _wait_for_place(study: Any, spec: SweepSpec) -> bool:
    """Whether this worker starts another trial: False once ``n_trials`` trials are finished;
    while fewer are finished and other workers' running trials make up the rest, it waits, since
    one of those may fail and leave its place to fill."""
    import optuna
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    waiting = False
    while True:
        trials = study.get_trials(deepcopy=False, states=counted)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if len(trials) - running >= spec.n_trials:
            return False
        if len(trials) < spec.n_trials:
            return True
        if not waiting:
            log.info("%d trials running in other workers make up n_trials: waiting", running)
            waiting = True
        time.sleep(WAIT_S)
        _fail_dead_local_trials(study)
        with warnings.catch_warnings():  # experimental; optimize calls it before every trial
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def _write_base(study: Any, spec: SweepSpec) -> None:
    """``SWEEP/base.toml``, the config every trial starts from. Another worker's running trials
    read it too: a different config while they run is an error, not a silent switch."""
    from optuna.trial import TrialState

    from rangerdl._fileio import atomic_write_text

    path, text = spec.folder / "base.toml", dump_toml(spec.base.to_dict())
    if path.is_file() and path.read_text() != text:
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if running:
            raise ValueError(
                f"{path} holds another config, and trials {running} of this study run from it "
                "(another worker?): start every worker with the same sweep file and overrides"
            )
        log.warning("%s holds another config: trials from now on use this one", path)
    atomic_write_text(path, text)


def run_sweep(spec: SweepSpec, storage: str | None = None) -> Any:
    """Run (or continue) the study until ``n_trials`` trials are finished (complete or pruned),
    those of every worker on it counted; returns it. See the module doc on workers."""
    spec.folder.mkdir(parents=True, exist_ok=True)
    with _sweep_lock(spec):
        study = _open_study(spec, storage)
        _fail_dead_local_trials(study)
        _write_base(study, spec)
    failures = 0

    def objective(trial: Any) -> float:
        nonlocal failures
        _claim_place(trial, spec.n_trials)
        try:
            return run_trial(spec, trial)
        except TrialCrashed:
            failures += 1
            raise

    while _wait_for_place(study, spec):
        if failures >= spec.n_trials:
            raise RuntimeError(
                f"{failures} trials failed in this sweep; see {spec.folder / 'logs'}"
            )
        study.optimize(
            objective, n_trials=1, catch=(TrialCrashed, SurplusTrial), gc_after_trial=False
        )
    return study


# ---------------------------------------------------------------- outputs


def ranked(study: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial, best first: complete ones by value, then pruned (by last value), then others.
    Surplus trials (never run, see :class:`SurplusTrial`) are left out."""
    from optuna.trial import TrialState

    sign = 1.0 if spec.direction == "minimize" else -1.0
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        duration = t.duration.total_seconds() if t.duration is not None else None
        order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}.get(t.state, 2)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": value,
                "params": t.params,
                "duration_s": duration,
                "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                "run_dir": t.user_attrs.get("run_dir"),
                "_key": (order, sign * value if value is not None else math.inf, t.number),
            }
        )
    rows.sort(key=lambda r: r.pop("_key"))
    return rows


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    header = ["rank", "trial", "state", metric, *keys, "time", "steps"]
    table = [header]
    for i, r in enumerate(rows, 1):
        table.append(
            [
                str(i),
                str(r["number"]),
                r["state"].lower(),
                "-" if r["value"] is None else f"{r['value']:.5g}",
                *(_fmt(r["params"].get(k)) for k in keys),
                "-" if r["duration_s"] is None else f"{r['duration_s']:.1f} s",
                "-" if r["last_step"] is None else str(r["last_step"]),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_outputs(study: Any, spec: SweepSpec) -> dict[str, Path]:
    """``best.toml``, the plots and ``trials.json``, from the study's state now, each file
    replaced atomically while this worker holds the sweep folder's lock; returns their paths.

    ``trials.json`` is written last, so when it already holds this state's rows, the files beside
    it were written for the same state (by another worker that finished the study with this one)
    and are left as they are."""
    with _sweep_lock(spec):
        return _write_outputs(study, spec)


def _write_outputs(study: Any, spec: SweepSpec) -> dict[str, Path]:
    from optuna.trial import TrialState

    from rangerdl._fileio import atomic_write_text

    trials_path = spec.folder / "trials.json"
    trials_text = json.dumps(ranked(study, spec), indent=1) + "\n"
    if trials_path.is_file() and trials_path.read_text() == trials_text:
        names = ("best.toml", "history.png", "importances.png")
        present = {Path(n).stem: spec.folder / n for n in names if (spec.folder / n).is_file()}
        return {"trials": trials_path, **present}
    out: dict[str, Path] = {}
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        cfg = config_with(spec.base, best.params)
        cfg.run.name, cfg.run.dir = "", "runs"
        header = (
            f"# Best trial of sweep {spec.study_name!r}: trial {best.number}, "
            f"{spec.metric} = {best.value:.6g}\n# params: {json.dumps(best.params)}\n"
        )
        out["best"] = spec.folder / "best.toml"
        atomic_write_text(out["best"], header + dump_toml(cfg.to_dict()))
    out |= _plots(study, spec)
    atomic_write_text(trials_path, trials_text)
    return {"trials": trials_path, **out}


def _plots(study: Any, spec: SweepSpec) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    from rangerdl._fileio import atomic_write_bytes

    written: dict[str, Path] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots: dict[str, Any] = {"history": ovm.plot_optimization_history}
    if len(complete) >= 2:
        plots["importances"] = ovm.plot_param_importances
    for name, fn in plots.items():
        try:
            ax = fn(study)
        except (ValueError, RuntimeError) as exc:  # e.g. every trial has the same value
            log.warning("no %s plot: %s", name, exc)
            continue
        fig: Any = ax.figure
        fig.tight_layout()
        path = spec.folder / f"{name}.png"
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(path, png.getvalue())
        written[name] = path
    return written


# ---------------------------------------------------------------- CLI


def register_sweep(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="hyperparameter search with Optuna; every trial is a run folder",
        description=(sweep_spec.__doc__ or "").split("\n\n", 1)[1].split("\n\nEvery ")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Training values can also be overridden here with --table.key=value.",
    )
    p.add_argument("file", type=Path, help="sweep TOML with a [sweep] table")
    p.add_argument("--dir", type=Path, help="sweep folder (default: [sweep] dir or sweeps/NAME)")
    p.add_argument(
        "--storage",
        help="SQLAlchemy URL of the study database (default: sqlite:///SWEEP/study.db); e.g. "
        "postgresql+psycopg2://user:password@host/db to share one study between machines",
    )
    p.add_argument("--n-trials", type=int, help="override [sweep] n_trials")
    p.set_defaults(run=_sweep, accepts_extra=True)


def _sweep(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        import optuna
    except ImportError:
        raise ValueError("rangerdl sweep needs Optuna: pip install 'rangerdl[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeat_interval and the matplotlib plots are marked experimental by Optuna: a warning
    # on every run that says nothing about the sweep.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    spec = load_sweep(args.file, extra, folder=args.dir)
    if args.n_trials is not None:
        spec.n_trials = args.n_trials
    try:
        study = run_sweep(spec, args.storage)
    except KeyboardInterrupt:
        print(
            f"rangerdl sweep: interrupted; the trial that was running is marked failed. Run the "
            f"same command again to continue the study in {spec.folder}",
            file=sys.stderr,
        )
        return 130
    written = write_outputs(study, spec)
    rows = ranked(study, spec)
    print(format_table(rows, spec.metric))
    print()
    for what, path in written.items():
        print(f"{what}: {path}")
    if "best" in written:
        print(f"rerun the best: rangerdl train {written['best']}")
    return 0
