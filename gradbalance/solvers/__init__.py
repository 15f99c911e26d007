"""Numerical kernels with no autograd and no model knowledge.

- `min_norm`: exact, batched minimum-norm point in the convex hull of task gradients
  (MGDA's subproblem) from their Gramian, with its duality gap `min_norm_gap`.
- `nonneg_qp`: exact, batched non-negative quadratic programs (dual-cone projections).
- `project_simplex`: Euclidean projection onto the probability simplex.
- `cagrad_weights`: CAGrad's ball-constrained max-min problem, exactly through its dual.
- `nash_bargaining`: Nash-MTL's bargaining weights (``Gα = 1/α``).

Everything here is pure tensor code: batched over leading dimensions, computed in float64, with
no host synchronisation on the default CUDA path. Each solver runs with one intra-op thread on
CPU and gives the caller's setting back (`gradbalance.solvers._threads`).

Examples:
    >>> import torch
    >>> from gradbalance.solvers import min_norm
    >>> min_norm(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    tensor([0.2000, 0.8000])
"""

from gradbalance.solvers.cagrad import cagrad_weights
from gradbalance.solvers.min_norm import min_norm, min_norm_gap
from gradbalance.solvers.nash import nash_bargaining
from gradbalance.solvers.qp import nonneg_qp
from gradbalance.solvers.simplex import project_simplex

__all__ = [
    "cagrad_weights",
    "min_norm",
    "min_norm_gap",
    "nash_bargaining",
    "nonneg_qp",
    "project_simplex",
]
