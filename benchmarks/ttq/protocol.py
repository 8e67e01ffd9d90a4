"""Time to DDP's quality, the fair way: the contenders, the cells, the ladder and the analysis.

The question a user asks: *how soon do I reach the quality DDP would give me?* Every contender
trains the same model (``configs/ttq_gpt.toml``, ``configs/ttq_digits.toml``) from the same seeds,
with the same global batch (workers x per-worker batch = DDP's batch) and the same data order,
through ``rangerdl train`` under ``torchrun``, one process per simulated host
(``benchmarks/netsim``; launching and run-folder reading: ``ttq/runner.py``). Stages, each writing
``benchmarks/results/ttq_protocol.json`` after every run (a rerun replaces the runs it repeats and
keeps the rest):

1. ``tune``: every contender gets the same tuning budget: ``TUNE_FACTORS`` (5) learning rates,
   the centre (the single-process sweep's best for its inner optimizer, ``LR_CENTRE``)
   times 2^-1 ... 2^1, each trained for B steps with seed ``TUNE_SEED`` (not a scoring seed: no
   contender is tuned on the runs it is scored on); the lowest final validation loss wins. When
   the winner is an edge of the grid, the grid goes one factor further on that side, up to
   ``TUNE_EXTEND`` (2) times, for every contender alike (``next_lr``). Runs on
   loopback (``torchrun --standalone``): a run's loss curve does not depend on the network (the
   same seed gives the same curve at any rate; only its wall-clock changes). ``TUNED_AS``: an
   entry that differs from another only in transport (bf16) takes that one's lr. Every cell uses
   the lrs tuned with 2 hosts.
2. ``run``: per cell, on the simulated network:
   - the target: DDP AdamW at B steps with each of ``TARGET_SEEDS`` (7), on loopback (a run's
     loss curve does not depend on the link; ``target_cell``); target = the **median** of their
     final validation losses, so that no single seed moves it. Their min and max are DDP's
     spread.
   - DDP AdamW at B steps in the cell (seed 0: its time there) and with no rate limit (the
     cell's limit: DDP's time at the cell's rate / DDP's time with no rate limit).
   - every other contender climbs the ladder ``RUNGS`` (x B steps, rounded up to a multiple of
     its k; fixed in advance and the same for every contender; the step budget sizes its LR
     schedule), with all of ``SEEDS`` (3) at each rung, and stops at the first rung where the
     median of its seeds' times to target is finite: a seed's time is the first crossing of the
     target on the training wall clock (``time/train_s``, interpolated between evaluations),
     and a seed that never crosses counts as never, so 2 of 3 must cross. A rung past B at
     which 2 seeds have already missed is cut short. Longer rungs are not run once a rung
     reaches it (a longer schedule stays at a high LR longer and reaches a given loss later);
     every run is in the JSON. A rung other than B whose curves miss the target in another cell
     of the same workload and hosts is skipped (``known_miss``: a seed's curve does not depend
     on the link).
   - per row: final loss at B steps (equal tokens: median, min-max over seeds), the rung, time
     to target (median, min-max, how many seeds cross), speedup over DDP (DDP's B-step time in
     the cell / time to target), over the best peer (``Entry.family`` ``peer``: what a user
     would pick instead) for distributed Ranger, that speedup as a fraction of the cell's limit,
     bytes per rank (``comm/bytes``), share of training time communicating.
3. ``report``: the tables (markdown) and the figure: each contender's curve up to its
   time-to-target rung, with the target line and DDP.

Measured quantities: ``time/train_s`` is training wall seconds on rank 0 (evaluation and
checkpointing excluded); ``bytes_per_rank`` is rangerdl's ring-model count of training traffic
(``comm/bytes``: 2 (W-1)/W x values x bytes per all-reduce, the one-time broadcast of rank 0's
weights logged apart); ``comm_share`` is ``comm/time_s`` / training time where communication
blocks, and 1 - T(no limit) / T for DDP, which overlaps its all-reduce with backward;
``others_cpu_share`` is the CPU time of processes other than the benchmark's as a share of all
cores during a run (the machine is shared: how far a timing may be off).

::

    python benchmarks/ttq_protocol.py tune              # ~8 min per entry (2 cores, loopback)
    python benchmarks/ttq_protocol.py run               # needs root (netsim)
    python benchmarks/ttq_protocol.py report
    python benchmarks/ttq_protocol.py recheck --cell gpt-2h-100mbit --runs ddp_adamw:1024

Nothing here runs anything: this module is the protocol's definitions and its analysis of the
runs in the JSON.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]
CONFIGS = BENCH / "configs"

B = {"gpt": 1024, "cpp": 1024, "digits": 160}
"""DDP AdamW's step budget per workload (the target is its final loss); every rung of the
ladder is a multiple of every k used (8, 16, 32), so no run ends on a partial sync."""
TUNE_SEED = 100
TUNE_FACTORS: tuple[float, ...] = (0.5, 0.7071, 1.0, 1.4142, 2.0)
TUNE_EXTEND = 2
"""Trials added past an edge of the grid that wins (``next_lr``), at most."""
LR_CENTRE = {
    "gpt": {"adamw": 2e-3, "ranger": 1.6e-2},
    "cpp": {"adamw": 2e-3, "ranger": 1.6e-2},
    "digits": {"adamw": 1e-2, "ranger": 3e-2},
}
"""The single-process sweep's best lr per optimizer and workload (final validation loss after the
full step budget, flat_anneal schedule; the sweep is in ``ttq_protocol.json``'s ``fixed_budget``
section, ``lr_sweep``). ``cpp`` (the same model on other text) takes the GPT's centres: its tuning
grid extends past an edge that wins (``next_lr``)."""
SEEDS: tuple[int, ...] = (0, 1, 2)
"""Every contender's seeds in every cell: its time to target is their median."""
TARGET_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
"""DDP AdamW's seeds that set the target (the median of their final losses)."""
RUNGS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)
EVAL_EVERY = {"gpt": 32, "cpp": 32, "digits": 16}
QUICK = False
"""``--quick``: tiny models and budgets (a smoke test of the whole pipeline; numbers meaningless)."""


