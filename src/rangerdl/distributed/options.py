"""The options of the outer sync, in one dataclass used by ``OuterSync``, the trainer's
``[distributed]`` table and ``distributed_ranger`` (no torch import: the config reads it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["BUFFER_POLICIES", "COMM_DTYPES", "COMPRESSIONS", "MAX_BLOCK_SIZE", "SyncOptions"]

BUFFER_POLICIES = ("average", "local", "broadcast")
"""What happens to module buffers (BatchNorm statistics) at each sync."""
COMM_DTYPES = ("fp32", "bf16")
"""The dtype of what travels at a sync (``comm_dtype``, an alias of ``compression``)."""
COMPRESSIONS = ("none", "bf16", "int8", "int4", "int2", "topk")
"""What travels at a sync: the weights in fp32 (``none``), or the pseudo-gradient encoded
(:mod:`rangerdl.distributed.compression`; bytes in :func:`rangerdl.distributed.cost.payload_bytes`)."""
MAX_BLOCK_SIZE = 1 << 20
"""The largest ``block_size``."""


@dataclass
class SyncOptions:
    """How the slow weights (the shared global model) are synchronised across workers.

    Every ``sync_every`` optimizer steps, with W workers holding fast weights theta_i and all
    holding the same slow weights phi, the averaged pseudo-gradient d = mean_i(theta_i) - phi moves
    the slow weights (Lookahead, Zhang et al. 2019; SlowMo, Wang et al. 2020; DiLoCo, Douillard
    et al. 2023):

        outer_momentum = 0:  phi <- phi + outer_lr * d          (outer_lr = 1: local SGD)
        outer_momentum = mu: m <- mu m + d;  phi <- phi + outer_lr * (d + mu m if nesterov else m)

    then every theta_i <- phi. With ``sync_every_warmup_steps = N``, the first N steps each end
    with a sync that sets phi <- mean_i(theta_i) (plain averaging, outer momentum untouched), as
    in post-local SGD (Lin et al. 2020); the outer step above applies from then on.
    """

    sync_every: int = 0
    """Optimizer steps between syncs (0: the optimizer's Lookahead ``k``)."""
    outer_lr: float = 0.0
    """Outer step size on the averaged pseudo-gradient, in (0, 2] (0: the Lookahead ``alpha``)."""
    outer_momentum: float = 0.0
    """Outer momentum in [0, 1) (0: plain Lookahead; > 0: SlowMo; with ``nesterov``: DiLoCo)."""
    nesterov: bool = False
    """Nesterov outer momentum (needs ``outer_momentum > 0``)."""
    sync_every_warmup_steps: int = 0
    """Sync after each of the first N optimizer steps with plain averaging (outer lr 1, no
    momentum: the workers stay together, like data parallel, while the loss falls fastest), then
    every ``sync_every`` steps with the outer step (0: off). Costs one all-reduce per warm-up
    step."""
    overlap: bool = False
    """Sync asynchronously while workers take their next local steps (the fp32 all-reduce, or the
    compressed exchange on a worker thread); merge ``overlap_steps`` steps late, keeping the local
    progress made meanwhile."""
    overlap_steps: int = 1
    """With ``overlap``: optimizer steps the all-reduce may take before its result is merged
    (Streaming DiLoCo's tau, Douillard et al. 2025; torchft's ``fragment_sync_delay``), in
    [1, sync_every]. Set it so that that many steps of compute cover the all-reduce's wire time
    (``rangerdl plan`` prints both); a sync that falls due first merges at once."""
    eager: bool = True
    """With ``overlap`` (ignored without): at launch each worker applies the outer step with its
    own pseudo-gradient in place of the mean (single-process Lookahead's step) and trains on from
    there; when the mean arrives its weights move by the difference between the true and the
    estimated slow weights, so one worker is single-process Lookahead exactly. ``False``: a
    worker trains on from its unsynchronised weights until the merge, which ended 4-13% higher at
    equal steps on the GPT benchmark (README, time-to-quality ablation). After Kale et al. 2025,
    "Eager updates for overlapped communication and computation in DiLoCo" (there the others'
    share comes from the previous round; here a worker's own fresh pseudo-gradient stands in for
    the whole mean)."""
    shard_slow: bool = False
    """Reduce-scatter + all-gather: each rank keeps 1/W of the slow weights and outer momentum."""
    comm_dtype: str = "fp32"
    """``fp32`` or ``bf16``: an alias kept for older configs. ``bf16`` (with ``compression =
    "none"``) is ``compression = "bf16"`` with ``error_feedback = false``, the payload it named
    before ``compression`` existed; ``bf16`` with another compression is an error."""
    compression: str = "none"
    """What travels at a sync. ``none``: the weights, all-reduced in fp32. Otherwise the
    pseudo-gradient theta - phi, encoded: ``bf16`` (16 bits per value), ``int8``/``int4``/``int2``
    (blockwise absmax: per block of ``block_size`` values one fp32 scale and a signed integer per
    value), ``topk`` (per chunk of ``block_size`` values the ``topk_density`` share of largest
    magnitude, as bf16 values and bit-packed positions). Never summed in its own dtype: each
    rank decodes what it receives and sums in fp32, and the mean is encoded again for the
    all-gather (:mod:`rangerdl.distributed.compression`). Cannot combine with ``shard_slow``."""
    block_size: int = 256
    """Values per block (``int8``/``int4``/``int2``: one scale each) or per chunk (``topk``: the
    top-k is taken within each), in [1, 2^20]. Ignored by ``none`` and ``bf16``."""
    topk_density: float = 0.03
    """``topk``: the share of each chunk sent, in (0, 1]; ``ceil(density * block_size)`` values
    per chunk (at least one). Ignored by the other payloads."""
    error_feedback: bool = True
    """Each rank adds what its last payload lost (input - decoded payload, kept in fp32) to its
    next pseudo-gradient, and the rank that re-encodes a chunk of the mean for the all-gather keeps
    that loss likewise (Seide et al. 2014; Karimireddy et al. 2019; DoubleSqueeze, Tang et al.
    2019). Saved in the outer state. Nothing to keep with ``none``."""
    buffer_policy: str = "average"
    """Module buffers at each sync: ``average`` floating buffers (integer ones such as
    ``num_batches_tracked`` from rank 0), ``broadcast`` all from rank 0, or ``local``."""

    def resolved(self, k: int, alpha: float) -> SyncOptions:
        """A copy with ``sync_every = 0`` replaced by ``k`` and ``outer_lr = 0`` by ``alpha``
        (the inner optimizer's Lookahead settings), validated; the alias ``comm_dtype = "bf16"``
        becomes ``compression = "bf16"``, ``error_feedback = False``."""
        out = dataclasses.replace(
            SyncOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SyncOptions)}),
            sync_every=self.sync_every or k,
            outer_lr=self.outer_lr or alpha,
        )
        out.validate()
        if out.comm_dtype == "bf16" and out.compression == "none":
            # the alias keeps its meaning from before compression existed: bf16 without error
            # feedback (a run saved with it resumes bit for bit)
            out.compression, out.error_feedback = "bf16", False
        out.comm_dtype = "bf16" if out.compression == "bf16" else "fp32"
        if out.overlap_steps > out.sync_every:
            raise ValueError(
                f"overlap_steps ({out.overlap_steps}) must be <= sync_every ({out.sync_every}): "
                "a sync's result is merged before the next sync is launched"
            )
        return out

    def validate(self, where: str = "") -> None:
        """Raise ``ValueError`` (prefixed with ``where``, e.g. ``"[distributed] "``) for a value out
        of range or options that cannot combine. ``0`` for ``sync_every``/``outer_lr`` is valid
        (it means "the optimizer's own")."""
        s = self.sync_every
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{where}sync_every must be an int >= 1 (or 0: k), got {s!r}")
        w = self.sync_every_warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"{where}sync_every_warmup_steps must be an int >= 0, got {w!r}")
        d = self.overlap_steps
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{where}overlap_steps must be an int >= 1, got {d!r}")
        if d > 1 and not self.overlap:
            raise ValueError(f"{where}overlap_steps = {d} needs overlap = true")
        if not 0.0 <= self.outer_lr <= 2.0:
            raise ValueError(
                f"{where}outer_lr must be in (0, 2] (or 0: alpha), got {self.outer_lr}"
            )
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"{where}outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.nesterov and self.outer_momentum == 0.0:
            raise ValueError(f"{where}nesterov = true needs outer_momentum > 0")
        if self.comm_dtype not in COMM_DTYPES:
            raise ValueError(
                f"{where}comm_dtype must be one of {', '.join(COMM_DTYPES)}, got {self.comm_dtype!r}"
            )
        self._validate_compression(where)
        if self.buffer_policy not in BUFFER_POLICIES:
            raise ValueError(
                f"{where}buffer_policy must be one of {', '.join(BUFFER_POLICIES)}, "
                f"got {self.buffer_policy!r}"
            )
        if self.shard_slow and self.payload != "none":
            name = "comm_dtype" if self.compression == "none" else "compression"
            raise ValueError(
                f"{where}shard_slow and {name} = {getattr(self, name)!r} cannot combine: a rank that "
                "keeps 1/W of the slow weights cannot form the pseudo-gradient (theta - phi) of the "
                "rest, so the weights themselves would travel compressed; use one or the other"
            )
        if self.overlap and self.shard_slow:
            raise ValueError(
                f"{where}overlap and shard_slow cannot combine: the sharded sync's all-gather of "
                "the slow weights would have to wait for the reduce-scatter and the outer step"
            )

    @property
    def payload(self) -> str:
        """The compression in effect: ``compression``, or ``bf16`` when only the alias
        ``comm_dtype = "bf16"`` asks for it."""
        if self.compression == "none" and self.comm_dtype == "bf16":
            return "bf16"
        return self.compression

    def _validate_compression(self, where: str) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"{where}compression must be one of {', '.join(COMPRESSIONS)}, "
                f"got {self.compression!r}"
            )
        if self.comm_dtype == "bf16" and self.compression not in ("none", "bf16"):
            raise ValueError(
                f"{where}comm_dtype = 'bf16' and compression = {self.compression!r} ask for two "
                "payloads; comm_dtype is an alias of compression: give only compression"
            )
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BLOCK_SIZE:
            raise ValueError(
                f"{where}block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {b!r}"
            )
        d = self.topk_density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"{where}topk_density must be in (0, 1], got {d!r}")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(
                f"{where}error_feedback must be true or false, got {self.error_feedback!r}"
            )
