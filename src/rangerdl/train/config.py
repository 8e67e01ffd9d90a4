"""Training configuration: one dataclass per TOML table, a docstring per field.

Precedence: command line (``--table.key=value``) > TOML file > the defaults below. An unknown table
or key, a value of the wrong type, or a number outside its range (:data:`LIMITS`: finite, and
bounded where a larger value would allocate or wait without end) is a ``ValueError`` that names it
and says what is valid. The resolved configuration is saved with the run as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rangerdl.distributed.options import MAX_BLOCK_SIZE, SyncOptions

__all__ = [
    "LIMITS",
    "Bounds",
    "Config",
    "DataConfig",
    "DistributedConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_config",
]


@dataclass
class RunConfig:
    name: str = ""
    """Run name; the run folder is ``dir/name``. Empty: ``MODEL-YYYYmmdd-HHMMSS`` (under torchrun:
    ``MODEL-RUN_ID``, so that an elastic restart finds its own folder)."""
    dir: str = "runs"
    """Parent folder of run folders."""
    seed: int = 0
    """Seed for model initialisation, data order and dropout. Same seed, same config: same result."""
    data_seed: int = -1
    """Seed of the training data order alone (the sampler's shuffle); -1: ``seed``. Set it apart
    from ``seed`` to tell how much of a seed's result comes from the initial weights and how much
    from the order of the data. A held-out validation set stays ``seed``'s."""
    resume: str = "never"
    """``never``: a fresh run refuses an existing run folder (continue it with ``--resume``);
    ``auto``: continue the run in ``dir/name`` when it exists (from its latest complete
    checkpoint, or from step 0 if it has none), else start it. Elastic and multi-node jobs
    (torchrun restarts) should use ``auto`` with a fixed ``name``."""


@dataclass
class DataConfig:
    source: str = "digits"
    """Built-in dataset, prepared on first use into the cache folder: ``digits`` or ``text``."""
    path: str = ""
    """A dataset prepared with ``rangerdl data prepare`` (a folder with ``train/`` and ``test/``).
    Overrides ``source`` when set."""
    cache_dir: str = ""
    """Where built-in sources are prepared. Default: ``$RANGERDL_CACHE`` or ``~/.cache/rangerdl``."""
    seq_len: int = 128
    """Window length for the built-in ``text`` source."""
    text_sources: list[str] = field(default_factory=list)
    """Files, directories (recursive) or glob patterns (``**`` recursive) the built-in ``text``
    source reads instead of the Python standard library, e.g. ``["~/notes/**/*.md"]``. Prepared
    once per list and ``seq_len`` into the cache folder; a changed file is not noticed (remove
    the cache's ``text-L*-*`` folder, or prepare the data with ``rangerdl data prepare text``
    and set ``path``)."""
    batch_size: int = 64
    """Global batch size: samples per optimizer step summed over all workers."""
    eval_batch_size: int = 256
    """Batch size for validation and test passes."""
    val_fraction: float = 0.1
    """When the dataset has no ``val`` split: this fraction of ``train`` (a random set, seeded by
    ``[run] seed``) is held out for periodic validation, so the test split is evaluated once, at
    the end. ``0``: validate on the test split instead (the log says so)."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""
    drop_last: bool = True
    """Drop the last partial global batch of each epoch (its samples are counted in the log)."""


@dataclass
class ModelConfig:
    name: str = "cnn"
    """``mlp``, ``cnn``, ``gpt``, or ``"package.module:factory"`` for your own model. A factory is
    called with the dataset's ``task``-specific keywords it accepts (``input_shape``,
    ``num_classes``, ``vocab_size``, ``seq_len``) plus ``args``."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the model factory (``[model.args]`` table)."""