def use_quick() -> None:
    """Switch the protocol to its smoke-test sizes (tiny budgets, one lr, one seed, two rungs)."""
    global QUICK, TUNE_FACTORS, SEEDS, TARGET_SEEDS, RUNGS
    QUICK = True
    RUNGS = (1.0, 1.5)
    B.update(gpt=64, cpp=64, digits=16)
    TUNE_FACTORS = (1.0,)
    SEEDS = (0,)
    TARGET_SEEDS = (0, 1)
    EVAL_EVERY.update(gpt=32, cpp=32, digits=8)  # a multiple of every k, as in the full protocol


# ---------------------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    """One way to train: strategy, optimizer and sync options."""

    name: str
    strategy: str | None  # None: a single process
    optimizer: str
    sync_every: int = 0
    overlap: bool = False
    eager: bool = False
    """With ``overlap``: ``[distributed] eager``."""
    comm_dtype: str = "fp32"
    extra: tuple[str, ...] = ()
    """More ``--key=value`` overrides, appended last (e.g. the outer optimizer's settings)."""
    program: str = "rangerdl"
    """What trains it: ``rangerdl`` (``rangerdl train``) or ``torchft``
    (``benchmarks/peers/torchft_train.py``: torchft's DiLoCo, its sync ``--diloco.*``, one
    replica group per host)."""

    def overrides(self, lr: float) -> list[str]:
        out = [f"--optim.name={self.optimizer}", f"--optim.lr={lr}"]
        if self.optimizer == "adamw":  # torch's defaults; Ranger keeps its own (0.95, 0.999), 1e-5
            out += ["--optim.betas=[0.9, 0.999]", "--optim.eps=1e-8"]
        if self.strategy is None:
            return out + list(self.extra)
        if self.program == "torchft":  # the outer step's settings are in extra (``_diloco``)
            return [*out, f"--diloco.sync_every={self.sync_every}", *self.extra]
        out.append(f"--distributed.strategy={self.strategy}")
        if self.strategy == "lookahead":
            out.append(f"--optim.k={self.sync_every}")  # Ranger's k; sync_every defaults to it
        elif self.strategy == "post_local_sgd":
            out.append(f"--distributed.sync_every={self.sync_every}")
        if self.overlap:
            out.append("--distributed.overlap=true")
            out.append(f"--distributed.eager={str(self.eager).lower()}")
        if self.comm_dtype != "fp32":
            out.append(f"--distributed.comm_dtype={self.comm_dtype}")
        return out + list(self.extra)


@dataclass(frozen=True)
class Workload:
    """A model and dataset (a TOML config) with the learning rate of each optimizer."""

    name: str
    config: Path
    lr: dict[str, float]
    what: str
    quick: tuple[str, ...] = ()
    """Overrides of ``--quick``: tiny sizes."""
    args: tuple[str, ...] = ()
    """Overrides every run of the workload takes (e.g. its data), before the contender's."""


