"""The memory-light engine: the Gramian of the task gradients without ever holding the whole
Jacobian.

The shared tensors are split into groups whose rows ``(K, *p.shape)`` fit in a budget of
Jacobian entries; each group's rows are computed (one batched backward per group, on the
retained graph), added into ``G`` and freed, so the ``K × P`` Jacobian never exists at once.
The update ``Jᵀw`` then comes from one ordinary backward of ``Σ_i w_i L_i``
(`weighted_gradients`). Not for methods that read the Jacobian itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradbalance._linalg import add_gramian_
from gradbalance.engine.base import (
    DEFAULT_MEMORY_THRESHOLD,
    Request,
    RowsHook,
    as_scalar_stack,
    objective_gradients,
)
from gradbalance.engine.batched import batched_gradients, probe_batched
from gradbalance.engine.loop import loop_gradients
from gradbalance.engine.result import TaskGradients

__all__ = [
    "MemoryEngine",
    "MemoryGramian",
    "jacobian_numel",
    "memory_gramian",
    "plan_groups",
    "weighted_gradients",
]


@dataclass(frozen=True)
class MemoryGramian:
    """What the memory-light path returns: the Gramian without the Jacobian.

    Attributes:
        gramian: ``G = J Jᵀ`` (``(K, K)``, float64).
        reached: for each shared tensor, whether some task reaches it.
        others: as `TaskGradients.others`: one summed gradient per other parameter, or
            ``None``.
        task_reached: for each task, whether its loss reached at least one shared tensor.
        strategy: how the rows of each group were computed: ``"batched"`` or ``"loop"``.
        peak_rows_numel: the most Jacobian entries (rows of shared and other tensors) that
            were alive at once.
    """

    gramian: Tensor
    reached: list[bool]
    others: list[Tensor | None]
    task_reached: list[bool]
    strategy: str
    peak_rows_numel: int


def jacobian_numel(shared: Sequence[Tensor], num_tasks: int) -> int:
    """The number of entries ``K × P`` of the Jacobian on ``shared``.

    Examples:
        >>> import torch
        >>> jacobian_numel([torch.zeros(3, 4), torch.zeros(4)], 5)
        80
    """
    return num_tasks * sum(t.numel() for t in shared)


def plan_groups(numels: Sequence[int], num_tasks: int, budget: int) -> list[range]:
    """Split consecutive tensors into groups of at most ``budget`` Jacobian entries.

    A group holds tensors ``i`` with ``K × Σ numel_i ≤ budget``; a tensor larger than the
    budget on its own forms a group alone.

    Examples:
        >>> plan_groups([10, 10, 30, 5], num_tasks=2, budget=40)
        [range(0, 2), range(2, 3), range(3, 4)]
    """
    if budget < 1:
        raise ValueError(f"budget must be a positive number of Jacobian entries, got {budget}")
    groups: list[range] = []
    start, size = 0, 0
    for i, n in enumerate(numels):
        if i > start and (size + n) * num_tasks > budget:
            groups.append(range(start, i))
            start, size = i, 0
        size += n
    if len(numels) > start:
        groups.append(range(start, len(numels)))
    return groups


def memory_gramian(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor] = (),
    *,
    budget: int = DEFAULT_MEMORY_THRESHOLD,
    strategy: str = "auto",
    rows_hook: RowsHook | None = None,
) -> MemoryGramian:
    """The Gramian of the task gradients on ``shared`` without ever holding the whole Jacobian.

    The tensors ``[*shared, *others]`` are split into consecutive groups of at most ``budget``
    Jacobian entries (`plan_groups`). For each group, the rows ``(K, *p.shape)`` of its
    tensors are computed on the retained graph (one backward with ``is_grads_batched=True``,
    or ``K`` backwards for ``strategy="loop"``), ``J_p J_pᵀ`` is added to ``G`` in float64
    (in column chunks), the rows of ``others`` are summed over tasks, and the rows are freed
    before the next group. The graph is always kept: apply the update with
    `weighted_gradients` afterwards.

    Cost: one (batched) backward per group, each from the losses down to that group's
    tensors: between one and ``#groups`` full batched backwards.

    Args:
        losses: ``K`` scalar losses.
        shared: the tensors whose Gramian is needed.
        others: tensors whose gradient is only needed summed over tasks.
        budget: the most Jacobian entries a group may hold.
        strategy: ``"batched"``, ``"loop"``, or ``"auto"`` (batched, falling back to the
            loop as `probe_batched` does).
        rows_hook: optional; called with each group's shared rows (``None`` where no task
            reaches a tensor) and the group's shared tensors, returns the rows to use (the
            distributed code all-reduces them here). It may modify the rows in place.

    Returns:
        A `MemoryGramian`.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> b = torch.tensor([3.0], requires_grad=True)
        >>> losses = [w.sum() + b.sum(), (w ** 2).sum() + 2 * b.sum()]
        >>> mg = memory_gramian(losses, [w, b], budget=4)
        >>> mg.gramian
        tensor([[ 3.,  8.],
                [ 8., 24.]], dtype=torch.float64)
        >>> mg.peak_rows_numel  # two groups: w's rows (2 × 2), then b's (2 × 1)
        4
        >>> weighted_gradients(losses, torch.tensor([1.0, 1.0]), [w, b])
        [tensor([3., 5.]), tensor([3.])]
    """
    if strategy not in ("auto", "batched", "loop"):
        raise ValueError(f"strategy must be 'auto', 'batched' or 'loop', got {strategy!r}")
    k = len(losses)
    tensors = [*shared, *others]
    n_shared = len(shared)
    batched_groups = False
    device = next((loss.device for loss in losses), torch.device("cpu"))
    g = torch.zeros((k, k), dtype=torch.float64, device=device)
    reached = [False] * n_shared
    summed: list[Tensor | None] = [None] * len(others)
    task_reached = [False] * k
    peak = 0
    for group in plan_groups([t.numel() for t in tensors], k, budget):
        sh = [i for i in group if i < n_shared]
        ot = [i - n_shared for i in group if i >= n_shared]
        args = (losses, [shared[i] for i in sh], [others[j] for j in ot])
        if strategy == "auto":
            tg, strategy = probe_batched(*args, retain_graph=True)
        elif strategy == "loop":
            tg = loop_gradients(*args, retain_graph=True)
        else:
            tg = batched_gradients(*args, retain_graph=True)
        alive = sum(r.numel() for r in tg.rows if r is not None)
        alive += k * sum(others[j].numel() for j, s in zip(ot, tg.others) if s is not None)
        peak = max(peak, alive)
        rows = tg.rows
        if rows_hook is not None:
            rows = rows_hook(list(rows), [shared[i] for i in sh])
        for i, row in zip(sh, rows):
            if row is not None:
                reached[i] = True
                add_gramian_(g, row)
        summed_group = tg.others
        for j, s in zip(ot, summed_group):
            summed[j] = s
        if strategy == "loop":
            task_reached = [a or b for a, b in zip(task_reached, tg.task_reached)]
        else:
            batched_groups = True
        del tg, rows, summed_group
    if batched_groups:
        # a batched group's task reaches a shared tensor where its row is non-zero, i.e. where
        # it adds to G_ii = |J_i|^2 (float64 squares of float32 entries never underflow)
        diagonal = [not (v == 0.0) for v in g.diagonal().tolist()]
        if not any(diagonal) and any(reached):
            diagonal = [True] * k
        task_reached = [a or b for a, b in zip(task_reached, diagonal)]
    return MemoryGramian(
        gramian=g,
        reached=reached,
        others=summed,
        task_reached=task_reached,
        strategy="batched" if strategy == "auto" else strategy,
        peak_rows_numel=peak,
    )


def weighted_gradients(
    losses: Sequence[Tensor],
    weights: Tensor,
    params: Sequence[Tensor],
    *,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """``Jᵀw`` by one ordinary backward of ``Σ_i w_i L_i`` w.r.t. ``params``.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> weighted_gradients([w.sum(), (w ** 2).sum()], torch.tensor([0.5, 1.0]), [w])
        [tensor([2.5000, 4.5000])]
    """
    stacked = as_scalar_stack(losses)
    objective = (stacked * weights.to(device=stacked.device, dtype=stacked.dtype)).sum()
    return objective_gradients(objective, params, retain_graph=retain_graph)


class MemoryEngine:
    """The `gradbalance.engine.Engine` of ``engine="memory"``: its result holds the Gramian
    only; `update` is one backward of ``Σ_i w_i L_i``.

    Args:
        budget: the most Jacobian entries one group may hold.
        strategy: how each group's rows are computed: ``"auto"`` (batched, settling on the
            loop as `probe_batched` does, on the first group of the first step), ``"batched"``
            or ``"loop"``. After each `compute`, the strategy it settled on.

    Examples:
        >>> import torch
        >>> from gradbalance.engine import MemoryEngine, Request
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> request = Request([w.sum(), (w ** 2).sum()], [w])
        >>> engine = MemoryEngine(budget=4)
        >>> result = engine.compute(request)
        >>> result.has_jacobian, result.gramian(2)
        (False, tensor([[ 2.,  6.],
                [ 6., 20.]], dtype=torch.float64))
        >>> engine.update(request, result, torch.tensor([1.0, 1.0]))
        [tensor([3., 5.])]
    """

    name = "memory"

    def __init__(self, budget: int = DEFAULT_MEMORY_THRESHOLD, strategy: str = "auto") -> None:
        self.budget = budget
        self.strategy = strategy

    def compute(self, request: Request) -> TaskGradients:
        mg = memory_gramian(
            request.losses,
            request.shared,
            request.others,
            budget=self.budget,
            strategy=self.strategy,
            rows_hook=request.rows_hook,
        )
        self.strategy = mg.strategy
        return TaskGradients(
            None,
            mg.others,
            mg.task_reached,
            gramian=mg.gramian,
            reached=mg.reached,
        )

    def update(
        self,
        request: Request,
        result: TaskGradients,
        weights: Tensor,
        direction: list[Tensor | None] | None = None,
    ) -> list[Tensor | None]:
        if direction is not None:
            raise ValueError("the memory-light engine holds no Jacobian to combine directly")
        return weighted_gradients(
            request.losses, weights, request.shared, retain_graph=request.retain_graph
        )