@dataclass
class OptimConfig:
    name: str = "ranger"
    """``ranger``, ``adamw``, ``radam`` or ``sgd``."""
    lr: float = 3e-3
    """Peak learning rate (the schedule scales it)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW style for ranger/adamw/radam; L2 for sgd)."""
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    """Adam betas (ranger, adamw, radam)."""
    eps: float = 1e-5
    """Adam epsilon (ranger, adamw, radam)."""
    momentum: float = 0.9
    """SGD momentum."""
    k: int = 6
    """Lookahead period in steps (ranger, or any optimizer with ``lookahead = true``)."""
    alpha: float = 0.5
    """Lookahead slow step size."""
    use_gc: bool = True
    """Gradient centralisation (ranger)."""
    gc_conv_only: bool = False
    """Centralise only conv kernels (ranger)."""
    threshold: float = 5.0
    """RAdam rectification threshold (ranger)."""
    lookahead: bool = False
    """Wrap adamw, radam or sgd in Lookahead(k, alpha). Ranger has it built in."""


@dataclass
class ScheduleConfig:
    name: str = "flat_anneal"
    """``constant``, ``warmup`` (linear warmup, then constant), ``cosine`` (warmup, then cosine) or
    ``flat_anneal`` (flat, then cosine to ``min_lr_ratio``: the schedule of Ranger's records)."""
    warmup_steps: int = 0
    """Linear warmup steps (warmup, cosine)."""
    anneal_start: float = 0.72
    """Fraction of the steps after which ``flat_anneal`` starts annealing."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr`` (cosine, flat_anneal)."""


@dataclass
class TrainConfig:
    steps: int = 600
    """Optimizer steps to train for (a resumed run continues up to this number)."""
    stop_at: int = 0
    """Stop after this step as if interrupted (0: run to ``steps``). The schedule still spans
    ``steps``; continue with ``rangerdl train --resume RUN_DIR``. For time-boxed jobs."""
    eval_every: int = 120
    """Validate every this many steps (0: only at the end)."""
    eval_batches: int = 0
    """Limit the periodic validation to this many batches (0: the whole split)."""
    final_eval_batches: int = 0
    """Limit the final validation and test to this many batches each (0: the whole splits). Set
    it to ``eval_batches`` for one metric along the whole curve (the final point then scores the
    same windows as the periodic ones) and a cheap end of run."""
    checkpoint_every: int = 300
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the last this many checkpoints."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value (0: off)."""
    on_nan: str = "stop"
    """A NaN/Inf loss on any rank: ``stop`` (exit naming the step and whether the batch itself held
    non-finite values) or ``skip`` (every rank drops the step: no parameter, buffer or optimizer
    state changes; the step still counts)."""
    max_nan_skips: int = 10
    """With ``on_nan = "skip"``: stop with an error after this many consecutive skipped steps."""
    log_every: int = 1
    """Log ``train/loss`` every this many steps."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    threads: int = 0
    """torch intra-op threads per process. 0: ``OMP_NUM_THREADS`` if set, else one per physical
    core for a single process and 1 per process when several share a node (as torchrun does)."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard events to ``RUN_DIR/tb``."""
    progress: bool = True
    """A progress bar on rank 0 (plain log lines when not a terminal)."""
    wandb: bool = False
    """Log config, metrics (TensorBoard's tags) and summary to Weights & Biases (``pip install
    'rangerdl[wandb]'``). The W&B run id is kept in ``RUN_DIR/wandb_run_id``: ``--resume``
    continues the same W&B run."""
    wandb_project: str = "rangerdl"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (user or team; empty: your default)."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    wandb_mode: str = ""
    """``online``, ``offline`` (no account or network; upload later with ``wandb sync``),
    ``disabled``, or empty: W&B's default (``$WANDB_MODE``, else online)."""