def torch_headers() -> str:
    """The glob of the C/C++ headers installed with torch (``torch/include/**/*.h``, ~37 MB for
    torch 2.13.0): text on every machine that runs the protocol, and not Python."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torch is not installed: the cpp workload reads its headers")
    return str(Path(spec.submodule_search_locations[0]) / "include" / "**" / "*.h")


_GPT_QUICK = (
    "--model.args.n_layer=1",
    "--model.args.n_embd=32",
    "--data.seq_len=32",
    "--train.steps=16",
    "--train.eval_every=8",
    "--train.eval_batches=1",
)
WORKLOADS = {
    "gpt": Workload(
        "gpt",
        CONFIGS / "ttq_gpt.toml",
        LR_CENTRE["gpt"],
        "byte-level GPT, 2 layers x 128, context 64, ~0.45M parameters, global batch 32, "
        "Python stdlib sources",
        _GPT_QUICK,
    ),
    "cpp": Workload(
        "cpp",
        CONFIGS / "ttq_gpt.toml",
        LR_CENTRE["cpp"],
        "the same GPT on other text: the C/C++ headers installed with torch "
        "(torch/include/**/*.h, ~37 MB)",
        _GPT_QUICK,
        (f"--data.text_sources=['{torch_headers()}']",),
    ),
    "digits": Workload(
        "digits",
        CONFIGS / "ttq_digits.toml",
        LR_CENTRE["digits"],
        "digits CNN (channels 32, BatchNorm), 57K parameters, global batch 64; loss on the test "
        "split",
        ("--train.steps=16", "--train.eval_every=8"),
    ),
}


@dataclass(frozen=True)
class Entry:
    """A contender of the protocol and what it is, in words."""

    name: str
    contender: Contender
    what: str
    family: str = "rangerdl"
    """``rangerdl`` (distributed Ranger, OuterSync), ``peer`` (what a user would pick instead)
    or ``target`` (DDP AdamW)."""

    @property
    def k(self) -> int:
        return self.contender.sync_every or 1


def _ranger(
    name: str, k: int, *extra: str, overlap: bool = False, dtype: str = "fp32", eager: bool = False
) -> Entry:
    c = Contender(
        name, "lookahead", "ranger", k, overlap=overlap, eager=eager, comm_dtype=dtype, extra=extra
    )
    return Entry(name, c, "distributed Ranger")


def _diloco(
    name: str,
    k: int,
    what: str,
    *,
    outer_lr: float = 0.7,
    momentum: float = 0.9,
    nesterov: bool = True,
    fragments: int = 1,
    delay: int = 0,
) -> Entry:
    """torchft's DiLoCo over AdamW syncing every ``k`` steps (Streaming DiLoCo with ``fragments``
    > 1, each fragment's all-reduce overlapped with ``delay`` steps); the outer step is torch SGD
    (``outer_lr``, ``momentum``, ``nesterov``; the defaults are DiLoCo's published ones)."""
    extra = (
        f"--diloco.outer_lr={outer_lr}",
        f"--diloco.outer_momentum={momentum}",
        f"--diloco.nesterov={str(nesterov).lower()}",
        f"--diloco.fragments={fragments}",
        f"--diloco.fragment_sync_delay={delay}",
    )
    c = Contender(name, "diloco", "adamw", k, extra=extra, program="torchft")
    return Entry(name, c, what, "peer")


def _entries() -> dict[str, Entry]:
    overlap4, overlap8 = "--distributed.overlap_steps=4", "--distributed.overlap_steps=8"
    out = [
        Entry(
            "ddp_adamw",
            Contender("ddp_adamw", "ddp", "adamw"),
            "torch DDP, AdamW (target)",
            "target",
        ),
        Entry(
            "post_local_sgd_k8",
            Contender("post_local_sgd_k8", "post_local_sgd", "adamw", 8),
            "torch PostLocalSGDOptimizer over AdamW, averaging every 8 steps",
            "peer",
        ),
        _ranger("ranger_k8", 8),
        _ranger("ranger_k8_bf16", 8, dtype="bf16"),
        _ranger("ranger_k16_bf16", 16, dtype="bf16"),  # the slow-link (20 Mbit/s) candidate
        # overlapped: the all-reduce runs during the next `d` local steps (overlap_steps), chosen
        # so that d steps of compute (~45 ms each here) cover its wire time at the cell's rate
        _ranger("ranger_k8_overlap4", 8, overlap4, overlap=True),
        _ranger("ranger_k16_overlap4", 16, overlap4, overlap=True),
        _ranger("ranger_k32_overlap16", 32, "--distributed.overlap_steps=16", overlap=True),
        # 20 Mbit/s: a bf16 exchange takes ~0.5 s (measured), ~9 steps of compute: overlapped 8
        _ranger("ranger_k8_bf16_overlap8", 8, overlap8, overlap=True, dtype="bf16"),
        _ranger("ranger_k16_bf16_overlap8", 16, overlap8, overlap=True, dtype="bf16"),
        # eager: the outer step at launch with the worker's own pseudo-gradient, corrected when
        # the mean arrives ([distributed] eager)
        _ranger(
            "ranger_k8_bf16_overlap8_eager", 8, overlap8, overlap=True, eager=True, dtype="bf16"
        ),
        _ranger(
            "ranger_k16_bf16_overlap8_eager", 16, overlap8, overlap=True, eager=True, dtype="bf16"
        ),
        _ranger(
            "ranger_k8_bf16_overlap4_eager", 8, overlap4, overlap=True, dtype="bf16", eager=True
        ),
        _ranger("ranger_k8_overlap4_eager", 8, overlap4, overlap=True, eager=True),
        # k = 4: twice the syncs for less drift between them, each bf16 exchange (~80 ms at
        # 100 Mbit/s) hidden behind the next 2 steps
        _ranger(
            "ranger_k4_bf16_overlap2_eager",
            4,
            "--distributed.overlap_steps=2",
            overlap=True,
            dtype="bf16",
            eager=True,
        ),
        # the same with int8 pseudo-gradients (blockwise absmax, error feedback): half the bytes
        # of bf16 (~40 ms at 100 Mbit/s), so one step of compute hides the exchange
        _ranger(
            "ranger_k4_int8_overlap1_eager",
            4,
            "--distributed.overlap_steps=1",
            "--distributed.compression=int8",
            overlap=True,
            eager=True,
        ),
        # 20 Mbit/s: int4 pseudo-gradients (a quarter of bf16's bytes, ~0.1 s a sync there), so
        # 2 steps of compute still hide the exchange, as bf16's does at 100 Mbit/s
        _ranger(
            "ranger_k4_int4_overlap2_eager",
            4,
            "--distributed.overlap_steps=2",
            "--distributed.compression=int4",
            overlap=True,
            eager=True,
        ),
        _ranger("ranger_k32", 32),  # equal tokens at k = 32 (tuning table only)
        # the outer step: alpha = 1 (plain averaging, as post-local SGD) instead of Lookahead's 0.5
        _ranger("ranger_k32_outer1", 32, "--distributed.outer_lr=1.0"),
        _ranger("ranger_k8_outer1", 8, "--distributed.outer_lr=1.0"),
        Entry(
            "lookahead_adamw_k8_overlap4",
            Contender(
                "lookahead_adamw_k8_overlap4",
                "lookahead",
                "adamw",
                8,
                overlap=True,
                extra=(overlap4,),
            ),
            "OuterSync around AdamW (distributed Lookahead(AdamW), alpha 0.5): the inner-optimizer "
            "ablation",
        ),
        # torchft 0.2.0 (benchmarks/peers): its outer step is made for hundreds of inner steps
        # per sync (its effective step ~ lr / (1 - momentum) = 7x the mean change)
        _diloco(
            "diloco_k8",
            8,
            "torchft DiLoCo over AdamW every 8 steps, its published outer step (Nesterov SGD, "
            "lr 0.7, momentum 0.9)",
        ),
        _diloco(
            "diloco_k32",
            32,
            "torchft DiLoCo over AdamW every 32 steps (nearer the period it was made for), its "
            "published outer step",
        ),
        _diloco(
            "diloco_k8_outer1",
            8,
            "torchft DiLoCo over AdamW every 8 steps, outer lr 1 without momentum: plain "
            "averaging (a check: it should track post_local_sgd_k8)",
            outer_lr=1.0,
            momentum=0.0,
            nesterov=False,
        ),
        _diloco(
            "streaming_diloco_k32_f4",
            32,
            "torchft Streaming DiLoCo over AdamW: 4 fragments, one synced every 8 steps (each "
            "every 32), its all-reduce overlapped with 1 step; published outer step",
            fragments=4,
            delay=1,
        ),
    ]
    return {e.name: e for e in out}


ENTRIES = _entries()
TUNED_AS = {
    "ranger_k8_bf16": "ranger_k8",
    "ranger_k4_int8_overlap1_eager": "ranger_k4_bf16_overlap2_eager",
    "ranger_k4_int4_overlap2_eager": "ranger_k4_bf16_overlap2_eager",
}
"""Entries that take another's tuned lr instead of a grid of their own (fewer trials, never
more): the same optimizer and sync period, only the transport differs (bf16 or int8
pseudo-gradients instead of fp32 weights; with overlap, how many steps hide it)."""


# ---------------------------------------------------------------------------------- the cells
@dataclass(frozen=True)
class CellSpec:
    """A (workload, hosts, rate) setting and the contenders run in it."""

    workload: str
    hosts: int
    rate: str
    entries: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.workload}-{self.hosts}h-{self.rate}"

    @property
    def unlimited_key(self) -> str:
        """The cell of DDP AdamW's run with no rate limit (the cell's limit)."""
        return f"{self.workload}-{self.hosts}h-nolimit"


