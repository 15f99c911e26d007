"""Per-task gradients on the shared parameters, their Gramian, and the combined update.

Three strategies compute the task Jacobian ``J`` (one row per task):

``"loop"``
    ``K`` calls of `torch.autograd.grad`, one per task loss, keeping the graph between
    them. Works for every model; peak memory is one backward's.
``"batched"``
    one call with ``is_grads_batched=True``: autograd runs the ``K`` backwards as one vmapped
    backward. Fastest when every operation of the model has a batching rule; needs ``K`` times
    the gradient memory of one backward.
``"representation"``
    gradients w.r.t. the shared *features* ``z`` instead of the shared parameters (MGDA-UB):
    ``K`` backwards through the task heads only, then one backward through the trunk with the
    combined feature gradient ``Σ_i w_i ∇_z L_i``.
``"memory"``
    the memory-light Gramian (`memory_gramian`): the shared tensors are split into groups whose
    rows ``(K, *p.shape)`` fit in a budget of Jacobian entries; each group's rows are computed
    (one batched backward per group, on the retained graph), added into ``G`` and freed, so
    the ``K × P`` Jacobian never exists at once. The update ``Jᵀw`` then comes from one
    ordinary backward of ``Σ_i w_i L_i`` (`weighted_gradients`).

The Gramian ``G = J Jᵀ`` is accumulated in float64 parameter tensor by parameter tensor, so
its precision does not depend on the model's dtype and ``J`` is never concatenated.

Everything here is free of side effects: nothing writes ``.grad``; the balancer does that once
every check has passed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MEMORY_THRESHOLD",
    "STRATEGIES",
    "MemoryGramian",
    "TaskGradients",
    "backprop_features",
    "combine",
    "gramian",
    "jacobian_numel",
    "memory_gramian",
    "objective_gradients",
    "plan_groups",
    "probe_batched",
    "task_gradients",
    "weighted_gradients",
]

logger = logging.getLogger(__name__)

#: The engine strategies a user can ask for.
STRATEGIES = ("auto", "loop", "batched", "representation", "memory")

#: Jacobian entries (``K ×`` shared parameters) above which ``engine="auto"`` picks the
#: memory-light path; also the budget of Jacobian entries one group of it may hold at once.
#: ``2**27`` entries are 512 MiB of float32 rows (e.g. ``K = 8`` tasks on 16.7 M parameters).
DEFAULT_MEMORY_THRESHOLD = 2**27

#: Columns of float32/float16 rows converted to float64 at a time when accumulating ``G``.
_GRAMIAN_CHUNK = 2**20


@dataclass
class TaskGradients:
    """The task Jacobian on the shared tensors and the summed gradient of the other parameters.

    Attributes:
        rows: one tensor of shape ``(K, *shape)`` per shared tensor (parameter or feature); row
            ``i`` is task ``i``'s gradient (zeros where the task does not reach the tensor), or
            ``None`` when no task reaches it.
        others: one tensor per other (task-specific) parameter: the sum over tasks of their
            unweighted gradients, or ``None`` when no task reaches the parameter.
        task_reached: for each task, whether its loss reached at least one shared tensor.
    """

    rows: list[Tensor | None]
    others: list[Tensor | None]
    task_reached: list[bool]


def _as_scalar_stack(losses: Sequence[Tensor]) -> Tensor:
    flat = [loss.reshape(()) for loss in losses]
    dtypes = {t.dtype for t in flat}
    if len(dtypes) > 1:
        common = torch.float32 if all(d.itemsize <= 4 for d in dtypes) else torch.float64
        flat = [t.to(common) for t in flat]
    return torch.stack(flat)


def _loop(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> TaskGradients:
    k = len(losses)
    rows: list[Tensor | None] = [None] * len(shared)
    summed: list[Tensor | None] = [None] * len(others)
    task_reached = [False] * k
    inputs = [*shared, *others]
    n_shared = len(shared)
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss,
            inputs,
            retain_graph=retain_graph or i < k - 1,
            allow_unused=True,
        )
        for j, g in enumerate(grads[:n_shared]):
            if g is None:
                continue
            task_reached[i] = True
            row = rows[j]
            if row is None:
                row = torch.zeros((k, *g.shape), dtype=g.dtype, device=g.device)
                rows[j] = row
            row[i].copy_(g)
        for j, g in enumerate(grads[n_shared:]):
            if g is None:
                continue
            acc = summed[j]
            summed[j] = g if acc is None else acc.add_(g)
    return TaskGradients(rows=rows, others=summed, task_reached=task_reached)


def _batched(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> TaskGradients:
    stacked = _as_scalar_stack(losses)
    k = stacked.shape[0]
    eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked,
        [*shared, *others],
        grad_outputs=eye,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
    n_shared = len(shared)
    rows = list(grads[:n_shared])
    summed = [None if g is None else g.sum(dim=0) for g in grads[n_shared:]]
    task_reached = [False] * k
    for row in rows:
        if row is not None:
            nonzero = row.reshape(k, -1).ne(0).any(dim=1).tolist()
            task_reached = [a or b for a, b in zip(task_reached, nonzero)]
    if not any(task_reached):
        task_reached = [any(r is not None for r in rows)] * k
    return TaskGradients(rows=rows, others=summed, task_reached=task_reached)


def task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor] = (),
    *,
    strategy: str = "loop",
    retain_graph: bool = False,
) -> TaskGradients:
    """Per-task gradients of ``losses`` w.r.t. ``shared`` and their sum w.r.t. ``others``.

    Args:
        losses: ``K`` scalar losses.
        shared: the tensors whose per-task gradients are needed (shared parameters, or shared
            features for the representation strategy).
        others: tensors whose gradient is only needed summed over tasks (task-specific
            parameters).
        strategy: ``"loop"`` or ``"batched"``.
        retain_graph: keep the graph after the last backward.

    Returns:
        A `TaskGradients`.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> tg = task_gradients([w.sum(), (w ** 2).sum()], [w])
        >>> tg.rows[0]
        tensor([[1., 1.],
                [2., 4.]])
    """
    if strategy == "loop":
        return _loop(losses, shared, others, retain_graph)
    if strategy == "batched":
        return _batched(losses, shared, others, retain_graph)
    raise ValueError(f"strategy must be 'loop' or 'batched', got {strategy!r}")


def probe_batched(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> tuple[TaskGradients, str]:
    """Try the batched strategy; fall back to the loop where vmap fails or is slow.

    Returns the gradients and the strategy to use from now on (``"batched"`` or ``"loop"``).
    The graph is kept during the try so the loop can still run after a failure. A model whose
    backward hits an operation without a vmap batching rule makes torch warn about a
    "performance drop"; the probe then settles on the loop, which is faster for such models.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _batched(losses, shared, others, retain_graph=True)
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("batched engine unavailable for this model (%s); using the loop", exc)
        return _loop(losses, shared, others, retain_graph), "loop"
    slow = [w for w in caught if "batching rule" in str(w.message).lower()]
    for w in caught:
        if w not in slow:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if slow:
        logger.info("batched engine would hit vmap fallbacks (%s); using the loop", slow[0].message)
        return result, "loop"
    return result, "batched"