@dataclass
class DistributedConfig(SyncOptions):
    """The sync options (``rangerdl.distributed.SyncOptions``: ``sync_every``, ``outer_lr``,
    ``outer_momentum``, ``nesterov``, ``sync_every_warmup_steps``, ``overlap``,
    ``overlap_steps``, ``eager``, ``shard_slow``, ``comm_dtype``, ``compression``, ``block_size``,
    ``topk_density``, ``error_feedback``, ``buffer_policy``), plus how the job runs."""

    strategy: str = "lookahead"
    """``lookahead``: workers step locally and sync the Lookahead slow weights every
    ``sync_every`` steps; ``ddp``: torch DistributedDataParallel (gradient all-reduce every step);
    ``post_local_sgd``: torch PostLocalSGDOptimizer (periodic model averaging)."""
    backend: str = "auto"
    """``auto`` (NCCL on CUDA, gloo on CPU), ``gloo`` or ``nccl`` (``torchrun``); ``torchft``:
    replica groups, each started on its own with ``rangerdl train`` (one process) or ``torchrun
    ... -m rangerdl train`` (several, each a worker of its own); the outer sync goes through a
    torchft Lighthouse, and groups that die and come back heal from a live peer while the others
    train on (``rangerdl.distributed.ft``; ``pip install "rangerdl[ft]"``)."""
    timeout_s: float = 300.0
    """Collective timeout: a rank that stops answering fails the job instead of hanging it."""
    lighthouse: str = ""
    """``backend = "torchft"``: the Lighthouse's ``HOST:PORT`` (``rangerdl lighthouse``); empty:
    ``$TORCHFT_LIGHTHOUSE``."""
    replica_group: int = -1
    """``backend = "torchft"``: this group's index, ``0 .. replica_groups - 1``: its share of each
    global batch and its run folder (``NAME-group{i}``); a restarted group reuses it. ``-1``:
    ``$REPLICA_GROUP_ID``."""
    replica_groups: int = 0
    """``backend = "torchft"``: how many replica groups share the data. With ``L`` processes
    per group, rank ``r`` of group ``i`` reads the ``(i L + r)``-th ``batch_size /
    (replica_groups L)`` samples of each global batch (one process: group ``i`` the ``i``-th)."""
    min_replicas: int = 1
    """``backend = "torchft"``: the fewest groups a sync may commit with."""
    quorum_timeout_s: float = 600.0
    """``backend = "torchft"``: how long a sync waits for its quorum (the slowest group's
    ``sync_every`` steps must fit in it)."""
    hostname: str = ""
    """``backend = "torchft"``: the address the other groups reach this one at (healing, the
    collectives); empty: this machine's host name."""

    def group_index(self) -> int:
        """``backend = "torchft"``: this process's replica group, ``replica_group`` or (when
        ``-1``) ``$REPLICA_GROUP_ID``; ``ValueError`` when neither is set or it is out of range."""
        i, raw = self.replica_group, os.environ.get("REPLICA_GROUP_ID", "")
        if i < 0 and raw:
            i = int(raw) if raw.isdigit() else -1
            if not 0 <= i < self.replica_groups:
                raise ValueError(
                    f"REPLICA_GROUP_ID={raw!r}: expected a group index in "
                    f"[0, {self.replica_groups}) ([distributed] replica_groups)"
                )
        if i < 0:
            raise ValueError(
                "[distributed] backend = 'torchft': which replica group is this process? "
                "--distributed.replica_group=I (or REPLICA_GROUP_ID=I), I in "
                f"[0, {self.replica_groups})"
            )
        return i

    def validate_torchft(self, batch_size: int) -> None:
        """``backend = "torchft"``: the keys it needs and the options it cannot run, each error
        naming its key (the numbers' ranges are :data:`LIMITS`')."""
        if self.backend != "torchft":
            return
        if self.strategy != "lookahead":
            raise ValueError(
                f"[distributed] backend = 'torchft' runs distributed Lookahead only; strategy = "
                f"{self.strategy!r} needs torchrun (backend = 'auto')"
            )
        n, i = self.replica_groups, self.replica_group
        if n < 1:
            raise ValueError(
                "[distributed] backend = 'torchft' needs replica_groups = N (how many groups "
                "share the data), e.g. --distributed.replica_groups=2"
            )
        if i >= n:
            raise ValueError(
                f"[distributed] replica_group must be in [0, {n}) (this group's index; "
                f"--distributed.replica_group=I), got {i}"
            )
        if batch_size % n:
            raise ValueError(
                f"[data] batch_size = {batch_size} (the global batch) must be divisible by "
                f"[distributed] replica_groups = {n}"
            )
        if not (self.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
            raise ValueError(
                "[distributed] backend = 'torchft' needs the Lighthouse's address: "
                "--distributed.lighthouse=HOST:PORT (or TORCHFT_LIGHTHOUSE); start one with "
                "`rangerdl lighthouse`"
            )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rank_agreed(self) -> dict[str, Any]:
        """``{"table.key": value}`` for every value all ranks of a job must share (all but
        :data:`PER_RANK_KEYS`)."""
        return {
            f"{table}.{key}": value
            for table, values in self.to_dict().items()
            for key, value in values.items()
            if f"{table}.{key}" not in PER_RANK_KEYS
        }

    def save(self, path: Path) -> None:
        from rangerdl._fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, origin: str = "config") -> Config:
        cfg = cls()
        apply_tables(cfg, raw, origin=origin)
        return cfg

    def validate(self) -> None:
        """Choices, number ranges (:data:`LIMITS`) and checks that span fields; types are
        checked when values are applied."""
        from rangerdl.optim.schedules import SCHEDULES
        from rangerdl.train.choices import (
            BACKENDS,
            BUILTIN_SOURCES,
            ON_NAN,
            OPTIMIZERS,
            RESUME_POLICIES,
            STRATEGIES,
            WANDB_MODES,
        )

        choices = {
            ("optim", "name"): OPTIMIZERS,
            ("schedule", "name"): SCHEDULES,
            ("train", "on_nan"): ON_NAN,
            ("run", "resume"): RESUME_POLICIES,
            ("distributed", "strategy"): STRATEGIES,
            ("distributed", "backend"): BACKENDS,
            ("log", "wandb_mode"): WANDB_MODES,
        }
        if not self.data.path:
            choices["data", "source"] = BUILTIN_SOURCES
        for (table, key), valid in choices.items():
            value = getattr(getattr(self, table), key)
            if value not in valid:
                raise ValueError(f"[{table}] {key} = {value!r}: expected one of {', '.join(valid)}")
        for name, bounds in LIMITS.items():
            table, key = name.split(".")
            value = getattr(getattr(self, table), key)
            for item in value if isinstance(value, list) else [value]:
                bounds.check(item, f"[{table}] {key}")
        if self.data.text_sources and (self.data.path or self.data.source != "text"):
            raise ValueError(
                "[data] text_sources is read by the built-in text source only: set "
                'source = "text" and no path'
            )
        if not all(isinstance(s, str) and s for s in self.data.text_sources):
            raise ValueError(
                f"[data] text_sources must be a list of paths or globs, got {self.data.text_sources!r}"
            )
        if len(self.optim.betas) != 2:
            raise ValueError(f"[optim] betas must be two numbers, got {self.optim.betas}")
        self.distributed.validate(where="[distributed] ")
        self.distributed.validate_torchft(self.data.batch_size)
        if self.optim.lookahead and self.optim.name == "ranger":
            raise ValueError(
                "[optim] lookahead = true: Ranger has Lookahead built in; use k and alpha"
            )