HEADLINE = "gpt-2h-100mbit"
_HEADLINE_RACE = (
    "ddp_adamw",
    "post_local_sgd_k8",
    "ranger_k4_int8_overlap1_eager",
    "diloco_k32",
    "streaming_diloco_k32_f4",
)
"""The headline's winner and every peer: the race of the cells beside it."""
CELLS = (
    CellSpec(
        "gpt",
        2,
        "100mbit",
        (
            "ddp_adamw",
            "post_local_sgd_k8",
            "ranger_k8_bf16",  # blocking; ranger_k8 (fp32) has its lr and curve
            "ranger_k8_bf16_overlap4_eager",  # the same, overlapped (ranger_k8_overlap4_eager: fp32)
            "ranger_k4_bf16_overlap2_eager",
            "ranger_k4_int8_overlap1_eager",
            "diloco_k32",
            "streaming_diloco_k32_f4",
        ),
    ),
    # at 20 Mbit/s an fp32 all-reduce takes ~0.7 s, ~12 steps of compute: the peers sync every 8
    # or 32 steps; distributed Ranger's int4 sync (~0.1 s) hides behind 2 steps at k = 4
    CellSpec(
        "gpt",
        2,
        "20mbit",
        (
            "ddp_adamw",
            "post_local_sgd_k8",
            "ranger_k4_int4_overlap2_eager",
            "diloco_k32",
            "streaming_diloco_k32_f4",
        ),
    ),
    # 4 hosts (8 samples per worker): the headline's contenders with the 2-host lrs
    CellSpec("gpt", 4, "100mbit", _HEADLINE_RACE),
    # the headline's link and contenders on a second text workload (C++, not Python)
    CellSpec("cpp", 2, "100mbit", _HEADLINE_RACE),
    CellSpec(
        "digits", 2, "100mbit", ("ddp_adamw", "post_local_sgd_k8", "ranger_k8_overlap4_eager")
    ),
)
TARGETS = {"gpt-2h-100mbit": 2.5, "gpt-2h-20mbit": 8.0, "gpt-4h-100mbit": 2.0}
"""The speedup set as the goal of each cell (time to DDP AdamW's final loss)."""


