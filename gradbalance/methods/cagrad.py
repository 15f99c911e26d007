"""CAGrad (Liu et al., NeurIPS 2021): the best worst-case descent direction near the mean."""

from __future__ import annotations

import math

from torch import Tensor

from gradbalance.errors import OptionError
from gradbalance.methods._common import checked_gramian
from gradbalance.methods.base import GRAMIAN, LOSSES, Method, StepInputs
from gradbalance.methods.registry import register
from gradbalance.solvers.cagrad import cagrad_weights

__all__ = ["CAGrad"]

_RESCALES = (0, 1, 2)


@register
class CAGrad(Method):
    r"""Conflict-Averse Gradient descent: maximise the worst task improvement near the mean.

    Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for Multi-task Learning*,
    NeurIPS 2021, Algorithm 1. With $g_0 = \frac1K\sum_i g_i$ the mean gradient, CAGrad
    moves along

    $$
    d^\star = \arg\max_{d}\ \min_i\ \langle g_i, d\rangle
    \quad \text{s.t.}\quad \lVert d - g_0\rVert \le c\,\lVert g_0\rVert ,
    $$

    computed through its dual:
    $w^\star = \arg\min_{w\in\Delta} \langle g_w, g_0\rangle + c\lVert g_0\rVert\,\lVert
    g_w\rVert$ with $g_w = \sum_i w_i g_i$, and
    $d^\star = g_0 + \frac{c\lVert g_0\rVert}{\lVert g_{w^\star}\rVert}\, g_{w^\star}$.
    The update is $d^\star$ divided by the official code's ``rescale`` factor: ``0``: none,
    ``1`` (default): $1 + c^2$, ``2``: $1 + c$. So the weights are

    $$
    w = \frac{1}{r}\Bigl(\tfrac1K \mathbf 1 + \frac{c\lVert g_0\rVert}{\lVert g_{w^\star}\rVert}
    w^\star\Bigr), \qquad \lVert g_0\rVert^2 = \tfrac{1}{K^2}\mathbf 1^\top G \mathbf 1,\quad
    \lVert g_{w}\rVert^2 = w^\top G w .
    $$

    ``c = 0`` gives the mean gradient; larger ``c`` moves further towards the min-norm
    (MGDA-like) direction. The dual is solved exactly from the Gramian by
    `gradbalance.solvers.cagrad.cagrad_weights` (min-norm subproblems and a root search, in
    float64, with a verified duality gap); see that function for the algorithm.

    Scale: the weights do not change when every gradient is multiplied by the same factor
    (the update is multiplied by it). No non-conflict guarantee: the worst inner product is
    maximised, not made non-negative.

    Deviations from the official code: the dual is solved to a certified duality gap instead
    of by ``scipy.optimize.minimize`` (SLSQP) with ``1e-8`` added under the square roots; when
    0 is in the convex hull of the gradients and the ball reaches the dual cone (the dual
    optimum has $g_{w^\star} = 0$, where the official code divides by ``1e-8``), the update is
    the projection of $g_0$ onto the dual cone $\{d : \langle g_i, d\rangle \ge 0\}$, which
    attains the optimal value 0. Task-specific parameters get their own task's gradient.

    Args:
        c: the radius factor $c \ge 0$ (official code's default 0.5).
        rescale: ``0``, ``1`` (default) or ``2``, as in the official code.

    Examples:
        >>> import torch, gradbalance as gb
        >>> J = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
        >>> G = J @ J.T
        >>> m = gb.methods.get("cagrad", c=0.0)
        >>> m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=G))
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> m = gb.methods.get("cagrad", c=0.5, rescale=0)
        >>> w = m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=G))
        >>> bool(((G @ w) > 0).all())  # here it decreases both losses
        True
    """

    name = "cagrad"
    requires = frozenset({LOSSES, GRAMIAN})
    paper = (
        "B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu. Conflict-Averse Gradient Descent for "
        "Multi-task Learning. NeurIPS 2021."
    )
    stateful = False
    scale_invariant = "weights"
    non_conflicting = False

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        super().__init__()
        cc = float(c)
        if not math.isfinite(cc) or cc < 0:
            raise OptionError(f"c must be a finite non-negative number, got {c!r}")
        if isinstance(rescale, bool) or rescale not in _RESCALES:
            raise OptionError(f"rescale must be one of {_RESCALES}, got {rescale!r}")
        self.c = cc
        self.rescale = int(rescale)

    def weights(self, inputs: StepInputs) -> Tensor:
        g = checked_gramian(inputs, "CAGrad")
        w = cagrad_weights(g, self.c)
        if self.rescale == 1:
            w = w / (1.0 + self.c**2)
        elif self.rescale == 2:
            w = w / (1.0 + self.c)
        return w

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}"