@dataclass(frozen=True)
class Bounds:
    """The values a number typed by a user may take: finite, ``low <= x <= high`` (``<`` at an
    ``open`` end), an int when ``integer``. Every number from a config or the command line is
    checked against one before anything loops, allocates or prints with it."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    open_low: bool = False
    open_high: bool = False
    unit: str = ""
    note: str = ""
    """Why the range ends where it does, for the error message."""

    def check(self, value: Any, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` (a key or an option) unless ``value`` is in range."""
        kind = int if self.integer else int | float
        if isinstance(value, bool) or not isinstance(value, kind):
            problem = f"must be {self}"
        elif isinstance(value, float) and not math.isfinite(value):
            problem = f"must be {self}"  # nan would pass the comparisons below
        elif value < self.low or (self.open_low and value == self.low):
            problem = f"must be {'>' if self.open_low else '>='} {_number(self.low)}{self.unit}"
        elif value > self.high or (self.open_high and value == self.high):
            problem = f"must be {'<' if self.open_high else '<='} {_number(self.high)}{self.unit}"
        else:
            return
        note = f" ({self.note})" if self.note else ""
        raise ValueError(f"{where} {problem}{note}, got {value!r}")

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf and self.low == -math.inf:
            return kind
        if self.high == math.inf:
            return f"{kind} {'>' if self.open_low else '>='} {low}{self.unit}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{kind} in {left}{low}, {high}{right}{self.unit}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e9 else f"{x:g}"


