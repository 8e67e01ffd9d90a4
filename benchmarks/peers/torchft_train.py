"""DiLoCo and Streaming DiLoCo (torchft 0.2.0, ``torchft.local_sgd.DiLoCo``) trained on what
``rangerdl train`` trains: an outside contender of the time-to-quality benchmark.

One process is one replica group, one simulated host. ``launch.py`` starts the Lighthouse and the
groups; by hand::

    torchft_lighthouse --bind 127.0.0.1:29510 --min_replicas 2 &
    REPLICA_GROUP_ID=0 NUM_REPLICA_GROUPS=2 TORCHFT_LIGHTHOUSE=http://127.0.0.1:29510 \\
        python benchmarks/peers/torchft_train.py benchmarks/configs/ttq_gpt.toml \\
        --optim.name=adamw --optim.lr=2e-3 --diloco.sync_every=8 --run.name=diloco &
    REPLICA_GROUP_ID=1 ... (the same)

Arguments: those of ``rangerdl train`` (a TOML config and ``--table.key=value`` overrides) and
``--diloco.KEY=VALUE`` (:class:`DilocoOptions`). Environment: ``REPLICA_GROUP_ID``,
``NUM_REPLICA_GROUPS``, ``TORCHFT_LIGHTHOUSE`` (``http://HOST:PORT``) and ``REPLICA_GROUP_HOST``,
the address the other groups reach this one at (its store, its manager; default: the host name).

The same as ``rangerdl train --distributed.strategy=post_local_sgd`` on W = NUM_REPLICA_GROUPS
workers with the same config: the model built from ``[run] seed`` (identical in every group, so
torchft's ``init_sync`` is off and nothing is broadcast); group i reads the shard that rank i of W
reads, in the same order, ``[data] batch_size / W`` samples a step; dropout seeded
``seed + 1 + i``; torch AdamW with ``[optim]`` lr, betas, eps and weight_decay under the
``[schedule]`` multiplier; ``[train] grad_clip``; validation on the same windows
(``eval_batches``, ``final_eval_batches``) every ``eval_every`` steps; ``time/train_s`` on group 0
with evaluation left out. Only group 0 evaluates and writes the run folder (``config.json``,
``diloco.json``, ``metrics.jsonl``, ``summary.json``).

The outer step (DiLoCo, arXiv:2311.08105): every ``sync_every`` inner steps the pseudo-gradients
``theta_global - theta_i`` are averaged over the groups (fp32 all-reduces) and torch
``SGD(lr=outer_lr, momentum, nesterov)`` steps ``theta_global`` with the mean; every group then
continues from ``theta_global``, its AdamW state kept. ``outer_lr = 1`` without momentum gives
``theta_global = mean(theta_i)``: local SGD, as PostLocalSGD averages. Streaming DiLoCo
(arXiv:2501.18512, ``fragments = F > 1``): the model's layers (:func:`model_layers`) are cut into
F contiguous fragments of about equal size; every ``sync_every / F`` steps one fragment is synced
in turn (each once every ``sync_every`` steps), its all-reduce launched ``fragment_sync_delay``
steps before it is waited for (the fragment's local steps in between are dropped: torchft's
``fragment_update_alpha = 0``). Peak bytes per sync divide by F, the total does not.

What is evaluated: the global weights, each fragment as its latest outer step left it (torchft's
backup copy), the same in every group. With one fragment these are the model itself at every
sync step, where evaluations fall (``eval_every`` is a multiple of ``sync_every``). With F > 1 the
other fragments' local steps since their own sync are not in them: the model a newcomer would get.

Counted: ``comm/bytes``, the ring-model bytes per rank of every all-reduce handed to torchft
(:func:`rangerdl.distributed.cost.ring_bytes`, as rangerdl counts its own); ``comm/syncs``,
committed fragment syncs; ``comm/time_s``, time blocked in the sync (quorum and commit RPCs,
all-reduce waits, outer step), measured around DiLoCo's optimizer hook.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from rangerdl._fileio import atomic_write_text
from rangerdl._lock import FolderLock
from rangerdl.distributed.cost import ring_bytes
from rangerdl.optim.schedules import Multiplier
from rangerdl.train.config import Config, DistributedConfig, load_config, parse_overrides
from rangerdl.train.data import open_data, training_splits
from rangerdl.train.evaluate import evaluate
from rangerdl.train.metrics import MetricsLogger
from rangerdl.train.models import build_model
from rangerdl.train.run_folder import RunFolder, choose_run_folder, record_config
from rangerdl.train.runtime import Runtime
from rangerdl.train.task import Task

log = logging.getLogger("torchft_train")

TORCHFT_VERSION = "0.2.0"
"""The torchft this peer is written against (``make setup`` installs it)."""


@dataclass
class DilocoOptions:
    """``--diloco.KEY=VALUE``: the outer optimization and torchft's settings."""

    sync_every: int = 8
    """Inner steps between two syncs of the whole model (of each fragment with F > 1)."""
    outer_lr: float = 0.7
    """Outer SGD learning rate (DiLoCo's published 0.7; 1 with no momentum: plain averaging)."""
    outer_momentum: float = 0.9
    """Outer SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum for the outer SGD (needs ``outer_momentum > 0``)."""
    fragments: int = 1
    """1: DiLoCo; F > 1: Streaming DiLoCo with F fragments (at most the model's layers)."""
    fragment_sync_delay: int = 0
    """Inner steps between launching a fragment's all-reduce and waiting for it (Streaming
    DiLoCo's tau); below ``sync_every / fragments``."""
    quorum_timeout_s: float = 600.0
    """How long a group waits for the others at a sync (longer than group 0's evaluations)."""
    timeout_s: float = 300.0
    """torchft's timeout for collectives and the commit RPC."""
    connect_timeout_s: float = 60.0
    """How long to wait for the Lighthouse and the other groups' managers to answer."""

    def validate(self) -> None:
        """Raises ValueError naming the ``--diloco.*`` key and what is valid."""
        if self.sync_every < 1 or self.fragments < 1:
            raise ValueError("--diloco.sync_every and --diloco.fragments must be >= 1")
        if self.sync_every % self.fragments:
            raise ValueError(
                f"--diloco.sync_every={self.sync_every} must be a multiple of "
                f"--diloco.fragments={self.fragments} (one fragment syncs every "
                "sync_every / fragments steps)"
            )
        period = self.sync_every // self.fragments
        if not 0 <= self.fragment_sync_delay < period:
            raise ValueError(
                f"--diloco.fragment_sync_delay={self.fragment_sync_delay}: expected 0 to "
                f"{period - 1} (below sync_every / fragments = {period})"
            )
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError(
                f"--diloco.outer_lr={self.outer_lr}, --diloco.outer_momentum="
                f"{self.outer_momentum}: expected outer_lr > 0 and 0 <= outer_momentum < 1"
            )
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError(
                "--diloco.nesterov=true needs --diloco.outer_momentum > 0 (or "
                "--diloco.nesterov=false)"
            )
        for key in ("quorum_timeout_s", "timeout_s", "connect_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"--diloco.{key} must be > 0")


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(--diloco.* arguments, the rest)``; ``--key value`` pairs stay together."""
    mine: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        into = mine if arg.startswith("--diloco.") else rest
        into.append(arg)
        if arg.startswith("--") and "=" not in arg and i + 1 < len(argv):
            into.append(argv[i + 1])
            i += 1
        i += 1
    return mine, rest


def parse_diloco(args: list[str]) -> DilocoOptions:
    """``["--diloco.sync_every=32", ...]`` -> validated :class:`DilocoOptions`.

    Raises:
        ValueError: an unknown key, a value of the wrong type, or an invalid combination.
    """
    opts = DilocoOptions()
    types = {f.name: str(f.type) for f in dataclasses.fields(DilocoOptions)}
    for name, value in parse_overrides(args).get("diloco", {}).items():
        if name not in types:
            raise ValueError(f"--diloco.{name}: unknown; valid: {', '.join(types)}")
        want = types[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = {
            "int": number and isinstance(value, int),
            "float": number and math.isfinite(value),
            "bool": isinstance(value, bool),
        }[want]
        if not ok:
            raise ValueError(f"--diloco.{name}={value!r}: expected a finite {want}")
        setattr(opts, name, float(value) if want == "float" else value)
    opts.validate()
    return opts


def check_config(cfg: Config, opts: DilocoOptions, num_groups: int) -> None:
    """Refuse what this peer does not do (rather than ignore it), naming the key."""
    t = cfg.train
    problems = []
    if cfg.optim.name != "adamw" or cfg.optim.lookahead:
        problems.append(
            f"[optim] name = {cfg.optim.name!r}, lookahead = {cfg.optim.lookahead}: the inner "
            "optimizer here is torch AdamW (--optim.name=adamw, no lookahead)"
        )
    if cfg.distributed != DistributedConfig():
        problems.append(
            "[distributed] is rangerdl's own sync; this peer's is --diloco.*: leave "
            "[distributed] at its defaults"
        )
    if t.steps % opts.sync_every:
        problems.append(
            f"[train] steps = {t.steps} is not a multiple of --diloco.sync_every="
            f"{opts.sync_every} (the run would end between two syncs)"
        )
    if t.eval_every % opts.sync_every:
        problems.append(
            f"[train] eval_every = {t.eval_every} is not a multiple of --diloco.sync_every="
            f"{opts.sync_every}: evaluations fall right after a sync"
        )
    if t.eval_every and t.eval_every % t.log_every:
        problems.append(f"[train] eval_every = {t.eval_every}: a multiple of log_every, please")
    if cfg.data.batch_size % num_groups:
        problems.append(
            f"[data] batch_size = {cfg.data.batch_size} (the global batch) must be divisible by "
            f"the number of replica groups ({num_groups})"
        )
    unsupported = {
        "[train] checkpoint_every": (t.checkpoint_every, 0),
        "[train] stop_at": (t.stop_at, 0),
        "[train] on_nan": (t.on_nan, "stop"),
        "[run] resume": (cfg.run.resume, "never"),
    }
    for key, (value, only) in unsupported.items():
        if value != only:
            problems.append(f"{key} = {value!r}: this peer supports only {only!r}")
    if t.device not in ("cpu", "auto"):
        problems.append(f"[train] device = {t.device!r}: this peer runs on the CPU (gloo)")
    if problems:
        raise ValueError("torchft peer: " + "; ".join(problems))


# ---------------------------------------------------------------------------------- fragments
def model_layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The model's layers in order, each with the parameters it owns: its direct children, the
    elements of a ``ModuleList`` child one layer each, the model's own parameters last. A
    parameter shared with an earlier layer (tied weights) stays there; layers with no
    parameter of their own are left out."""
    seen: set[int] = set()
    out: list[tuple[str, list[nn.Parameter]]] = []

    def add(name: str, params: Iterator[nn.Parameter]) -> None:
        own = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            out.append((name, own))

    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for sub, module in child.named_children():
                add(f"{name}.{sub}", module.parameters())
        else:
            add(name, child.parameters())
    add("(model)", model.parameters(recurse=False))
    return out


def split_layers(sizes: list[int], parts: int) -> list[int]:
    """Cut points ``[0, ..., len(sizes)]`` of ``parts`` contiguous, non-empty groups of layers
    whose largest total size is the smallest possible (the linear partition problem)."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    points = [n]
    for k in range(parts, 0, -1):
        points.append(cut[k][points[-1]])
    return points[::-1]


def make_fragments(model: nn.Module, count: int) -> list[tuple[str, nn.Module]]:
    """``count`` fragments (a name and a module holding the very parameters of the model) of
    contiguous layers, of about equal size.

    Raises:
        ValueError: more fragments than the model has layers (they are named).
    """
    layers = model_layers(model)
    if count > len(layers):
        names = ", ".join(name for name, _ in layers)
        raise ValueError(
            f"--diloco.fragments={count}: the model has {len(layers)} layers to split ({names})"
        )
    points = split_layers([sum(p.numel() for p in ps) for _, ps in layers], count)
    out: list[tuple[str, nn.Module]] = []
    for a, b in itertools.pairwise(points):
        group = layers[a:b]
        name = group[0][0] if b - a == 1 else f"{group[0][0]}..{group[-1][0]}"
        out.append((name, nn.ParameterList([p for _, ps in group for p in ps])))
    return out


# ---------------------------------------------------------------------------------- torchft
@dataclass(frozen=True)
class ReplicaGroup:
    """Who this process is among the replica groups (from the environment)."""

    index: int
    count: int
    host: str
    lighthouse: str

    @classmethod
    def from_env(cls) -> ReplicaGroup:
        missing = [
            k
            for k in ("REPLICA_GROUP_ID", "NUM_REPLICA_GROUPS", "TORCHFT_LIGHTHOUSE")
            if not os.environ.get(k)
        ]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} not set: start the replica groups with "
                "benchmarks/peers/launch.py (or set them as its docstring says)"
            )
        index, count = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ["NUM_REPLICA_GROUPS"])
        if not 0 <= index < count:
            raise ValueError(f"REPLICA_GROUP_ID={index}: expected 0 to {count - 1}")
        host = os.environ.get("REPLICA_GROUP_HOST") or socket.gethostname()
        return cls(index, count, host, os.environ["TORCHFT_LIGHTHOUSE"])


def make_manager(group: ReplicaGroup, opts: DilocoOptions, state: nn.Module, inner: Any) -> Any:
    """A torchft Manager for this group (a group of one process, its own TCPStore) that counts
    the bytes of every all-reduce it is handed, and advertises ``group.host`` everywhere (its
    store, its manager server, its checkpoint server): under netsim every namespace resolves the
    host name to its own loopback."""
    from torch.distributed import ReduceOp, TCPStore
    from torchft.checkpointing.http_transport import HTTPTransport
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    class HostTransport(HTTPTransport):
        def address(self) -> str:
            port = self._server.socket.getsockname()[1]
            return f"http://{group.host}:{port}/checkpoint/"

    class CountingManager(Manager):
        counted_bytes = 0

        def allreduce(
            self, tensor: torch.Tensor, should_quantize: bool = False, reduce_op: Any = None
        ) -> Any:
            op = ReduceOp.AVG if reduce_op is None else reduce_op
            if not self.errored():  # an errored manager sends nothing
                world = max(self.num_participants(), 1)
                self.counted_bytes += ring_bytes(tensor.numel(), tensor.element_size(), world)
            return super().allreduce(tensor, should_quantize=should_quantize, reduce_op=op)

    timeout = timedelta(seconds=opts.timeout_s)
    store = TCPStore(group.host, 0, is_master=True, wait_for_workers=False)

    def load_state_dict(sd: dict[str, Any]) -> None:  # healing: a peer's model and AdamW state
        state.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner_optim"])

    manager = CountingManager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=lambda: {"model": state.state_dict(), "inner_optim": inner.state_dict()},
        min_replica_size=group.count,
        use_async_quorum=False,  # DiLoCo needs it
        timeout=timeout,
        quorum_timeout=timedelta(seconds=opts.quorum_timeout_s),
        connect_timeout=timedelta(seconds=opts.connect_timeout_s),
        rank=0,
        world_size=1,
        store_addr=group.host,
        store_port=store.port,
        lighthouse_addr=group.lighthouse,
        replica_id=f"group_{group.index}",
        hostname=group.host,
        checkpoint_transport=HostTransport(timeout=timeout, num_chunks=0),
        init_sync=False,  # every group builds the same weights from [run] seed
    )
    manager.keep_store = store  # the store must outlive the manager's clients
    return manager


class SyncClock:
    """Seconds spent inside the optimizer hooks registered between :meth:`start` and
    :meth:`stop` (torchft's DiLoCo sync)."""

    def __init__(self) -> None:
        self.time_s = 0.0
        self._t0 = 0.0

    def start(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def stop(self, *_: Any) -> None:
        self.time_s += time.perf_counter() - self._t0


@contextlib.contextmanager
def global_weights(diloco: Any) -> Iterator[None]:
    """Each fragment's weights as its latest outer step left them (torchft's backup copy),
    swapped in for the body and swapped back after it."""
    saved = []
    with torch.no_grad():
        for fragment in diloco._fragments:
            for name, p in fragment._model_fragment.named_parameters():
                saved.append((p, p.detach().clone()))
                p.copy_(fragment.original_parameters[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


# ---------------------------------------------------------------------------------- training
def open_run_folder(cfg: Config, opts: DilocoOptions, held: contextlib.ExitStack) -> RunFolder:
    """Group 0's run folder: chosen (a fresh run refuses an existing one) and locked, with the
    config and the DiLoCo options in it."""
    run = choose_run_folder(cfg.run.dir, cfg.run.name, cfg.model.name, None, cfg.run.resume)
    run.path.parent.mkdir(parents=True, exist_ok=True)
    held.enter_context(FolderLock(run.path, what="run folder"))
    record_config(run, cfg, 0)
    peer = {"program": "torchft", "torchft": TORCHFT_VERSION, **dataclasses.asdict(opts)}
    atomic_write_text(run.path / "diloco.json", json.dumps(peer, indent=2) + "\n")
    return run


def train(cfg: Config, opts: DilocoOptions, group: ReplicaGroup) -> dict[str, Any] | None:
    """Train this replica group; group 0 returns the summary (also in ``summary.json``)."""
    from torchft.local_sgd import DiLoCo

    from rangerdl.data import GlobalBatchSampler, collate

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    main = group.index == 0
    rt = Runtime(0, 1, 0, torch.device("cpu"), None)  # each group evaluates on its own
    splits = open_data(cfg.data, rt)
    train_ds, val_ds, _ = training_splits(splits, cfg.data.val_fraction, cfg.run.seed)
    task = Task.from_metadata(splits["train"].metadata)
    torch.manual_seed(cfg.run.seed)  # identical initial weights in every group
    model = build_model(cfg.model.name, cfg.model.args, task.model_kwargs)
    fragments = make_fragments(model, opts.fragments)
    o = cfg.optim
    inner = torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    outer = [
        torch.optim.SGD(
            f.parameters(),
            lr=opts.outer_lr,
            momentum=opts.outer_momentum,
            nesterov=opts.nesterov,
        )
        for _, f in fragments
    ]
    s = cfg.schedule
    schedule = LambdaLR(
        inner,
        copy.copy(
            Multiplier(
                s.name,
                cfg.train.steps,
                warmup_steps=s.warmup_steps,
                anneal_start=s.anneal_start,
                min_lr_ratio=s.min_lr_ratio,
            )
        ),
    )
    sampler = GlobalBatchSampler(
        num_samples=len(train_ds),
        global_batch_size=cfg.data.batch_size,
        rank=group.index,
        world_size=group.count,
        seed=cfg.run.seed if cfg.run.data_seed < 0 else cfg.run.data_seed,
        drop_last=cfg.data.drop_last,
        manifest_checksum=splits["train"].checksum,
    )
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    torch.manual_seed(cfg.run.seed + 1 + group.index)  # each group its own dropout stream
    with contextlib.ExitStack() as held:
        run = open_run_folder(cfg, opts, held) if main else RunFolder(Path(cfg.run.dir))
        manager = make_manager(group, opts, model, inner)
        held.callback(manager.shutdown, wait=False)
        if main:
            sizes = ", ".join(
                f"{n} {sum(p.numel() for p in f.parameters()):,}" for n, f in fragments
            )
            log.info("fragments (parameters): %s", sizes)
        clock = SyncClock()
        inner.register_step_post_hook(clock.start)  # runs before DiLoCo's hook ...
        diloco = DiLoCo(
            manager,
            [f for _, f in fragments],
            inner,
            outer,
            sync_every=opts.sync_every,
            fragment_sync_delay=opts.fragment_sync_delay,
        )
        with diloco:
            inner.register_step_post_hook(clock.stop)  # ... and this one after it
            loop = Loop(
                cfg, model, inner, schedule, sampler, task, rt, manager, clock, diloco, group.index
            )
            return loop.run(loader, train_ds, val_ds, splits, run, main)
    return None


@dataclass
class Loop:
    """The training loop of ``rangerdl.train.loop`` with DiLoCo attached to the optimizer."""

    cfg: Config
    model: nn.Module
    inner: torch.optim.Optimizer
    schedule: LambdaLR
    sampler: Any
    task: Task
    rt: Runtime
    manager: Any
    clock: SyncClock
    diloco: Any
    group_index: int

    def comm_stats(self) -> dict[str, float]:
        return {
            "comm/bytes": float(self.manager.counted_bytes),
            "comm/broadcast_bytes": 0.0,
            "comm/syncs": float(self.manager.current_step()),
            "comm/time_s": self.clock.time_s,
        }

    def digest(self) -> str:
        """SHA-256 of the global weights (the same in every replica group after a sync)."""
        h = hashlib.sha256()
        with global_weights(self.diloco):
            for p in self.model.parameters():
                h.update(p.detach().numpy().tobytes())
        return h.hexdigest()

    def evaluation(self, prefix: str, dataset: Any, max_batches: int) -> dict[str, float]:
        with global_weights(self.diloco):
            metrics = evaluate(
                self.model,
                dataset,
                self.task,
                self.rt,
                self.cfg.data.eval_batch_size,
                max_batches=max_batches,
            )
        return {f"{prefix}/{k}": v for k, v in metrics.items()}

    def run(
        self,
        loader: Any,
        train_ds: Any,
        val_ds: Any,
        splits: dict[str, Any],
        run: RunFolder,
        main: bool,
    ) -> dict[str, Any] | None:
        cfg, t = self.cfg, self.cfg.train
        metrics = MetricsLogger(
            run.path,
            enabled=main,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total_steps=t.steps,
            start_step=0,
            config=cfg.to_dict(),
        )
        step, train_time, window_t0, window_samples = 0, 0.0, time.perf_counter(), 0
        self.model.train()
        for batch in loader:
            if step >= t.steps:
                break
            t0 = time.perf_counter()
            loss = self.task.loss(self.model(batch["x"]), batch["y"], batch.get("mask"))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {step + 1}")
            loss.backward()
            if t.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.inner.step()  # DiLoCo's hook syncs here every sync_every / fragments steps
            self.schedule.step()
            self.inner.zero_grad(set_to_none=True)
            self.sampler.advance(1)
            step += 1
            train_time += time.perf_counter() - t0
            window_samples += cfg.data.batch_size
            if step % t.log_every == 0 or step == t.steps:
                now = time.perf_counter()
                speed = window_samples / max(now - window_t0, 1e-9)
                values = {"train/loss": loss.item(), "optim/lr": self.inner.param_groups[0]["lr"]}
                values |= {"perf/samples_per_s": speed, "time/train_s": train_time}
                metrics.log(step, values | self.comm_stats())
                metrics.progress(step, values["train/loss"], speed)
                window_t0, window_samples = now, 0
            if main and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                metrics.log(step, self.evaluation("val", val_ds, t.eval_batches))
        if step < t.steps:
            raise ValueError(f"the training data ran out at step {step} of {t.steps}")
        print(json.dumps({"replica_group": self.group_index, "weights_sha256": self.digest()}))
        if not main:
            return None
        n = t.final_eval_batches
        last_val = self.evaluation("val", val_ds, n) if val_ds is not splits.get("test") else {}
        test = self.evaluation("test", splits["test"], n) if "test" in splits else {}
        metrics.log(step, last_val | test | {"time/train_s": train_time})
        summary = {
            "run_dir": str(run),
            "step": step,
            "train_time_s": train_time,
            "samples_per_s": step * cfg.data.batch_size / max(train_time, 1e-9),
            "world_size": self.manager.num_participants(),
            "model/params": sum(p.numel() for p in self.model.parameters()),
            **last_val,
            **test,
            **self.comm_stats(),
        }
        atomic_write_text(run.summary, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        metrics.close(summary)
        return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
        logging.getLogger(name).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        epilog="--diloco.KEY=VALUE keys: "
        + ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(DilocoOptions)),
    )
    parser.add_argument("config", nargs="?", type=Path, help="TOML config, as rangerdl train's")
    args, extra = parser.parse_known_args(argv)
    try:
        mine, rest = split_arguments(extra)
        opts = parse_diloco(mine)
        cfg = load_config(args.config, rest)
        group = ReplicaGroup.from_env()
        check_config(cfg, opts, group.count)
        summary = train(cfg, opts, group)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        keys = ("step", "train_time_s", "val/loss", "test/loss", "comm/bytes", "comm/syncs")
        print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
