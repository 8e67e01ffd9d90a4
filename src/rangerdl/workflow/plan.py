"""``rangerdl plan``: what communication will cost, per step and per run, before launching.

Inputs: the number of parameters ``n`` and one worker's compute per step ``t_c = t_fwd + t_bwd +
t_opt`` (timed here on the configured model and per-worker batch, or given with ``--params`` and
``--step-time``), ``W`` workers, and the link (bandwidth, latency alpha, payload efficiency).
``T_ar(n, b)`` is the ring all-reduce of ``n`` values of ``b`` bytes and ``T_ag`` the all-gather /
all-to-all, both from :mod:`rangerdl.distributed.cost` (Thakur, Rabenseifner and Gropp, IJHPCA
2005; Patarasuk and Yuan, JPDC 2009)::

    T_ar(n, b) = 2 (W-1) alpha + 2 (W-1)/W n b / B          B: payload bytes per second
    T_ag(n, b) =   (W-1) alpha +   (W-1)/W n b / B

Per strategy (``S`` = optimizer steps in the run, ``k`` = steps between syncs):

- DDP (gradient all-reduce every step, fp32, in buckets: the first 1 MiB, then 25 MiB, torch's
  defaults, the last layers' gradients first). Comm per step ``T_ar(n, 4)`` plus one ``2 (W-1)
  alpha`` per extra bucket. Step time: at best ``t_fwd + max(t_bwd, comm) + t_opt`` (all of it
  hidden behind backward), at worst ``t_c + comm`` (none hidden); the estimate simulates the
  buckets, each launched when backward has produced its gradients (gradients assumed to appear in
  proportion to their bytes) and sent one after the other (Li et al., "PyTorch Distributed", VLDB
  2020, section 3.2.3). The full buckets are alike and become ready at a steady pace, so their
  run is computed at once: the last one is done at the later of the run sent back to back from
  its first bucket, and the last bucket sent as soon as it is ready.
- PostLocalSGD(k): ``floor(S/k)`` blocking all-reduces of the parameters, ``T_ar(n, 4)`` each.
- Distributed Ranger(k), fp32: ``ceil(S/k)`` syncs (``finish()`` syncs the remainder), each
  ``T_ar(n, 4)`` plus a step-count check and the floating buffers (``T_ar(2, 8)``,
  ``T_ar(n_buf, 4)``). bf16: the pseudo-gradient by all-to-all then all-gather in bf16,
  ``2 T_ag(n, 2)``: half the bytes, twice the latency terms. Overlap: launched after the sync step
  and waited for ``d`` steps later (``[distributed] overlap_steps``; the row uses the smallest
  ``d <= k`` with ``d t_c >= T_sync`` and names it), so only ``max(0, T_sync - d t_c)`` blocks; the
  sync launched at the last step has nothing to hide behind. bf16 with overlap: both.
- Distributed Ranger(k) with ``[distributed] compression`` int8/int4/int2/topk (rows without
  overlap): the encoded pseudo-gradient by all-to-all then all-gather, ``2 T_ag`` of ``W P``
  bytes, ``P`` the bytes of one encoded chunk of ``ceil(n / W)`` values
  (:func:`rangerdl.distributed.cost.payload_bytes`: values, fp32 block scales, top-k positions;
  ``block_size`` 256, ``topk_density`` 0.03 unless given). Encoding and decoding time is not
  in the model (``benchmarks/compression.py`` measures it on the GPT workload: 0.6-1.1% of
  the time of the 8 steps between syncs, top-k 2.3%).

Share communicating = comm / (compute + comm), per run. The smallest ``k`` under a share is found
by bisection over ``1..S``. Speedup over DDP = DDP's estimated run time / the row's; no
method beats compute alone, so ``DDP / compute`` is the bound on any speedup.

Where it errs (``benchmarks/plan_check.py``): it leaves out waiting for the slowest worker, TCP
slow start after idle, and the loop's own work outside the optimizer step; on the netsim
benchmarks it is 2-13% optimistic per collective.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rangerdl.distributed.cost import (
    Link,
    allreduce_time,
    compressed_sync_bytes,
    compressed_sync_time,
    ring_bytes,
)
from rangerdl.train.config import MAX_COUNT, Bounds
from rangerdl.units import format_bandwidth, format_bytes, format_seconds

log = logging.getLogger(__name__)

__all__ = [
    "COMPRESSED",
    "DDP_BUCKET_BYTES",
    "DDP_FIRST_BUCKET_BYTES",
    "DEFAULT_KS",
    "LIMITS",
    "Payload",
    "Plan",
    "Row",
    "StepTimes",
    "check_option",
    "count_and_time",
    "ddp_step_time",
    "format_plan",
    "make_plan",
    "sync_time",
]

DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel(bucket_cap_mb=25)
DEFAULT_KS = (4, 8, 16, 32, 64, 128)
COMPRESSED = ("int8", "int4", "int2", "topk")
"""The payloads below bf16 that ``make_plan`` adds a row for at every k."""
BACKWARD_SHARE = 2 / 3
"""When only a step time is given: backward is twice the forward (2N and 4N FLOPs per token of
Kaplan et al., "Scaling laws for neural language models", 2020), the optimizer step folded in."""

LIMITS: dict[str, Bounds] = {
    "--params": Bounds(1, 10**15, integer=True, note="4 PB of fp32"),
    "--workers": Bounds(2, 10**6, integer=True, note="one worker communicates nothing"),
    "--bandwidth": Bounds(1.0, 1e15, unit=" bit/s"),
    "--latency": Bounds(0.0, 3600.0, unit=" s"),
    "--efficiency": Bounds(0.01, 1.0, note="the payload share of the bytes on the wire"),
    "--step-time": Bounds(1e-9, 1e6, unit=" s"),
    "--steps": Bounds(1, MAX_COUNT, integer=True),
    "--k": Bounds(1, MAX_COUNT, integer=True),
    "--max-share": Bounds(0.0, 1.0, open_low=True, open_high=True),
}
"""The range of each input of ``rangerdl plan``, by its option: far past any cluster, and narrow
enough that every figure of the plan, at any corner, is a finite float far from overflow."""


def check_option(option: str, value: Any) -> Any:
    """``value`` if it is in the range of ``option`` (:data:`LIMITS`), else ``ValueError``."""
    LIMITS[option].check(value, option)
    return value


@dataclass(frozen=True)
class StepTimes:
    """One worker's compute per step, in seconds."""

    forward_s: float
    backward_s: float
    optimizer_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    @classmethod
    def from_total(cls, step_s: float) -> StepTimes:
        if not step_s > 0:
            raise ValueError(f"step time must be > 0 s, got {step_s}")
        return cls((1 - BACKWARD_SHARE) * step_s, BACKWARD_SHARE * step_s)