MAX_COUNT = 10**12
"""Steps, periods, batches to evaluate: a million times more steps than any run takes, and small
enough that step numbers stay exact in the float64 arithmetic of schedules and plans."""
MAX_BATCH = 2**24
"""Samples in one batch (global or evaluation): 256 times the largest published batches (64K);
more is memory no machine has, asked for at every step."""
MAX_SEQ_LEN = 2**20
"""Tokens per window: the GPT's position table has a row for each."""
MAX_CPU_WORKERS = 1024
"""Threads or loader processes per training process: more than any machine has cores."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""A week: a longer collective timeout is a hang in effect (and inf is no timedelta)."""
MAX_SEED = 2**63 - 1
"""torch and NumPy seeds are 64-bit; each rank seeds ``seed + 1 + rank``."""

_COUNT = Bounds(0, MAX_COUNT, integer=True)
_POSITIVE_COUNT = Bounds(1, MAX_COUNT, integer=True)
_FRACTION = Bounds(0.0, 1.0)
_NON_NEGATIVE = Bounds(0.0)

LIMITS: dict[str, Bounds] = {
    "run.seed": Bounds(0, MAX_SEED, integer=True),
    "run.data_seed": Bounds(-1, MAX_SEED, integer=True),
    "data.seq_len": Bounds(1, MAX_SEQ_LEN, integer=True),
    "data.batch_size": Bounds(1, MAX_BATCH, integer=True),
    "data.eval_batch_size": Bounds(1, MAX_BATCH, integer=True),
    "data.val_fraction": Bounds(0.0, 1.0, open_high=True),
    "data.num_workers": Bounds(0, MAX_CPU_WORKERS, integer=True),
    "optim.lr": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.betas": Bounds(0.0, 1.0, open_high=True),
    "optim.eps": _NON_NEGATIVE,
    "optim.momentum": _FRACTION,
    "optim.k": _POSITIVE_COUNT,
    "optim.alpha": Bounds(0.0, 1.0, open_low=True),
    "optim.threshold": Bounds(),  # Ranger checks its own range; the others ignore it
    "schedule.warmup_steps": _COUNT,
    "schedule.anneal_start": _FRACTION,
    "schedule.min_lr_ratio": _FRACTION,
    "train.steps": _POSITIVE_COUNT,
    "train.stop_at": _COUNT,
    "train.eval_every": _COUNT,
    "train.eval_batches": _COUNT,
    "train.final_eval_batches": _COUNT,
    "train.checkpoint_every": _COUNT,
    "train.keep_checkpoints": _COUNT,
    "train.grad_clip": _NON_NEGATIVE,
    "train.max_nan_skips": _POSITIVE_COUNT,
    "train.log_every": _POSITIVE_COUNT,
    "train.threads": Bounds(0, MAX_CPU_WORKERS, integer=True),
    # the sync options' ranges and combinations are SyncOptions.validate's; these cap the counts
    "distributed.sync_every": _COUNT,
    "distributed.outer_lr": Bounds(),
    "distributed.outer_momentum": Bounds(),
    "distributed.sync_every_warmup_steps": _COUNT,
    "distributed.overlap_steps": _POSITIVE_COUNT,
    "distributed.block_size": Bounds(1, MAX_BLOCK_SIZE, integer=True),
    "distributed.topk_density": Bounds(0.0, 1.0, open_low=True),
    "distributed.timeout_s": Bounds(1.0, MAX_TIMEOUT_S, unit=" s"),
    "distributed.replica_group": Bounds(-1, MAX_CPU_WORKERS, integer=True),
    "distributed.replica_groups": Bounds(0, MAX_CPU_WORKERS, integer=True),
    "distributed.min_replicas": Bounds(1, MAX_CPU_WORKERS, integer=True),
    "distributed.quorum_timeout_s": Bounds(1.0, MAX_TIMEOUT_S, unit=" s"),
}
"""``"table.key"``: the range of every number in a config (each item of a list)."""