def gramian(rows: Sequence[Tensor | None], num_tasks: int) -> Tensor:
    """``G = J Jᵀ`` in float64, accumulated tensor by tensor from the Jacobian rows.

    Examples:
        >>> import torch
        >>> gramian([torch.tensor([[1.0, 0.0], [1.0, 1.0]])], 2)
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    device = next((r.device for r in rows if r is not None), torch.device("cpu"))
    g = torch.zeros((num_tasks, num_tasks), dtype=torch.float64, device=device)
    for row in rows:
        if row is not None:
            _add_gramian_(g, row)
    return g


def _add_gramian_(g: Tensor, row: Tensor) -> None:
    """``g += J_p J_pᵀ`` in float64; lower-precision rows are converted in column chunks so the
    float64 copy never exceeds ``K × _GRAMIAN_CHUNK / K`` entries."""
    k = g.shape[0]
    flat = row.reshape(k, -1)
    if flat.dtype == torch.float64:
        g.addmm_(flat, flat.T)
        return
    step = max(1, _GRAMIAN_CHUNK // max(k, 1))
    for start in range(0, flat.shape[1], step):
        part = flat[:, start : start + step].to(torch.float64)
        g.addmm_(part, part.T)


def combine(rows: Sequence[Tensor | None], weights: Tensor) -> list[Tensor | None]:
    """``Jᵀw`` tensor by tensor: the weighted sum of the task gradients.

    Examples:
        >>> import torch
        >>> combine([torch.tensor([[1.0, 0.0], [0.0, 1.0]])], torch.tensor([0.25, 0.75]))
        [tensor([0.2500, 0.7500])]
    """
    out: list[Tensor | None] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        out.append(torch.tensordot(weights.to(device=row.device, dtype=row.dtype), row, dims=1))
    return out


def backprop_features(
    features: Sequence[Tensor],
    shared: Sequence[Tensor],
    feature_grads: Sequence[Tensor | None],
    *,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """Gradients of the shared parameters given the gradient w.r.t. the shared features.

    One backward through the trunk: ``(∂z/∂θ)ᵀ g_z``.
    """
    pairs = [(f, g) for f, g in zip(features, feature_grads) if g is not None]
    if not pairs:
        return [None] * len(shared)
    return list(
        torch.autograd.grad(
            [f for f, _ in pairs],
            list(shared),
            grad_outputs=[g.to(f.dtype) for f, g in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
        )
    )


def objective_gradients(
    objective: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
) -> list[Tensor | None]:
    """One ordinary backward of a scalar objective w.r.t. ``params`` (``None`` where unused)."""
    return list(
        torch.autograd.grad(objective, list(params), retain_graph=retain_graph, allow_unused=True)
    )


# ---------------------------------------------------------------------- memory-light Gramian
#: Called with one group's rows and tensors; returns the rows to use (e.g. all-reduced).
RowsHook = Callable[[list[Tensor | None], list[Tensor]], list[Tensor | None]]


@dataclass
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
        else:
            tg = task_gradients(*args, strategy=strategy, retain_graph=True)
        alive = sum(r.numel() for r in tg.rows if r is not None)
        alive += k * sum(others[j].numel() for j, s in zip(ot, tg.others) if s is not None)
        peak = max(peak, alive)
        rows = tg.rows
        if rows_hook is not None:
            rows = rows_hook(list(rows), [shared[i] for i in sh])
        for i, row in zip(sh, rows):
            if row is not None:
                reached[i] = True
                _add_gramian_(g, row)
        summed_group = tg.others
        for j, s in zip(ot, summed_group):
            summed[j] = s
        task_reached = [a or b for a, b in zip(task_reached, tg.task_reached)]
        del tg, rows, summed_group
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
    stacked = _as_scalar_stack(losses)
    objective = (stacked * weights.to(device=stacked.device, dtype=stacked.dtype)).sum()
    return objective_gradients(objective, params, retain_graph=retain_graph)
