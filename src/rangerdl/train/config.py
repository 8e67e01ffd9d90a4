"""Training configuration: one dataclass per TOML table, a docstring per field.

Precedence: command line (``--table.key=value``) > TOML file > the defaults below. An unknown table
or key, or a value of the wrong type, is a ``ValueError`` that names it and lists what is valid. The
resolved configuration is saved with the run as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rangerdl.distributed.options import SyncOptions

__all__ = [
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
    batch_size: int = 64
    """Global batch size: samples per optimizer step summed over all workers."""
    eval_batch_size: int = 256
    """Batch size for validation and test passes."""
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
    """Limit validation to this many batches (0: the whole split)."""
    checkpoint_every: int = 300
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the last this many checkpoints."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value (0: off)."""
    on_nan: str = "stop"
    """A NaN/Inf loss: ``stop`` (exit naming the step) or ``skip`` (drop the step and go on)."""
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


@dataclass
class DistributedConfig(SyncOptions):
    """The sync options (``rangerdl.distributed.SyncOptions``: ``sync_every``, ``outer_lr``,
    ``outer_momentum``, ``nesterov``, ``overlap``, ``shard_slow``, ``comm_dtype``,
    ``buffer_policy``), plus how the job runs."""

    strategy: str = "lookahead"
    """``lookahead``: workers step locally and sync the Lookahead slow weights every
    ``sync_every`` steps; ``ddp``: torch DistributedDataParallel (gradient all-reduce every step);
    ``post_local_sgd``: torch PostLocalSGDOptimizer (periodic model averaging)."""
    backend: str = "auto"
    """``auto`` (NCCL on CUDA, gloo on CPU), ``gloo`` or ``nccl``."""
    timeout_s: float = 300.0
    """Collective timeout: a rank that stops answering fails the job instead of hanging it."""


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

    def save(self, path: Path) -> None:
        from rangerdl._fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, origin: str = "config") -> Config:
        cfg = cls()
        apply_tables(cfg, raw, origin=origin)
        return cfg

    def validate(self) -> None:
        """Checks that span fields; single-field types are checked when values are applied."""
        from rangerdl.optim.schedules import SCHEDULES
        from rangerdl.train.choices import BACKENDS, BUILTIN_SOURCES, ON_NAN, OPTIMIZERS, STRATEGIES

        choices = {
            ("optim", "name"): OPTIMIZERS,
            ("schedule", "name"): SCHEDULES,
            ("train", "on_nan"): ON_NAN,
            ("distributed", "strategy"): STRATEGIES,
            ("distributed", "backend"): BACKENDS,
        }
        if not self.data.path:
            choices["data", "source"] = BUILTIN_SOURCES
        for (table, key), valid in choices.items():
            value = getattr(getattr(self, table), key)
            if value not in valid:
                raise ValueError(f"[{table}] {key} = {value!r}: expected one of {', '.join(valid)}")
        self.distributed.validate(where="[distributed] ")
        positive = [("train", "steps"), ("data", "batch_size"), ("data", "eval_batch_size")]
        for table, key in positive:
            if getattr(getattr(self, table), key) < 1:
                raise ValueError(f"[{table}] {key} must be >= 1")
        for table, key in [
            ("train", "eval_every"),
            ("train", "checkpoint_every"),
            ("train", "keep_checkpoints"),
            ("train", "eval_batches"),
            ("train", "stop_at"),
            ("data", "num_workers"),
            ("schedule", "warmup_steps"),
        ]:
            if getattr(getattr(self, table), key) < 0:
                raise ValueError(f"[{table}] {key} must be >= 0")
        if len(self.optim.betas) != 2:
            raise ValueError(f"[optim] betas must be two numbers, got {self.optim.betas}")
        if not 0.0 <= self.schedule.anneal_start <= 1.0:
            raise ValueError("[schedule] anneal_start must be in [0, 1]")
        if self.optim.lookahead and self.optim.name == "ranger":
            raise ValueError(
                "[optim] lookahead = true: Ranger has Lookahead built in; use k and alpha"
            )


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


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, resumed: bool = False
) -> Config:
    """Defaults, then the file (a TOML config, or a run's saved ``config.json``), then
    command-line overrides; validated. ``resumed``: the file is a run being continued, so its
    ``stop_at`` (the stop that ended the last session) is cleared before the overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            text = path.read_text()
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a valid config file: {exc}") from exc
        apply_tables(cfg, raw, origin=str(path))
    if resumed:
        cfg.train.stop_at = 0
    if overrides:
        apply_tables(cfg, parse_overrides(overrides), origin="command line")
    cfg.validate()
    return cfg