def _tables() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


RENAMED = {("distributed", "buffers"): "buffer_policy"}
"""Keys that were renamed: ``(table, old key) -> new key``; the old one is an error naming it."""


def apply_tables(cfg: Config, raw: dict[str, Any], *, origin: str) -> None:
    """Apply ``{table: {key: value}}`` onto ``cfg``, checking names and types.

    Raises:
        ValueError: an unknown table or key (a renamed key names its new name), or a value of the
            wrong type, naming ``origin`` and the key.
    """
    tables = _tables()
    for table, values in raw.items():
        if table not in tables:
            raise ValueError(
                f"{origin}: unknown table [{table}]; valid tables: {', '.join(tables)}"
            )
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: [{table}] must be a table, got {values!r}")
        section = getattr(cfg, table)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            if (table, key) in RENAMED:
                raise ValueError(
                    f"{origin}: [{table}] {key} was renamed; use {RENAMED[table, key]} instead"
                )
            if key not in hints:
                valid = ", ".join(hints)
                raise ValueError(f"{origin}: unknown key {key!r} in [{table}]; valid keys: {valid}")
            setattr(section, key, _coerce(value, hints[key], f"{origin}: [{table}] {key}"))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint) or hint
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ValueError(f"{where} = {value!r}: expected {hint.__name__}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{where} = {value!r}: expected a list of {item.__name__}")
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} = {value!r}: expected a table")
        return dict(value)
    raise AssertionError(f"unsupported config type {hint}")


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """``["--train.steps=100", "--optim.name", "adamw"]`` -> ``{"train": {"steps": 100}, ...}``.

    Values are read as TOML literals (``100``, ``1e-3``, ``true``, ``[0.9, 0.99]``, ``"x"``);
    anything that is not a TOML literal is taken as a string.
    """
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --table.key=value")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            name, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"{arg} needs a value: {arg}=VALUE")
        parts = name.split(".")
        if len(parts) == 3 and parts[1] == "args" and parts[0] == "model":
            out.setdefault("model", {}).setdefault("args", {})[parts[2]] = _literal(text)
        elif len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = _literal(text)
        else:
            raise ValueError(f"--{name}: overrides look like --table.key=value")
        i += 1
    return out


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


PER_RANK_KEYS = frozenset(
    {
        "train.device",
        "train.threads",
        "data.num_workers",
        "data.cache_dir",
        "data.path",
        "run.dir",
        "log.progress",
        "distributed.replica_group",
        "distributed.lighthouse",
        "distributed.hostname",
    }
)
"""Config keys that may differ between the ranks of one job; every other key must agree. Paths
may be spelled differently on each node (mounts, working directories): what they lead to is
compared instead, the datasets by manifest checksum and the run folder by a token rank 0 writes
into it (``rangerdl.train.data``, ``rangerdl.train.run_folder``)."""

