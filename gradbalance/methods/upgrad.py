"""UPGrad (Quinton & Rey, 2024): the mean of the task gradients projected onto the dual cone."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradbalance.errors import OptionError
from gradbalance.methods._common import checked_gramian
from gradbalance.methods.base import GRAMIAN, LOSSES, Method, StepInputs
from gradbalance.methods.registry import register
from gradbalance.solvers import nonneg_qp

__all__ = ["UPGrad", "dual_cone_weights"]


def dual_cone_weights(gramian: Tensor, tol: float = 1e-12) -> Tensor:
    r"""Weights of the projections of every task gradient onto the dual cone, from $G$.

    Row ``i`` holds $v^{(i)}$ with $J^\top v^{(i)} = \pi(g_i)$, the Euclidean projection of
    $g_i$ onto $\{x : Jx \ge 0\}$: $v^{(i)} = \arg\min_{v \ge e_i} v^\top G v$ (Quinton & Rey,
    2024, Prop. 1), i.e. $v^{(i)} = e_i + z$ with
    $z = \arg\min_{z\ge0} \tfrac12 z^\top G z + z^\top G e_i$, solved exactly and in one
    batch by `gradbalance.solvers.nonneg_qp`.

    Returns:
        ``(K, K)`` weights, one row per task.
    """
    k = gramian.shape[-1]
    z = nonneg_qp(gramian.expand(k, k, k), -gramian, tol=tol)
    return torch.eye(k, dtype=gramian.dtype, device=gramian.device) + z


@register
class UPGrad(Method):
    r"""UPGrad: average the task gradients after projecting each onto the dual cone.

    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024 (arXiv:2406.16232;
    TorchJD's default aggregator). Each gradient $g_i$ is projected onto the dual cone of the
    gradients, $\{x : \langle g_j, x\rangle \ge 0\ \forall j\}$, and the projections are
    averaged:

    $$
    d = \frac1K \sum_i \pi(g_i),\qquad
    \pi(g_i) = \arg\min_{x :\, Jx \ge 0} \lVert x - g_i\rVert^2 = J^\top v^{(i)},\qquad
    v^{(i)} = \arg\min_{v \ge e_i} v^\top G v ,
    $$

    so the weights are $w = \frac1K\sum_i v^{(i)}$ (or $\sum_i p_i v^{(i)}$ with preferences
    $p$). Each quadratic program is solved exactly, all $K$ in one batch, by
    `gradbalance.solvers.nonneg_qp`.

    Properties (from the paper): the update lies in the dual cone, so it never conflicts with
    any task ($\langle g_j, d\rangle \ge 0$ for all $j$); it equals the mean gradient when no
    pair of gradients conflicts; the weights do not change when every gradient is multiplied
    by the same factor (the update is multiplied by it).

    Deviations: none in the formula. TorchJD solves the projections with ``quadprog`` after
    normalising $G$ and adding ``1e-4`` to its diagonal (``reg_eps``); we solve the
    unregularised problems exactly (to a verified KKT residual). Task-specific parameters get
    their own task's gradient.

    Args:
        pref: preferences $p$ (``K`` non-negative numbers) weighting the projections; default
            $1/K$ each (the mean, as the paper).
        tol: relative KKT tolerance of the quadratic programs.

    Examples:
        >>> import torch, gradbalance as gb
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> m = gb.methods.get("upgrad")
        >>> w = m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=J @ J.T))
        >>> w @ J  # the mean of the projections (1/2, 1/2) and (0, 1)
        tensor([0.2500, 0.7500], dtype=torch.float64)
        >>> J @ (w @ J)  # non-negative inner product with both gradients
        tensor([0.2500, 0.5000], dtype=torch.float64)
    """

    name = "upgrad"
    requires = frozenset({LOSSES, GRAMIAN})
    paper = (
        "P. Quinton, V. Rey. Jacobian Descent for Multi-Objective Optimization. "
        "arXiv:2406.16232, 2024."
    )
    stateful = False
    scale_invariant = "weights"
    non_conflicting = True

    def __init__(self, pref: Sequence[float] | Tensor | None = None, *, tol: float = 1e-12) -> None:
        super().__init__()
        self.pref: list[float] | None = None
        if pref is not None:
            values = [float(x) for x in (pref.tolist() if isinstance(pref, Tensor) else pref)]
            if not values or any(not math.isfinite(x) or x < 0 for x in values):
                raise OptionError(f"pref must be non-negative finite numbers, got {pref!r}")
            self.pref = values
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise OptionError(f"tol must be a non-negative number, got {tol!r}")
        self.tol = float(tol)

    def weights(self, inputs: StepInputs) -> Tensor:
        g = checked_gramian(inputs, "UPGrad")
        k = inputs.num_tasks
        if self.pref is None:
            p = torch.full((k,), 1.0 / k, dtype=g.dtype, device=g.device)
        else:
            if len(self.pref) != k:
                raise ValueError(
                    f"UPGrad has {len(self.pref)} preferences but there are {k} tasks "
                    f"{list(inputs.tasks)}; give one per task"
                )
            p = torch.tensor(self.pref, dtype=g.dtype, device=g.device)
        return p @ dual_cone_weights(g, self.tol)

    def extra_repr(self) -> str:
        return "" if self.pref is None else f"pref={self.pref}"
