"""The collectives `GradBalancer` runs when training is distributed (DDP).

`torch.nn.parallel.DistributedDataParallel` averages gradients with hooks that fire when
autograd *accumulates* into ``.grad``. The balancer computes every gradient with
`torch.autograd.grad` (so that nothing is written before every check has passed), which does not
accumulate and so bypasses DDP's reducer: left alone, per-task gradients, the weights and the
update would all stay rank-local. The balancer therefore reduces, itself, exactly what the
method needs, through a `Synchronizer`:

``"global"`` (what ``distributed="auto"`` picks when a process group with more than one rank is
initialised)
    every rank computes the weights that one process would compute on the global batch (the
    concatenation of the ranks' batches, with the usual mean-reduced losses and equal batches
    per rank): the losses and KPIs are averaged over ranks; gradient methods average the
    Jacobian rows ``J = mean_r J_r`` (on the memory-light path group by group) or, on the
    representation engine, sum the feature Gramians (``G = Σ_r G_r / R²``: feature
    gradients of different ranks belong to different samples); every gradient written to
    ``.grad`` is the mean over ranks, as DDP's.
``"local"``
    the cheap mode for gradient methods: each rank builds the Gramian of its own task gradients
    and the method reads the mean ``Ḡ = mean_r J_r J_rᵀ``, so only ``K × K`` numbers travel
    for the weights; the update ``J̄ᵀw`` is the mean of the ranks' ``J_rᵀw``, which costs what
    DDP costs. ``Ḡ = J̄J̄ᵀ + mean_r (J_r − J̄)(J_r − J̄)ᵀ``: the exact Gramian plus the spread
    of the ranks' gradients (for MGDA, the weights of a smaller batch). Losses and KPIs are
    still averaged, so loss weightings behave exactly as in ``"global"``.
``"off"``
    no collective at all (each rank balances alone; the replicas drift apart under DDP).

Every rank gets bit-identical inputs for the method, so a deterministic method returns the same
weights everywhere; a method that draws random numbers must seed its own generator identically
on every rank.

Examples:
    >>> from gradbalance.distributed import resolve
    >>> resolve("auto") is None  # no process group: nothing to synchronise
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["MODES", "Synchronizer", "resolve"]

#: The values of ``GradBalancer(distributed=...)``.
MODES = ("auto", "global", "local", "off")

#: Bucket size of the coalesced all-reduces (DDP's default).
_BUCKET_BYTES = 25 * 2**20


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve(mode: str, group: Any = None) -> Synchronizer | None:
    """The `Synchronizer` for ``mode``, or ``None`` when there is nothing to synchronise.

    ``"auto"`` is ``"global"`` when `torch.distributed` is initialised with more than one rank
    in ``group`` and ``"off"`` otherwise.

    Raises:
        ValueError: for an unknown mode.
        RuntimeError: for ``"global"``/``"local"`` without an initialised process group.
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    if not _initialised():
        if mode == "auto":
            return None
        raise RuntimeError(
            f"distributed={mode!r} needs an initialised process group: call "
            "torch.distributed.init_process_group(...) before the first backward(), or use "
            "distributed='auto'"
        )
    if mode == "auto":
        if dist.get_world_size(group) == 1:
            return None
        mode = "global"
    return Synchronizer(mode, group)


class Synchronizer:
    """Averages tensors over the ranks of a process group, in buckets, and counts the traffic.

    Args:
        mode: ``"global"`` (exact weights for the global batch) or ``"local"`` (weights from
            the mean of the rank-local Gramians); see the module docstring.
        group: the process group (default: the default group).
        bucket_bytes: tensors are flattened into buckets of at most this many bytes, one
            all-reduce each (a larger tensor is reduced alone, in place).

    Attributes:
        mode: the mode.
        world_size: the number of ranks ``R`` in ``group``.
        elements: how many tensor elements this rank has all-reduced so far.
        calls: how many all-reduce calls this rank has made so far.
    """

    def __init__(self, mode: str, group: Any = None, bucket_bytes: int = _BUCKET_BYTES) -> None:
        if mode not in ("global", "local"):
            raise ValueError(f"mode must be 'global' or 'local', got {mode!r}")
        if not _initialised():
            raise RuntimeError("torch.distributed is not initialised")
        self.mode = mode
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bucket_bytes = int(bucket_bytes)
        self.elements = 0
        self.calls = 0

    def __repr__(self) -> str:
        return f"Synchronizer(mode={self.mode!r}, world_size={self.world_size})"

    @property
    def exact(self) -> bool:
        """Whether the weights are those of the global batch (``mode == "global"``)."""
        return self.mode == "global"

    # ------------------------------------------------------------------ primitives
    def _all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` over ranks in place, bucketed by dtype and device."""
        bucket: list[Tensor] = []
        size = 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if bucket and (
                t.dtype != bucket[0].dtype
                or t.device != bucket[0].device
                or size + nbytes > self.bucket_bytes
            ):
                self._flush(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            self._flush(bucket)

    def _flush(self, bucket: list[Tensor]) -> None:
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat = bucket[0]
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.elements += flat.numel()
        self.calls += 1
        if flat is bucket[0]:
            return
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    # ------------------------------------------------------------------ what the balancer uses
    def mean_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its mean over ranks, in place.

        Every rank must pass tensors of the same shapes, dtypes and order.
        """
        self._all_reduce_sum_(tensors)
        for t in tensors:
            t.div_(self.world_size)

    def mean(
        self,
        tensors: Sequence[Tensor | None],
        params: Sequence[Tensor],
        leading: tuple[int, ...] = (),
    ) -> list[Tensor | None]:
        """The mean over ranks of per-parameter tensors that may be missing on some ranks.

        Entry ``i`` has shape ``(*leading, *params[i].shape)``; a ``None`` entry counts as
        zeros (a rank where no loss reaches the parameter) and the result is ``None`` only
        where every rank passed ``None``. The given tensors are reduced in place.
        """
        if len(tensors) != len(params):
            raise ValueError(f"got {len(tensors)} tensors for {len(params)} parameters")
        if not params:
            return []
        filled = [
            t
            if t is not None
            else torch.zeros((*leading, *p.shape), dtype=p.dtype, device=p.device)
            for t, p in zip(tensors, params)
        ]
        present = torch.tensor(
            [float(t is not None) for t in tensors], dtype=torch.float64, device=params[0].device
        )
        self._all_reduce_sum_([*filled, present])
        out: list[Tensor | None] = []
        for t, n in zip(filled, present.tolist()):
            out.append(t.div_(self.world_size) if n > 0 else None)
        return out

    def agree_(self, failed: bool, tensors: Sequence[Tensor], device: torch.device) -> list[int]:
        """Average ``tensors`` over ranks in place (as `mean_`) and tell which ranks failed.

        ``failed`` travels as one float64 flag per rank in the same all-reduce as ``tensors``
        (one call when they are float64 on ``device``). Every rank must pass tensors of the
        same total size; a rank that failed passes zeros. Returns the ranks (in the group)
        whose ``failed`` was true, in increasing order.
        """
        flags = torch.zeros(self.world_size, dtype=torch.float64, device=device)
        if failed:
            flags[self.rank] = 1.0
        self._all_reduce_sum_([*tensors, flags])
        for t in tensors:
            t.div_(self.world_size)
        return [r for r, f in enumerate(flags.tolist()) if f > 0]

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on some rank (one all-reduce of one number)."""
        t = torch.tensor([float(flag)], dtype=torch.float32, device=device)
        self._all_reduce_sum_([t])
        return bool(t.item() > 0)
