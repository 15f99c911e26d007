"""The batched engine: one call of `torch.autograd.grad` with ``is_grads_batched=True``, so
that autograd runs the ``K`` backwards as one vmapped backward. Fastest where every operation
of the model has a batching rule; needs ``K`` times the gradient memory of one backward."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from gradbalance.engine.base import ParameterEngine, Request, as_scalar_stack
from gradbalance.engine.loop import loop_gradients
from gradbalance.engine.result import TaskGradients

__all__ = ["BatchedEngine", "batched_gradients", "probe_batched"]

logger = logging.getLogger(__name__)


def batched_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> TaskGradients:
    """Per-task gradients on ``shared`` and their sum on ``others``, in one vmapped backward."""
    stacked = as_scalar_stack(losses)
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
    # autograd.grad is typed as returning tensors; with allow_unused=True entries may be None
    rows: list[Tensor | None] = list(grads[:n_shared])
    summed: list[Tensor | None] = [None if g is None else g.sum(dim=0) for g in grads[n_shared:]]
    if all(r is None for r in rows):
        return TaskGradients(rows=rows, others=summed, task_reached=[False] * k)
    # which tasks reach a shared tensor is computed only when read (see TaskGradients)
    return TaskGradients(rows=rows, others=summed)


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
            result = batched_gradients(losses, shared, others, retain_graph=True)
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("batched engine unavailable for this model (%s); using the loop", exc)
        return loop_gradients(losses, shared, others, retain_graph), "loop"
    slow = [w for w in caught if "batching rule" in str(w.message).lower()]
    for w in caught:
        if w not in slow:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if slow:
        logger.info("batched engine would hit vmap fallbacks (%s); using the loop", slow[0].message)
        return result, "loop"
    return result, "batched"


class BatchedEngine(ParameterEngine):
    """The `gradbalance.engine.Engine` of ``engine="batched"``.

    Examples:
        >>> import torch
        >>> from gradbalance.engine import BatchedEngine, Request
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> BatchedEngine().compute(Request([w.sum(), (w ** 2).sum()], [w])).rows[0]
        tensor([[1., 1.],
                [2., 4.]])
    """

    name = "batched"

    def jacobian(self, request: Request) -> TaskGradients:
        return batched_gradients(
            request.losses, request.shared, request.others, request.retain_graph
        )