def ddp_buckets(numel: int, element_size: int = 4) -> list[tuple[int, int]]:
    """DDP's gradient buckets in the order they are sent, as runs of ``(values per bucket,
    buckets)``: the first bucket, the full ones, the rest (at most three runs for any size)."""
    total = numel * element_size
    first = min(DDP_FIRST_BUCKET_BYTES, total)
    full, rest = divmod(total - first, DDP_BUCKET_BYTES)
    runs = [(first, 1 if first else 0), (DDP_BUCKET_BYTES, full), (rest, 1 if rest else 0)]
    return [(math.ceil(size / element_size), count) for size, count in runs if count]


def ddp_step_time(
    times: StepTimes, numel: int, world_size: int, link: Link
) -> tuple[float, float, float, float]:
    """``(best, estimate, worst, comm)`` seconds per DDP step (see the module docstring)."""
    free, done, comm = times.forward_s, 0, 0.0
    for size, count in ddp_buckets(numel):
        per_bucket = allreduce_time(size, 4, world_size, link)
        first_ready = times.forward_s + times.backward_s * (done + size) / numel
        done += size * count
        last_ready = times.forward_s + times.backward_s * done / numel
        # bucket j is done at max over i <= j of (ready_i + (j - i + 1) per_bucket), or at
        # free + j per_bucket; with ready_i linear in i, the largest term is at i = 1 or i = j
        free = max(max(free, first_ready) + count * per_bucket, last_ready + per_bucket)
        comm += count * per_bucket
    end_of_backward = times.forward_s + times.backward_s
    estimate = max(free, end_of_backward) + times.optimizer_s
    best = times.forward_s + max(times.backward_s, comm) + times.optimizer_s
    return best, estimate, times.total_s + comm, comm


