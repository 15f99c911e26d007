"""`TaskGradients`: the one immutable result every engine returns.

An engine's result holds what a step needs from the per-task gradients: the task Jacobian on the
shared tensors (per-tensor *rows*, or one ``(K, P)`` matrix), or only its Gramian (the
memory-light engine never holds the Jacobian), and the gradients of the other parameters summed
over tasks. Results are never modified: the distributed average of the rows gives a new result
(`TaskGradients.with_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance._linalg import add_gramian_, combine, flatten, gramian, unflatten

__all__ = ["FLAT_MIN_TENSORS", "TaskGradients", "from_per_task", "from_rows", "stack_rows"]

#: From this many shared tensors on, `from_rows` copies per-tensor rows into one ``(K, P)``
#: matrix: the copy costs less than one Python-level product per tensor in `gramian` and
#: `combine` (SegNet's 104 tensors: 0.7 vs 1.3 ms at K = 2; an MLP's 6: a loss at every K).
FLAT_MIN_TENSORS = 16


class TaskGradients:
    """The task Jacobian (or its Gramian) on the shared tensors and the summed gradient of the
    other parameters. Immutable.

    The Jacobian is held either as per-tensor `rows` or as one ``(K, P)`` matrix (`flat`)
    whose rows are task gradients flattened in the order of the shared tensors: `gramian` and
    `combine` then cost one product each instead of one per tensor, and per-tensor ``rows``
    (views of it) are built only when read. A result of the memory-light engine holds the
    Gramian alone (`has_jacobian` is false).

    Attributes:
        rows: one tensor of shape ``(K, *shape)`` per shared tensor (parameter or feature); row
            ``i`` is task ``i``'s gradient (zeros where the task does not reach the tensor), or
            ``None`` when no task reaches it.
        others: one tensor per other (task-specific) parameter: the sum over tasks of their
            unweighted gradients, or ``None`` when no task reaches the parameter.
        reached: for each shared tensor, whether some task reaches it.
        task_reached: for each task, whether its loss reached at least one shared tensor. The
            batched strategy cannot tell from autograd which rows are structural zeros: there
            it is computed on first access, a task counting as reached where one of its rows is
            non-zero (one pass over the rows, skipped when nobody reads it).
        flat: the ``(K, P)`` matrix, or ``None``.
    """

    __slots__ = ("_gramian", "_like", "_reached", "_rows", "_task_reached", "flat", "others")

    flat: Tensor | None
    others: list[Tensor | None]
    _rows: list[Tensor | None] | None
    _like: list[Tensor | None] | None
    _task_reached: list[bool] | None
    _gramian: Tensor | None
    _reached: list[bool] | None

    def __init__(
        self,
        rows: list[Tensor | None] | None,
        others: Sequence[Tensor | None],
        task_reached: list[bool] | None = None,
        *,
        flat: Tensor | None = None,
        like: list[Tensor | None] | None = None,
        gramian: Tensor | None = None,
        reached: list[bool] | None = None,
    ) -> None:
        if rows is None and (flat is None or like is None) and gramian is None:
            raise ValueError("TaskGradients needs rows, flat with like, or a gramian")
        if gramian is not None and rows is None and flat is None and reached is None:
            raise ValueError("a TaskGradients without the Jacobian needs reached=")
        init = object.__setattr__
        init(self, "_rows", rows)
        init(self, "others", list(others))
        init(self, "_task_reached", task_reached)
        init(self, "flat", flat)
        # with flat: per shared tensor, a tensor of its shape (where some task reaches it)
        init(self, "_like", like)
        init(self, "_gramian", gramian)
        init(self, "_reached", reached)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"TaskGradients is immutable (cannot set {name!r}); build a new one, e.g. with "
            "with_rows()"
        )

    @property
    def has_jacobian(self) -> bool:
        """Whether the rows themselves are held (false for the memory-light engine)."""
        return self._rows is not None or self.flat is not None

    @property
    def rows(self) -> list[Tensor | None]:
        if self._rows is None:
            if self.flat is None or self._like is None:
                raise ValueError(
                    "this result holds the Gramian only (memory-light engine), not the rows"
                )
            k = self.flat.shape[0]
            rows: list[Tensor | None] = []
            offset = 0
            for t in self._like:
                if t is None:
                    rows.append(None)
                    continue
                n = t.numel()
                rows.append(self.flat[:, offset : offset + n].view(k, *t.shape))
                offset += n
            object.__setattr__(self, "_rows", rows)  # a cache: the values do not change
            return rows
        return self._rows

    @property
    def reached(self) -> list[bool]:
        """For each shared tensor, whether some task reaches it (without building ``rows``)."""
        if self._reached is not None:
            return list(self._reached)
        present = self._rows if self._rows is not None else self._like
        assert present is not None
        return [t is not None for t in present]

    @property
    def task_reached(self) -> list[bool]:
        if self._task_reached is None:
            object.__setattr__(self, "_task_reached", _nonzero_tasks(self.rows))  # a cache
        assert self._task_reached is not None
        return self._task_reached

    def with_rows(self, rows: list[Tensor | None]) -> TaskGradients:
        """A result with these rows (e.g. averaged over ranks) and the same other gradients.

        Examples:
            >>> import torch
            >>> tg = TaskGradients([torch.ones(2, 3)], [])
            >>> tg.with_rows([2 * r for r in tg.rows]).gramian(2)
            tensor([[12., 12.],
                    [12., 12.]], dtype=torch.float64)
        """
        return TaskGradients(rows, self.others, self._task_reached)

    def gramian(self, num_tasks: int) -> Tensor:
        """``G = J Jᵀ`` (float64): see `gradbalance._linalg.gramian`. A fresh tensor."""
        if self._gramian is not None:
            return self._gramian.clone()
        if self.flat is not None:
            g = torch.zeros((num_tasks, num_tasks), dtype=torch.float64, device=self.flat.device)
            add_gramian_(g, self.flat)
            return g
        return gramian(self.rows, num_tasks)

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``Jᵀw`` per shared tensor: see `gradbalance._linalg.combine`."""
        if self.flat is None:
            return combine(self.rows, weights)
        assert self._like is not None
        joined = weights.to(device=self.flat.device, dtype=self.flat.dtype) @ self.flat
        present = [t for t in self._like if t is not None]
        parts = iter(unflatten(joined, present))
        return [None if t is None else next(parts) for t in self._like]

    def __repr__(self) -> str:
        if not self.has_jacobian:
            return f"TaskGradients(gramian={self._gramian!r}, others={self.others!r})"
        return (
            f"TaskGradients(rows={self.rows!r}, others={self.others!r}, "
            f"task_reached={self.task_reached!r})"
        )