def target_cell(workload: str) -> str:
    """The cell key of DDP AdamW's target seeds: 2 ranks on loopback. DDP's loss per step does
    not depend on the link (the same seed gives the same curve at any rate) nor on the number of
    hosts at the same global batch (measured: 1.6253 with 2 hosts, 1.6254 with 4), so one set of
    seeds sets every cell's target of the workload."""
    return f"{workload}-2h-target"


def tune_cell(workload: str, hosts: int) -> str:
    """The cell key of the tuning runs (loopback)."""
    return f"{workload}-{hosts}h-loopback"


def rung_steps(workload: str, k: int) -> list[int]:
    """The ladder: RUNGS x B rounded up to a multiple of k (no partial final sync)."""
    return sorted({-(-round(r * B[workload]) // k) * k for r in RUNGS})


def tuning_entries(cells: list[str]) -> dict[str, list[str]]:
    """What the ``tune`` stage must run for the cells keyed ``cells``: per workload, their
    contenders, each replaced by the entry it takes its lr from (``TUNED_AS``), in cell order."""
    out: dict[str, list[str]] = {}
    for spec in CELLS:
        if spec.key in cells:
            names = out.setdefault(spec.workload, [])
            for name in spec.entries:
                name = TUNED_AS.get(name, name)
                if name not in names:
                    names.append(name)
    return out


def tune_lrs(workload: str, optimizer: str) -> list[float]:
    """The tuning grid of one optimizer: its centre lr times ``TUNE_FACTORS``, 3 digits."""
    return [float(f"{LR_CENTRE[workload][optimizer] * f:.3g}") for f in TUNE_FACTORS]


def next_lr(losses: dict[float, float]) -> float | None:
    """The grid's next trial when the best lr so far (lowest final loss) is the highest or the
    lowest tried: one more grid factor (sqrt 2) past it, 3 digits; None when the best is inside
    the grid (or nothing ran). The same rule for every contender, at most ``TUNE_EXTEND``
    times; every trial is in the JSON."""
    if not losses:
        return None
    best = min(losses, key=lambda lr: losses[lr])
    if len(losses) > 1 and best == max(losses):
        return float(f"{best * math.sqrt(2):.3g}")
    if len(losses) > 1 and best == min(losses):
        return float(f"{best / math.sqrt(2):.3g}")
    return None


def tuned_lr(payload: dict[str, Any], workload: str, hosts: int, name: str) -> float | None:
    """The tuning winner: lowest final val loss among the entry's tune runs."""
    cell = tune_cell(workload, hosts)
    name = TUNED_AS.get(name, name)
    runs = [
        r
        for r in payload["runs"]
        if r["stage"] == "tune" and r["cell"] == cell and r["entry"] == name and r.get("ok")
    ]
    return min(runs, key=lambda r: r["final_val_loss"])["lr"] if runs else None


# ---------------------------------------------------------------------------------- analysis
def run_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two runs the same run (a rerun replaces it)."""
    return (r["stage"], r["cell"], r["entry"], r["lr"], r["seed"], r["steps_budget"])


def time_to_target(curve: list[list[float]], target: float) -> float | None:
    """First time the loss is <= target, interpolated linearly in (time, loss) between the
    evaluation before and the one that crosses; the first evaluation's time if it already
    crosses (an upper bound); None if never reached."""
    prev: list[float] | None = None
    for point in curve:
        _, t, loss = point
        if loss <= target:
            if prev is None:
                return t
            _, t0, l0 = prev
            return t0 + (l0 - target) / (l0 - loss) * (t - t0)
        prev = point
    return None


def final_loss(run: dict[str, Any]) -> float:
    """The validation loss at the run's last step (slow weights for Lookahead contenders). In the
    run stage every point of a curve, this one included, scores the same validation windows (the
    workload's ``eval_batches``: 512 fixed windows for GPT, the whole split for digits;
    ``--train.final_eval_batches``), so the target (the median of DDP's) and a contender's
    crossing, wherever it falls, are measured alike. Tuning scores the whole split instead."""
    step, _, loss = run["curve"][-1]
    if step != run["steps_budget"]:
        raise ValueError(f"{run['entry']}: no evaluation at the final step {run['steps_budget']}")
    return float(loss)


def seed_times(runs: list[dict[str, Any]], target: float) -> dict[int, float | None]:
    """Each seed's time to ``target`` (None: its run never reaches it)."""
    return {int(r["seed"]): time_to_target(r["curve"], target) for r in runs}


def median_time(times: dict[int, float | None], seeds: tuple[int, ...]) -> float | None:
    """The median over ``seeds`` of their times to target, a seed that never crosses (or has no
    run) counting as never: None unless more than half of the seeds cross (2 of 3)."""
    values = [times.get(s) for s in seeds]
    t = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(t) else t


def known_miss(
    payload: dict[str, Any], spec: CellSpec, entry: str, lr: float, steps: int, target: float
) -> str | None:
    """The cell whose runs show that ``entry`` at ``lr`` with a budget of ``steps`` misses
    ``target`` in ``spec`` too, or None. A run's loss curve does not depend on the link (the same
    seed gives the same curve, bit for bit, at any rate: DDP, PostLocalSGD, distributed Ranger
    with or without overlap, DiLoCo), so a rung whose curves at the same hosts stay above the
    target for more than half of ``SEEDS`` in another cell (the ladder cuts a rung short there)
    stays above it here: ``run`` skips it (never the B rung, whose finals are the equal-token
    column)."""
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for r in payload["runs"]:
        other = r["cell"]
        if other == spec.key or not other.startswith(f"{spec.workload}-{spec.hosts}h-"):
            continue
        if r["stage"] != "run" or other.endswith(("-target", "-nolimit")) or not r.get("ok"):
            continue
        if (r["entry"], r["lr"], r["steps_budget"]) == (entry, lr, steps):
            by_cell.setdefault(other, []).append(r)
    for other, same in by_cell.items():
        times = seed_times([x for x in same if int(x["seed"]) in SEEDS], target)
        if sum(t is None for t in times.values()) > len(SEEDS) // 2:  # the ladder's cut, too
            return other
    return None


def rung_reached(runs: list[dict[str, Any]], target: float, seeds: tuple[int, ...]) -> int | None:
    """The row's rung: the smallest step budget at which the median over ``seeds`` of the times
    to target is finite (more than half of the seeds cross; a seed without a run there counts
    as never). None: no rung of the ladder."""
    for steps in sorted({r["steps_budget"] for r in runs}):
        at = [r for r in runs if r["steps_budget"] == steps]
        if median_time(seed_times(at, target), seeds) is not None:
            return int(steps)
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "values": values,
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def budgets(payload: dict[str, Any]) -> dict[str, int]:
    """B per workload as the JSON's runs were made (a ``--quick`` JSON has its own); ``B`` for
    a workload the JSON has no B of."""
    return {**B, **payload.get("constants", {}).get("B", {})}


def target_runs(payload: dict[str, Any], workload: str) -> list[dict[str, Any]]:
    """DDP AdamW's target seeds of ``workload`` (B steps, :func:`target_cell`)."""
    steps_b = budgets(payload)[workload]
    return [
        r
        for r in payload["runs"]
        if r["stage"] == "run"
        and r.get("ok")
        and r["cell"] == target_cell(workload)
        and r["entry"] == "ddp_adamw"
        and r["steps_budget"] == steps_b
    ]


def analyse(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: the target (median of DDP's target seeds), DDP's time in the cell and the
    cell's limit; per contender: finals at B steps, the ladder, each seed's time to target, the
    median, speedups over DDP and over the best peer, fraction of the limit, bytes, comm share."""
    runs = [r for r in payload["runs"] if r["stage"] == "run" and r.get("ok")]
    seeds = tuple(payload.get("constants", {}).get("seeds", SEEDS))
    b = budgets(payload)
    out = []
    for spec in CELLS:
        cell = [r for r in runs if r["cell"] == spec.key]
        free = [r for r in runs if r["cell"] == spec.unlimited_key and r["entry"] == "ddp_adamw"]
        steps_b = b[spec.workload]
        finals = _stats([final_loss(r) for r in target_runs(payload, spec.workload)])
        ddp = [r for r in cell if r["entry"] == "ddp_adamw" and r["steps_budget"] == steps_b]
        if not ddp or finals["median"] is None:
            continue
        target = finals["median"]
        ddp_time = statistics.mean(r["train_time_s"] for r in ddp)
        limit = ddp_time / free[0]["train_time_s"] if free else None
        summary: dict[str, Any] = {
            "cell": spec.key,
            "target_val_loss": target,
            "target_seeds": finals,
            "ddp_train_time_s": _stats([r["train_time_s"] for r in ddp]),
            "ddp_no_limit_train_time_s": free[0]["train_time_s"] if free else None,
            "limit": limit,
            "speedup_target": TARGETS.get(spec.key),
            "rows": [],
        }
        for name in spec.entries:
            mine = [r for r in cell if r["entry"] == name]
            if mine:
                summary["rows"].append(
                    _row(name, mine, ddp, free, target, ddp_time, limit, finals, steps_b, seeds)
                )
        _versus_best_peer(summary["rows"])
        out.append(summary)
    return out


def bounds(payload: dict[str, Any], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a contender reaches with no rate limit (the ``bound`` stage's runs: its seeds at one
    step budget in the cell's hosts, ``CellSpec.unlimited_key``): per rate-limited cell of those
    hosts that races it, its time to target with no limit (the median over ``SEEDS``, a miss
    counting as never), its time in the cell, the cell's best peer and the most the contender
    could be faster than that peer: the peer's time / its own with no limit. Communication
    alone cannot take it past that; only fewer steps to the target or cheaper steps can."""
    runs = [r for r in payload["runs"] if r["stage"] == "run" and r.get("ok")]
    seeds = tuple(payload.get("constants", {}).get("seeds", SEEDS))
    out = []
    for cell in cells:
        spec = next(s for s in CELLS if s.key == cell["cell"])
        free = [r for r in runs if r["cell"] == spec.unlimited_key and r["entry"] != "ddp_adamw"]
        rows = {r["entry"]: r for r in cell["rows"]}
        best = _best_peer(cell["rows"])
        for name, steps in sorted({(r["entry"], r["steps_budget"]) for r in free}):
            if name not in spec.entries:
                continue
            times = {
                r["seed"]: time_to_target(r["curve"], cell["target_val_loss"])
                for r in free
                if r["entry"] == name and r["steps_budget"] == steps
            }
            t = median_time(times, seeds)
            here = rows.get(name, {})
            out.append(
                {
                    "cell": spec.key,
                    "entry": name,
                    "steps": steps,
                    "no_limit_time_to_target_per_seed": times,
                    "no_limit_time_to_target_s": t,
                    "seeds_crossing": f"{sum(v is not None for v in times.values())}/{len(seeds)}",
                    "time_to_target_s": here.get("time_to_target_s"),
                    "rung": here.get("rung"),
                    "best_peer": None if best is None else best["entry"],
                    "best_peer_time_to_target_s": None
                    if best is None
                    else best["time_to_target_s"],
                    "most_over_best_peer": (
                        None if best is None or not t else best["time_to_target_s"] / t
                    ),
                }
            )
    return out


def _best_peer(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The peer row that reached the target soonest (None: no peer reached it)."""
    peers = [r for r in rows if r["family"] == "peer" and r.get("rung")]
    return min(peers, key=lambda r: r["time_to_target_s"], default=None)


def _versus_best_peer(rows: list[dict[str, Any]]) -> None:
    """Each distributed Ranger row: the best peer's time to target / its own."""
    best = _best_peer(rows)
    for r in rows:
        if r["family"] == "rangerdl" and best is not None and r.get("time_to_target_s"):
            r["speedup_over_best_peer"] = best["time_to_target_s"] / r["time_to_target_s"]


def _row(
    name: str,
    mine: list[dict[str, Any]],
    ddp: list[dict[str, Any]],
    free: list[dict[str, Any]],
    target: float,
    ddp_time: float,
    limit: float | None,
    finals: dict[str, Any],
    steps_b: int,
    seeds: tuple[int, ...],
) -> dict[str, Any]:
    """One contender's row of a cell (see :func:`analyse`)."""
    entry = ENTRIES[name]
    equal = _stats([final_loss(r) for r in mine if r["steps_budget"] == steps_b])
    if name == "ddp_adamw":  # its loss per step is the target seeds' (the link changes no loss)
        equal = finals
    row: dict[str, Any] = {"entry": name, "lr": mine[0]["lr"], "k": entry.k}
    row |= {"what": entry.what, "family": entry.family, "equal_tokens": equal}
    if equal["median"] is not None:
        row["vs_ddp"] = equal["median"] / target - 1
        row["within_ddp_spread"] = equal["median"] <= finals["max"]
    row["ladder"] = [
        {
            "steps": steps,
            "time_to_target_per_seed": seed_times(at, target),
            "final_val_loss_per_seed": {int(r["seed"]): final_loss(r) for r in at},
            "train_time_s_per_seed": {int(r["seed"]): r["train_time_s"] for r in at},
        }
        for steps in sorted({r["steps_budget"] for r in mine})
        for at in [[r for r in mine if r["steps_budget"] == steps]]
    ]
    hit_rows: list[dict[str, Any]] = []
    if name == "ddp_adamw":
        row["time_to_target_s"] = ddp_time
        hit_rows = ddp
    else:
        hit = rung_reached(mine, target, seeds)
        if hit is not None:
            hit_rows = sorted(
                (r for r in mine if r["steps_budget"] == hit), key=lambda r: r["seed"]
            )
            times = seed_times(hit_rows, target)
            crossed = [t for t in times.values() if t is not None]
            row |= {"rung": hit, "time_to_target_per_seed": times}
            row["time_to_target_s"] = median_time(times, seeds)
            row["time_to_target_min_s"] = min(crossed)
            row["time_to_target_max_s"] = max(crossed) if len(crossed) == len(seeds) else None
            row["seeds_crossing"] = f"{len(crossed)}/{len(seeds)}"
        elif {r["seed"] for r in mine} < set(seeds):  # not every seed has run: seed 0's crossing
            first = next((x for x in row["ladder"] if x["time_to_target_per_seed"].get(0)), None)
            if first is not None:
                row["seed0_only"] = {
                    "rung": first["steps"],
                    "time_to_target_s": first["time_to_target_per_seed"][0],
                }
    t = row.get("time_to_target_s")
    if t and name != "ddp_adamw":
        row["speedup"] = ddp_time / t
        row["fraction_of_limit"] = row["speedup"] / limit if limit else None
    if hit_rows:
        r0 = hit_rows[0]
        row["bytes_per_rank"] = r0.get("bytes_per_rank_counted")
        ddp_bytes = ddp[0].get("bytes_per_rank_counted")
        if row["bytes_per_rank"] and ddp_bytes:
            row["bytes_fewer_than_ddp"] = ddp_bytes / row["bytes_per_rank"]
        if r0.get("comm_time_s") is not None and name != "ddp_adamw":
            row["comm_share"] = r0["comm_time_s"] / r0["train_time_s"]
        elif free:  # DDP overlaps its all-reduce with backward: 1 - T(no limit) / T
            row["comm_share"] = 1 - free[0]["train_time_s"] / r0["train_time_s"]
        row["others_cpu_share"] = max(r.get("others_cpu_share") or 0 for r in hit_rows)
    return row