@dataclass(frozen=True)
class Payload:
    """What a distributed-Ranger sync sends (``[distributed] compression`` and its settings)."""

    compression: str = "none"
    block_size: int = 256
    topk_density: float = 0.03

    @classmethod
    def of(cls, comm_dtype: str = "fp32", compression: str = "none", **kwargs: Any) -> Payload:
        """From ``comm_dtype`` (the alias: ``bf16`` is ``compression = "bf16"``) and
        ``compression``."""
        if comm_dtype not in ("fp32", "bf16"):
            raise ValueError(f"comm_dtype must be fp32 or bf16, got {comm_dtype!r}")
        if comm_dtype == "bf16" and compression == "none":
            compression = "bf16"
        return cls(compression, **kwargs)

    def sync_bytes(self, numel: int, world_size: int) -> int:
        """Bytes one rank sends in the sync's main collectives."""
        if self.compression == "none":
            return ring_bytes(numel, 4, world_size)
        return compressed_sync_bytes(
            self.compression, numel, world_size, self.block_size, self.topk_density
        )

    def sync_time(self, numel: int, world_size: int, link: Link) -> float:
        """Seconds of the sync's main collectives."""
        if self.compression == "none":
            return allreduce_time(numel, 4, world_size, link)
        return compressed_sync_time(
            self.compression, numel, world_size, link, self.block_size, self.topk_density
        )


def sync_time(
    numel: int,
    world_size: int,
    link: Link,
    *,
    comm_dtype: str = "fp32",
    buffer_numel: int = 0,
    payload: Payload | None = None,
) -> float:
    """Seconds for one distributed-Ranger sync (``rangerdl.distributed.sync.OuterSync._sync``):
    the payload's collectives (``payload``, else ``comm_dtype``), the step-count check and the
    floating buffers."""
    payload = payload or Payload.of(comm_dtype)
    main = payload.sync_time(numel, world_size, link)
    check = allreduce_time(2, 8, world_size, link)
    buffers = allreduce_time(buffer_numel, 4, world_size, link) if buffer_numel else 0.0
    return main + check + buffers


@dataclass
class Row:
    """One strategy: totals per run (``steps`` optimizer steps), per-step averages derived."""

    strategy: str
    k: int
    comm_dtype: str
    overlap: bool
    steps: int
    compute_s: float  # per run
    comm_s: float  # per run, time blocked communicating
    bytes_per_rank: float  # per run
    syncs: int
    step_bounds_s: tuple[float, float] | None = None  # DDP: (best, worst) per step
    overlap_steps: int = 0  # overlap: steps of compute the all-reduce may take
    compression: str = "none"  # [distributed] compression ("bf16" also for comm_dtype bf16)

    @property
    def run_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def step_s(self) -> float:
        return self.run_s / self.steps

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.run_s if self.run_s else 0.0

    @property
    def label(self) -> str:
        if self.strategy != "lookahead":
            return {"ddp": "DDP", "post_local_sgd": f"PostLocalSGD k={self.k}"}[self.strategy]
        extra = f", {self.compression}" if self.compression != "none" else ""
        if self.overlap:
            extra += f", overlap_steps {self.overlap_steps}"
        return f"distributed Ranger k={self.k}{extra}"

    @property
    def settings(self) -> str:
        """A distributed Ranger row as the ``[distributed]`` table of a training config (TOML)."""
        keys = [f"sync_every = {self.k}"]
        if self.compression != "none":
            keys.append(f'compression = "{self.compression}"')
        if self.overlap:
            keys += ["overlap = true", f"overlap_steps = {self.overlap_steps}"]
        return "\n".join(["[distributed]", *keys])

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out |= {"label": self.label, "run_s": self.run_s, "step_s": self.step_s}
        return out | {"comm_share": self.comm_share}


def ddp_row(times: StepTimes, numel: int, world_size: int, link: Link, steps: int) -> Row:
    best, estimate, worst, _ = ddp_step_time(times, numel, world_size, link)
    return Row(
        "ddp",
        1,
        "fp32",
        True,
        steps,
        compute_s=steps * times.total_s,
        comm_s=steps * (estimate - times.total_s),
        bytes_per_rank=steps * ring_bytes(numel, 4, world_size),
        syncs=steps,
        step_bounds_s=(best, worst),
    )


