"""Equal weighting: the plain multi-task baseline ``Σ_i L_i``."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.methods.base import LOSSES, Method, StepInputs
from gradbalance.methods.registry import register

__all__ = ["Equal"]


@register
class Equal(Method):
    """Every task gets weight 1: the update is the gradient of ``Σ_i L_i``.

    This is the baseline every balancing paper compares against. Through `GradBalancer`
    it reproduces ``sum(losses).backward()`` followed by the inner optimizer's step exactly, at
    the cost of one ordinary backward.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method="equal")
        >>> out = model(torch.randn(4, 3))
        >>> opt.backward([out[:, 0].mean(), out[:, 1].pow(2).mean()])
        tensor([1., 1.])
    """

    name = "equal"
    requires = frozenset({LOSSES})
    stateful = False
    scale_invariant = "weights"
    paper = "Baseline (no paper): the unweighted sum of task losses."

    def weights(self, inputs: StepInputs) -> Tensor:
        return torch.ones(inputs.num_tasks, dtype=torch.float64)
