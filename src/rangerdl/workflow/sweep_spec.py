"""The sweep file of ``rangerdl sweep``, read and checked: what a study searches and how.

A sweep file is a TOML with a ``[sweep]`` table (and, optionally, any training tables, which
override the base config)::

    [sweep]
    config = "digits_cnn.toml"     # base training config, relative to this file (optional)
    metric = "val/loss"            # a tag the run logs at each evaluation and in summary.json
    direction = "minimize"
    n_trials = 20
    pruner = "median"              # "none", "median" or "hyperband"

    [sweep.params]
    "optim.lr" = { low = 1e-4, high = 1e-1, log = true }      # float (int if low/high are ints)
    "distributed.sync_every" = [8, 16, 32]                    # categorical
    "model.args.hidden" = { low = 32, high = 256, step = 32 }

    [train]
    steps = 300

Every ``[sweep.params]`` key must be one ``rangerdl train`` accepts, and the base config must
validate; the trials themselves are run by :mod:`rangerdl.workflow.sweep`.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "SearchParam",
    "SweepSpec",
    "config_with",
    "dump_toml",
    "load_sweep",
    "toml_value",
]

PRUNERS = ("none", "median", "hyperband")
SAMPLERS = ("tpe", "random")


@dataclass
class SearchParam:
    """One dimension: ``choices`` (categorical) or ``low``/``high`` (int or float)."""

    key: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    is_int: bool = False

    @classmethod
    def parse(cls, key: str, raw: Any) -> SearchParam:
        where = f"[sweep.params] {key!r}"
        if isinstance(raw, list):
            if not raw:
                raise ValueError(f"{where}: an empty list of choices")
            return cls(key, choices=list(raw))
        if not isinstance(raw, dict):
            raise ValueError(
                f"{where}: expected a list of choices or a table {{ low = ..., high = ... }}"
            )
        unknown = set(raw) - {"low", "high", "log", "step", "choices", "type"}
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {sorted(unknown)}; valid: low, high, log, step, choices, type"
            )
        if "choices" in raw:
            return cls.parse(key, raw["choices"])
        if "low" not in raw or "high" not in raw:
            raise ValueError(f"{where}: needs low and high (or choices)")
        low, high = raw["low"], raw["high"]
        kind = raw.get("type") or (
            "int" if isinstance(low, int) and isinstance(high, int) else "float"
        )
        if kind not in ("int", "float"):
            raise ValueError(f"{where}: type = {kind!r}: expected int or float")
        if not low < high:
            raise ValueError(f"{where}: low ({low}) must be < high ({high})")
        if raw.get("log") and low <= 0:
            raise ValueError(f"{where}: log = true needs low > 0")
        return cls(
            key,
            low=low,
            high=high,
            log=bool(raw.get("log")),
            step=raw.get("step"),
            is_int=kind == "int",
        )

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        assert self.low is not None and self.high is not None
        if self.is_int:
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def sample_value(self) -> Any:
        if self.choices is not None:
            return self.choices[0]
        assert self.low is not None
        return int(self.low) if self.is_int else self.low


@dataclass
class SweepSpec:
    """The ``[sweep]`` table, resolved; ``base`` is the training config every trial starts from."""

    folder: Path
    study_name: str
    base: Any  # rangerdl.train.config.Config
    params: list[SearchParam]
    metric: str = "val/loss"
    direction: str = "minimize"
    n_trials: int = 10
    pruner: str = "median"
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 0
    sampler: str = "tpe"
    seed: int = 0
    heartbeat_s: int = 10
    grace_period_s: int = 60
    enqueue: list[dict[str, Any]] = field(default_factory=list)


def load_sweep(
    path: Path, overrides: list[str] | None = None, folder: Path | None = None
) -> SweepSpec:
    """Read a sweep file: ``[sweep]``, ``[sweep.params]`` and training tables (see the module doc)."""
    from rangerdl.train.config import Config, apply_tables, load_config, parse_overrides

    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not a valid TOML file: {exc}") from exc
    table = raw.pop("sweep", None)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: no [sweep] table (see `rangerdl sweep --help`)")
    table = dict(table)
    params_raw = table.pop("params", None)
    if not isinstance(params_raw, dict) or not params_raw:
        raise ValueError(f'{path}: [sweep.params] must name at least one key, e.g. "optim.lr"')
    base_path = table.pop("config", None)
    cfg = load_config(path.parent / base_path if base_path else None)
    apply_tables(cfg, raw, origin=str(path))
    if overrides:
        apply_tables(cfg, parse_overrides(overrides), origin="command line")
    cfg.validate()
    params = [SearchParam.parse(k, v) for k, v in params_raw.items()]
    for p in params:  # every key must be one `rangerdl train` accepts
        probe = Config()
        override = [f"--{p.key}={toml_value(p.sample_value())}"]
        apply_tables(probe, parse_overrides(override), origin=f"[sweep.params] {p.key!r}")
    spec_fields = {
        f
        for f in SweepSpec.__dataclass_fields__
        if f not in ("folder", "study_name", "base", "params")
    }
    extra = {"dir", "name"}
    unknown = set(table) - spec_fields - extra
    if unknown:
        valid = ", ".join(sorted(spec_fields | extra | {"config", "params"}))
        raise ValueError(
            f"{path}: unknown key(s) {sorted(unknown)} in [sweep]; valid keys: {valid}"
        )
    spec = SweepSpec(
        folder=folder or Path(table.pop("dir", None) or Path("sweeps") / path.stem),
        study_name=str(table.pop("name", None) or path.stem),
        base=cfg,
        params=params,
        **table,
    )
    if spec.direction not in ("minimize", "maximize"):
        raise ValueError(f"[sweep] direction = {spec.direction!r}: expected minimize or maximize")
    if spec.pruner not in PRUNERS:
        raise ValueError(f"[sweep] pruner = {spec.pruner!r}: expected one of {', '.join(PRUNERS)}")
    if spec.sampler not in SAMPLERS:
        raise ValueError(
            f"[sweep] sampler = {spec.sampler!r}: expected one of {', '.join(SAMPLERS)}"
        )
    if spec.n_trials < 1:
        raise ValueError("[sweep] n_trials must be >= 1")
    if spec.seed < 0:
        raise ValueError(f"[sweep] seed = {spec.seed}: expected an integer >= 0")
    if "/" not in spec.metric:
        raise ValueError(
            f"[sweep] metric = {spec.metric!r}: expected a logged tag such as val/loss"
        )
    return spec


# ---------------------------------------------------------------- TOML out


def toml_value(value: Any) -> str:
    """A TOML literal (what ``--table.key=VALUE`` and ``best.toml`` need)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    """``{table: {key: value}}`` (one level of sub-tables, e.g. ``[model.args]``) as TOML."""
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        subtables = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if k not in subtables]
        for sub, sub_values in subtables.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sub_values.items()]
        lines.append("")
    return "\n".join(lines)


def config_with(base: Any, values: dict[str, Any]) -> Any:
    """A copy of ``base`` with ``{"table.key": value}`` applied (checked as overrides are)."""
    from rangerdl.train.config import Config, apply_tables, parse_overrides

    cfg = Config.from_dict(base.to_dict())
    args = [f"--{k}={toml_value(v)}" for k, v in values.items()]
    apply_tables(cfg, parse_overrides(args), origin="trial parameters")
    cfg.validate()
    return cfg
