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

The Gramian ``G = J Jᵀ`` is accumulated in float64 parameter tensor by parameter tensor, so
its precision does not depend on the model's dtype and ``J`` is never concatenated.

Everything here is free of side effects: nothing writes ``.grad``; the balancer does that once
every check has passed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "STRATEGIES",
    "TaskGradients",
    "backprop_features",
    "combine",
    "gramian",
    "objective_gradients",
    "probe_batched",
    "task_gradients",
]

logger = logging.getLogger(__name__)

#: The engine strategies a user can ask for.
STRATEGIES = ("auto", "loop", "batched", "representation")


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
        if row is None:
            continue
        flat = row.reshape(num_tasks, -1).to(torch.float64)
        g.addmm_(flat, flat.T)
    return g


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