def _nonzero_tasks(rows: Sequence[Tensor | None]) -> list[bool]:
    """For each task, whether one of its rows holds a non-zero (or NaN) entry."""
    present = [r for r in rows if r is not None]
    if not present:
        return []
    k = present[0].shape[0]
    reached = torch.zeros(k, dtype=torch.bool, device=present[0].device)
    for row in present:
        # the largest magnitude per row: one reduction pass, no K x P temporary
        peak = torch.linalg.vector_norm(row.reshape(k, -1), ord=float("inf"), dim=1)
        reached |= peak.ne(0)
    out = [bool(v) for v in reached.tolist()]
    if not any(out):
        out = [True] * k
    return out


def stack_rows(per_tensor: list[list[Tensor | None]]) -> list[Tensor | None]:
    """One ``(K, *shape)`` tensor per shared tensor from per-task gradients (zeros where a task
    does not reach it), or ``None`` where no task does."""
    rows: list[Tensor | None] = []
    for grads in per_tensor:
        first = next((g for g in grads if g is not None), None)
        if first is None:
            rows.append(None)
            continue
        dtype = first.dtype
        zero = None
        parts = []
        for g in grads:
            if g is None:
                if zero is None:
                    zero = torch.zeros(first.shape, dtype=dtype, device=first.device)
                g = zero
            parts.append(g if g.dtype == dtype else g.to(dtype))
        rows.append(torch.stack(parts))
    return rows


def from_per_task(
    by_task: list[tuple[Tensor | None, ...]],
    shared: Sequence[Tensor],
    summed: list[Tensor | None],
    task_reached: list[bool] | None = None,
) -> TaskGradients:
    """The Jacobian from per-task gradient tuples, as one ``(K, P)`` matrix: one flatten of all
    the task gradients, task after task (zeros where a task misses a tensor another task
    reaches); per-tensor stacks when the shared tensors differ in dtype or device.
    ``task_reached`` defaults to whether each task reaches some shared tensor."""
    k = len(by_task)
    complete = [all(g is not None for g in grads) for grads in by_task]
    if task_reached is None:
        task_reached = [
            c or any(g is not None for g in grads) for c, grads in zip(complete, by_task)
        ]
    if all(complete):  # the common case: every task reaches every shared tensor
        firsts: list[Tensor | None] = list(by_task[0]) if by_task else []
    else:
        firsts = [next((g for g in col if g is not None), None) for col in zip(*by_task)]
    present = [f for f in firsts if f is not None]
    if not present:
        return TaskGradients(rows=[None] * len(shared), others=summed, task_reached=task_reached)
    dtype, device = present[0].dtype, present[0].device
    if any(f.dtype != dtype or f.device != device for f in present):
        per_tensor = [list(col) for col in zip(*by_task)]
        return TaskGradients(rows=stack_rows(per_tensor), others=summed, task_reached=task_reached)
    if all(complete):
        pieces = [g for grads in by_task for g in grads]
    else:
        # autograd returns each gradient in its input's dtype and device
        pieces = [
            g if g is not None else torch.zeros_like(f)
            for grads in by_task
            for g, f in zip(grads, firsts)
            if f is not None
        ]
    flat = flatten(pieces).view(k, -1)  # type: ignore[arg-type]
    like: list[Tensor | None] = [s if f is not None else None for s, f in zip(shared, firsts)]
    return TaskGradients(None, summed, task_reached, flat=flat, like=like)


def from_rows(
    rows: list[Tensor | None],
    shared: Sequence[Tensor],
    summed: list[Tensor | None],
    task_reached: list[bool] | None,
) -> TaskGradients:
    """Per-tensor rows as `TaskGradients`, copied into one ``(K, P)`` matrix when there are
    many tensors of one dtype and device."""
    present = [r for r in rows if r is not None]
    if len(present) < FLAT_MIN_TENSORS or any(
        r.dtype != present[0].dtype or r.device != present[0].device for r in present
    ):
        return TaskGradients(rows=rows, others=summed, task_reached=task_reached)
    k = present[0].shape[0]
    flat = torch.cat([r.reshape(k, -1) for r in present], dim=1)
    like: list[Tensor | None] = [s if r is not None else None for s, r in zip(shared, rows)]
    return TaskGradients(None, summed, task_reached, flat=flat, like=like)
