"""Geometric Loss Strategy (Chennupati et al., CVPR Workshops 2019): the geometric mean loss."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.errors import LossError
from gradbalance.methods.base import LOSSES, Method, StepInputs, as_float64
from gradbalance.methods.registry import register

__all__ = ["GLS"]


@register
class GLS(Method):
    r"""Geometric Loss Strategy: minimise the geometric mean of the task losses.

    Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning*, CVPR Workshops 2019. The objective is

    $$
    L_\text{GLS} = \Bigl(\prod_{i=1}^K L_i\Bigr)^{1/K},
    \qquad
    \nabla L_\text{GLS} = \sum_i \frac{L_\text{GLS}}{K L_i} \nabla L_i ,
    $$

    so GLS is the loss weighting $w_i = L_\text{GLS} / (K L_i)$ (the losses detached in the
    weights): ``GradBalancer`` backpropagates $\sum_i w_i L_i$, whose gradient is exactly
    $\nabla L_\text{GLS}$ and whose value is $L_\text{GLS}$. A task with a small loss gets a
    large weight; multiplying every loss by the same factor leaves the weights unchanged, and
    multiplying one loss by a factor leaves its *relative* gradient contribution
    $\nabla L_i / L_i$ unchanged.

    $L_\text{GLS}$ is computed as $\exp(\frac1K \sum_i \log L_i)$ in float64, so it neither
    overflows nor underflows for many tasks.

    Deviations from the paper: none. The losses must be positive (the geometric mean and the
    weights are undefined otherwise); a loss $\le 0$ raises `gradbalance.LossError` naming the
    task, before anything is applied.

    Examples:
        >>> import torch, gradbalance as gb
        >>> m = GLS()
        >>> m.bind(("a", "b"))
        >>> m.weights(gb.methods.StepInputs(("a", "b"), torch.tensor([1.0, 4.0])))
        tensor([1.0000, 0.2500], dtype=torch.float64)
    """

    name = "gls"
    requires = frozenset({LOSSES})
    paper = (
        "S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh. MultiNet++: Multi-Stream Feature "
        "Aggregation and Geometric Loss Strategy for Multi-Task Learning. CVPR Workshops 2019."
    )
    stateful = False
    scale_invariant = "weights"

    @staticmethod
    def objective(losses: Tensor) -> Tensor:
        """$L_\\text{GLS} = (\\prod_i L_i)^{1/K}$ of positive ``losses`` (differentiable)."""
        return torch.exp(torch.log(losses).mean())

    def weights(self, inputs: StepInputs) -> Tensor:
        losses = as_float64(inputs.losses)
        bad = [inputs.tasks[i] for i, ok in enumerate((losses > 0).tolist()) if not ok]
        if bad:
            raise LossError(
                f"GLS takes the geometric mean of the losses, but the loss of task(s) {bad} is "
                f"not positive ({losses.tolist()}); make every loss positive (e.g. add a small "
                "constant) or use another method"
            )
        return self.objective(losses) / (inputs.num_tasks * losses)
