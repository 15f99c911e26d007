"""Mean weighting: ``(1/K) Σ_i L_i``."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.methods.base import LOSSES, Method, StepInputs
from gradbalance.methods.registry import register

__all__ = ["Mean"]


@register
class Mean(Method):
    """Every task gets weight ``1/K``: the update is the gradient of the mean task loss.

    Identical in direction to `gradbalance.methods.Equal`, ``K`` times smaller, which
    matters for optimizers that are not scale invariant (SGD) and for learning-rate tuning.

    Examples:
        >>> import gradbalance as gb
        >>> gb.methods.get("mean")
        Mean()
    """

    name = "mean"
    requires = frozenset({LOSSES})
    stateful = False
    scale_invariant = "weights"
    paper = "Baseline (no paper): the mean of the task losses."

    def weights(self, inputs: StepInputs) -> Tensor:
        k = inputs.num_tasks
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
