"""The representation engine (MGDA-UB): gradients w.r.t. the shared *features* ``z`` instead of
the shared parameters. ``K`` backwards through the task heads only give the rows on ``z``; the
update is one backward through the trunk with the combined feature gradient
``Σ_i w_i ∇_z L_i``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradbalance.engine.base import Request
from gradbalance.engine.loop import loop_gradients
from gradbalance.engine.result import TaskGradients
from gradbalance.errors import LossError, UnreachedParameterError

__all__ = ["RepresentationEngine", "backprop_features"]


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


class RepresentationEngine:
    """The `gradbalance.engine.Engine` of ``engine="representation"``: the result's rows are
    on the request's ``features``; `update` returns the gradients of its ``shared``
    parameters. The request's ``rows_hook`` is not applied (feature gradients of different
    ranks belong to different samples).

    Examples:
        >>> import torch
        >>> from gradbalance.engine import RepresentationEngine, Request
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> z = 3 * w
        >>> request = Request([z.sum(), (z ** 2).sum()], [w], features=[z])
        >>> engine = RepresentationEngine()
        >>> result = engine.compute(request)
        >>> result.rows[0]
        tensor([[ 1.,  1.],
                [ 6., 12.]])
        >>> engine.update(request, result, torch.tensor([1.0, 0.0]))
        [tensor([3., 3.])]
    """

    name = "representation"

    def compute(self, request: Request) -> TaskGradients:
        # the heads' graph is kept: the update backpropagates through the trunk afterwards
        result = loop_gradients(request.losses, request.features, request.others, True)
        missing = [
            request.tasks[i] if i < len(request.tasks) else f"#{i}"
            for i, reached in enumerate(result.task_reached)
            if not reached
        ]
        if missing:
            raise LossError(
                f"the loss of task(s) {missing} does not depend on the features passed to "
                "backward(); pass the shared representation every head reads"
            )
        return result

    def update(
        self,
        request: Request,
        result: TaskGradients,
        weights: Tensor,
        direction: list[Tensor | None] | None = None,
    ) -> list[Tensor | None]:
        combined = result.combine(weights) if direction is None else direction
        grads = backprop_features(
            request.features, request.shared, combined, retain_graph=request.retain_graph
        )
        unreached = [request.label(p) for p, g in zip(request.shared, grads) if g is None]
        if unreached:
            raise UnreachedParameterError(
                f"the features passed to backward() do not depend on {', '.join(unreached)}; "
                "remove it from shared=... or pass the features computed from it"
            )
        return grads