RESUME_MAY_CHANGE: dict[str, tuple[str, ...] | None] = {
    "train": (
        "steps",
        "stop_at",
        "eval_every",
        "eval_batches",
        "final_eval_batches",
        "checkpoint_every",
        "keep_checkpoints",
        "grad_clip",
        "on_nan",
        "max_nan_skips",
        "log_every",
        "device",
        "threads",
    ),
    "optim": ("lr",),
    "schedule": None,
    "log": None,
    "data": ("eval_batch_size", "num_workers", "cache_dir"),
    "distributed": (
        "timeout_s",
        "backend",
        "lighthouse",
        "min_replicas",
        "quorum_timeout_s",
        "hostname",
    ),
}
"""What ``rangerdl train --resume RUN --table.key=value`` may change (``None``: the whole table):
how long to train, the learning rate and its schedule (fine-tuning), evaluation, checkpoint and
logging cadence, and where/how the job runs. Everything else (model, data, optimizer state,
seed, sync) is what the checkpoint holds, and changing it is an error naming the key."""


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    run_folder: bool = False,
    trust_code: bool = False,
) -> Config:
    """Defaults, then the file (a TOML config, or a run's saved ``config.json``), then
    command-line overrides; validated.

    ``run_folder``: the file is a run's ``config.json`` (resume, eval): its ``stop_at`` (the stop
    that ended the last run) is cleared; an override outside :data:`RESUME_MAY_CHANGE` that
    changes a value is an error; and a ``[model] name`` that names Python code to import
    (``module:factory``) is refused unless the user names it again on the command line or
    passes ``trust_code``: a run folder is data someone may hand you, and must not run code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, unknown or renamed key, wrong type, value out of range, a
            change a resume cannot make, or code named by a run folder (each names the file/key).
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a valid config file: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(
                f"{path}: not a valid config file: expected tables at the top level, got a "
                f"{type(raw).__name__}"
            )
        apply_tables(cfg, raw, origin=str(path))
        distributed = raw.get("distributed")
        if run_folder and isinstance(distributed, dict) and "eager" not in distributed:
            cfg.distributed.eager = False  # saved before [distributed] eager: merged without it
    saved = cfg.to_dict()
    if run_folder:
        cfg.train.stop_at = 0
    changes = parse_overrides(overrides) if overrides else {}
    if changes:
        apply_tables(cfg, changes, origin="command line")
    if run_folder:
        _check_resume_changes(saved, cfg.to_dict(), path)
        name = cfg.model.name
        if ":" in name and not trust_code and changes.get("model", {}).get("name") != name:
            raise ValueError(
                f"{path}: [model] name = {name!r} names Python code to import, and rangerdl does "
                "not import code named by a run folder (anyone who can edit it could run "
                f"commands). If you trust this run, pass --trust-run-code, or name the factory "
                f"yourself: --model.name={name}"
            )
    cfg.validate()
    return cfg


def _check_resume_changes(saved: dict[str, Any], now: dict[str, Any], path: Path | None) -> None:
    for table, values in now.items():
        allowed = RESUME_MAY_CHANGE.get(table, ())
        for key, value in values.items():
            if value == saved[table][key] or allowed is None or key in allowed:
                continue
            may = ", ".join(
                f"[{t}] " + ("*" if keys is None else ", ".join(keys))
                for t, keys in RESUME_MAY_CHANGE.items()
            )
            raise ValueError(
                f"--{table}.{key}: a resumed run keeps its [{table}] {key} "
                f"({saved[table][key]!r}, from {path}); the checkpoint was made with it. A resume "
                f"may change: {may}. Start a new run to change it"
            )


def config_changes(before: Config, after: Config) -> dict[str, list[Any]]:
    """``{"table.key": [old, new]}`` for every value that differs."""
    a, b = before.to_dict(), after.to_dict()
    return {
        f"{table}.{key}": [a[table][key], value]
        for table, values in b.items()
        for key, value in values.items()
        if a[table][key] != value
    }
