"""The loop engine: ``K`` calls of `torch.autograd.grad`, one per task loss, keeping the graph
between them. Works for every model; peak memory is one backward's."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from gradbalance._torch_compat import autograd_grad
from gradbalance.engine.base import ParameterEngine, Request
from gradbalance.engine.result import TaskGradients, from_per_task

__all__ = ["LoopEngine", "loop_gradients"]


def loop_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> TaskGradients:
    """Per-task gradients on ``shared`` and their sum on ``others``, one backward per task."""
    k = len(losses)
    n_shared = len(shared)
    by_task: list[tuple[Tensor | None, ...]] = []
    summed: list[Tensor | None] = [None] * len(others)
    inputs = (*shared, *others)
    for i, loss in enumerate(losses):
        grads = autograd_grad(loss, inputs, retain_graph or i < k - 1)
        by_task.append(tuple(grads[:n_shared]))
        for j in range(len(others)):
            g = grads[n_shared + j]
            if g is None:
                continue
            acc = summed[j]
            summed[j] = g if acc is None else acc.add_(g)
    return from_per_task(by_task, shared, summed)


class LoopEngine(ParameterEngine):
    """The `gradbalance.engine.Engine` of ``engine="loop"``.

    Examples:
        >>> import torch
        >>> from gradbalance.engine import LoopEngine, Request
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> LoopEngine().compute(Request([w.sum(), (w ** 2).sum()], [w])).rows[0]
        tensor([[1., 1.],
                [2., 4.]])
    """

    name = "loop"

    def jacobian(self, request: Request) -> TaskGradients:
        return loop_gradients(request.losses, request.shared, request.others, request.retain_graph)