def local_row(
    times: StepTimes,
    numel: int,
    world_size: int,
    link: Link,
    steps: int,
    *,
    strategy: str = "lookahead",
    k: int,
    comm_dtype: str = "fp32",
    overlap: bool = False,
    buffer_numel: int = 0,
    payload: Payload | None = None,
) -> Row:
    """PostLocalSGD or distributed Ranger syncing every ``k`` steps (module docstring); what a
    sync sends is ``payload`` (default: from ``comm_dtype``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    payload = payload or Payload.of(comm_dtype)
    overlap_steps = 0
    if strategy == "post_local_sgd":
        syncs = steps // k
        per_sync = allreduce_time(numel, 4, world_size, link)
        comm = syncs * per_sync
        sent = syncs * ring_bytes(numel, 4, world_size)
    else:
        syncs = math.ceil(steps / k)
        per_sync = sync_time(numel, world_size, link, buffer_numel=buffer_numel, payload=payload)
        if overlap and syncs:
            # the smallest [distributed] overlap_steps whose compute covers the all-reduce
            overlap_steps = min(k, max(1, math.ceil(per_sync / max(times.total_s, 1e-12))))
            hidden_syncs = steps // k - 1 if steps % k == 0 else steps // k
            exposed = max(0.0, per_sync - overlap_steps * times.total_s)
            comm = hidden_syncs * exposed + (syncs - hidden_syncs) * per_sync
        else:
            comm = syncs * per_sync
        sent = syncs * payload.sync_bytes(numel, world_size)
        sent += syncs * ring_bytes(buffer_numel, 4, world_size)
    return Row(
        strategy,
        k,
        "bf16" if payload.compression == "bf16" else "fp32",
        overlap,
        steps,
        steps * times.total_s,
        comm,
        sent,
        syncs,
        overlap_steps=overlap_steps,
        compression=payload.compression if strategy == "lookahead" else "none",
    )


def smallest_k(max_share: float, build: Any, steps: int) -> int | None:
    """The smallest ``k`` in 1..steps whose row (``build(k)``) communicates at most ``max_share``
    of the time (the share falls as k grows, so bisect)."""
    lo, hi = 1, steps
    if build(hi).comm_share > max_share:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if build(mid).comm_share <= max_share:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class Plan:
    numel: int
    buffer_numel: int
    times: StepTimes
    times_source: str
    world_size: int
    link: Link
    steps: int
    max_share: float
    rows: list[Row] = field(default_factory=list)
    smallest_k: dict[str, int | None] = field(default_factory=dict)
    smallest_rows: dict[str, Row] = field(default_factory=dict)  # the row at each smallest k
    caution: str | None = None  # the timing's, printed under the verdict (busy_note)

    @property
    def ddp(self) -> Row:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.numel,
            "buffers": self.buffer_numel,
            "step_times_s": dataclasses.asdict(self.times) | {"total_s": self.times.total_s},
            "step_times_source": self.times_source,
            "workers": self.world_size,
            "link": dataclasses.asdict(self.link),
            "steps": self.steps,
            "max_share": self.max_share,
            "rows": [r.to_dict() | {"speedup_vs_ddp": self.ddp.run_s / r.run_s} for r in self.rows],
            "smallest_k": self.smallest_k,
            "speedup_bound": self.ddp.run_s / self.ddp.compute_s,
        }


def make_plan(
    *,
    numel: int,
    times: StepTimes,
    world_size: int,
    link: Link,
    steps: int,
    ks: tuple[int, ...] = DEFAULT_KS,
    plsgd_k: int = 16,
    max_share: float = 0.1,
    buffer_numel: int = 0,
    times_source: str = "given",
    compressions: tuple[str, ...] = COMPRESSED,
    block_size: int = 256,
    topk_density: float = 0.03,
) -> Plan:
    """Every row of ``rangerdl plan`` (see the module docstring): per k, fp32 and bf16 with and
    without overlap, and each of ``compressions`` (with ``block_size``, ``topk_density``).

    Raises:
        ValueError: an input outside its range in :data:`LIMITS`, named by its option.
    """
    for option, value in (
        ("--params", numel),
        ("--workers", world_size),
        ("--bandwidth", link.bandwidth_bps),
        ("--latency", link.latency_s),
        ("--efficiency", link.efficiency),
        ("--step-time", times.total_s),
        ("--steps", steps),
        ("--max-share", max_share),
        *(("--k", k) for k in ks),
    ):
        check_option(option, value)
    args = (times, numel, world_size, link, steps)
    plan = Plan(numel, buffer_numel, times, times_source, world_size, link, steps, max_share)
    plan.rows.append(ddp_row(*args))
    plan.rows.append(local_row(*args, strategy="post_local_sgd", k=plsgd_k))
    variants = {
        "fp32": (Payload(), False),
        "bf16": (Payload("bf16"), False),
        "overlap": (Payload(), True),
        "bf16 overlap": (Payload("bf16"), True),
    }
    for name in compressions:
        variants[name] = (Payload(name, block_size, topk_density), False)
    for k in sorted(set(ks)):
        for payload, overlap in variants.values():
            plan.rows.append(
                local_row(*args, k=k, payload=payload, overlap=overlap, buffer_numel=buffer_numel)
            )
    for name, (payload, overlap) in variants.items():

        def build(k: int, payload: Payload = payload, overlap: bool = overlap) -> Row:
            return local_row(
                *args, k=k, payload=payload, overlap=overlap, buffer_numel=buffer_numel
            )

        plan.smallest_k[name] = least = smallest_k(max_share, build, steps)
        if least is not None:
            plan.smallest_rows[name] = build(least)
    return plan


def verdict(plan: Plan) -> str:
    """The plan in a line: does communication dominate DDP's step here, and the smallest k
    that keeps distributed Ranger's communication within ``max_share``, with the first payload
    (in the table's order) that reaches it: fp32 or bf16 (which loses no quality, measured)
    first; a compressed payload only where those need a larger k (it can cost quality). Then that
    setting as the ``[distributed]`` table of a training config (TOML lines to paste)."""
    ddp, limit = plan.ddp, _ratio(plan.ddp.run_s / plan.ddp.compute_s)
    head = f"verdict: DDP spends {100 * ddp.comm_share:.0f}% of each step communicating here"
    if ddp.comm_share <= plan.max_share:
        return f"{head}: DDP is fine on this link (local updates save at most {limit})"
    found = {name: k for name, k in plan.smallest_k.items() if k is not None}
    if not found:
        return f"{head}; no k up to {plan.steps} keeps communication within the share"
    plain = {name: k for name, k in found.items() if name not in COMPRESSED}
    name = min(plain or found, key=lambda n: found[n])  # min keeps the table's order on ties
    say = f"{head} (speedup bound {limit}); distributed Ranger keeps it within "
    say += f"{100 * plan.max_share:g}% from k = {found[name]} ({name})"
    smaller = {n: k for n, k in found.items() if n in COMPRESSED and k < found[name]}
    if smaller:
        n = min(smaller, key=lambda x: smaller[x])
        say += f", or k = {smaller[n]} with compression = {n} (check its loss)"
    setting = f"# in the training config (k = {found[name]}, {name}):"
    return f"{say}\n{setting}\n{plan.smallest_rows[name].settings}"


def format_plan(plan: Plan) -> str:
    t, link, ddp = plan.times, plan.link, plan.ddp
    lines = [verdict(plan), *([plan.caution] if plan.caution else []), ""]
    lines += [
        f"model: {plan.numel:,} parameters ({format_bytes(4 * plan.numel)} fp32)"
        + (f", {plan.buffer_numel:,} floating buffer values" if plan.buffer_numel else ""),
        f"compute per worker and step: {format_seconds(t.total_s)} "
        f"(forward {format_seconds(t.forward_s)}, backward {format_seconds(t.backward_s)}, "
        f"optimizer {format_seconds(t.optimizer_s)}; {plan.times_source})",
        f"{plan.world_size} workers, {format_bandwidth(link.bandwidth_bps)} per link, latency "
        f"{format_seconds(link.latency_s)}, payload efficiency {link.efficiency:.3f}; "
        f"{plan.steps} steps",
        "",
    ]
    header = (
        "strategy",
        "bytes/rank/step",
        "comm/step",
        "step",
        "comm share",
        "run",
        "bytes/rank/run",
        "x DDP",
    )
    table = [header]
    for r in plan.rows:
        table.append(
            (
                r.label,
                format_bytes(r.bytes_per_rank / r.steps),
                format_seconds(r.comm_s / r.steps),
                format_seconds(r.step_s),
                f"{100 * r.comm_share:.0f}%",
                format_seconds(r.run_s),
                format_bytes(r.bytes_per_rank),
                _ratio(ddp.run_s / r.run_s),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    assert ddp.step_bounds_s is not None
    best, worst = ddp.step_bounds_s
    lines += [
        "",
        f"DDP step: {format_seconds(best)} if its all-reduce hid entirely behind backward, "
        f"{format_seconds(worst)} if none of it did; the row above ({format_seconds(ddp.step_s)}) "
        "simulates its buckets.",
        f"speedup bound over DDP: {_ratio(ddp.run_s / ddp.compute_s)} (DDP's run time / compute "
        "alone: no strategy does better)",
    ]
    for name, k in plan.smallest_k.items():
        what = f"k = {k}" if k is not None else f"none up to k = {plan.steps}"
        lines.append(f"smallest k with communication <= {100 * plan.max_share:g}% ({name}): {what}")
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 1e6 else f"{x:.3g}x"  # 3 significant digits, not 30 of them


def count_and_time(
    cfg: Any, world_size: int, *, repeats: int = 5
) -> tuple[int, int, StepTimes, str | None]:
    """``(parameters, floating buffer values, step times, caution)`` of the configured model on
    one worker's share of the global batch, timed here (median of ``repeats`` after 2 warm-up
    steps); the caution (:func:`busy_note`) when the machine looked busy."""
    import torch

    from rangerdl.train.data import open_data
    from rangerdl.train.models import build_model
    from rangerdl.train.optimizers import make_optimizer
    from rangerdl.train.runtime import Runtime
    from rangerdl.train.task import Task

    check_option("--workers", world_size)
    if cfg.data.batch_size % world_size:
        raise ValueError(
            f"[data] batch_size = {cfg.data.batch_size} (the global batch) must be divisible by "
            f"--workers {world_size}"
        )
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rt = Runtime(0, 1, 0, torch.device(device), None)
    splits = open_data(cfg.data, rt)
    train_ds = splits["train"]
    task = Task.from_metadata(train_ds.metadata)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model.name, cfg.model.args, task.model_kwargs).to(rt.device)
    optimizer = make_optimizer(cfg.optim, model.parameters())
    numel = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    from rangerdl.data import collate

    per_worker = cfg.data.batch_size // world_size
    batch = collate([train_ds[i % len(train_ds)] for i in range(per_worker)])
    x, y = batch["x"].to(rt.device), batch["y"].to(rt.device)

    def clock() -> float:
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        return time.perf_counter()

    samples: list[tuple[float, float, float]] = []
    for i in range(2 + repeats):
        t0 = clock()
        loss = task.loss(model(x), y, batch.get("mask"))
        t1 = clock()
        loss.backward()
        t2 = clock()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = clock()
        if i >= 2:
            samples.append((t1 - t0, t2 - t1, t3 - t2))
    fwd, bwd, opt = (statistics.median(s[j] for s in samples) for j in range(3))
    note = busy_note([sum(s) for s in samples], torch.get_num_threads())
    return numel, buffers, StepTimes(fwd, bwd, opt), note


BUSY_SPREAD = 1.5
"""Slowest over fastest timed step above which the timing is called unreliable."""


def busy_note(step_s: list[float], threads: int, *, cpus: int | None = None) -> str | None:
    """The caution to print under the verdict when the timed steps say the machine was busy (the
    slowest step took more than ``BUSY_SPREAD`` x the fastest, or the load average exceeds the
    CPUs), else ``None``. A plan made from such a timing can give the opposite verdict (a step
    timed 300x too slow makes any network look fast)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cpus = cpus or os.cpu_count() or 1
    spread = max(step_s) / min(step_s) if min(step_s) > 0 else 1.0
    if spread <= BUSY_SPREAD and load <= cpus:
        return None
    if spread > BUSY_SPREAD:
        why = f"the timed steps varied {spread:.1f}x (load average {load:.1f} on {cpus} CPUs)"
    else:
        why = f"the load average is {load:.1f} on {cpus} CPUs (the timed steps agreed within {spread:.1f}x)"
    fewer = ", with --train.threads=1," if threads > 1 else ""
    return (
        f"caution: {why}, {threads} torch thread{'s' if threads > 1 else ''}: other work may have "
        "slowed the timed steps, and every figure below with them. Rerun on an idle "
        f"machine{fewer} or give --params and --step-time"
    )
