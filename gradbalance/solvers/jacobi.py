r"""The min-norm problem in Jacobi-scaled variables, which keeps spread-out norms exact.

With $d_i = \sqrt{G_{ii}}$ (floored at `NORM_FLOOR` times the largest),
$\hat G = D^{-1} G D^{-1}$ (unit diagonal) and $b_i = d_{\min} / d_i \in (0, 1]$, the
solution $x \ge 0$ of $\min_x \tfrac12 x^\top (\hat G + b b^\top) x - b^\top x$ gives
$w^\star = (b \odot x) / \mathbf 1^\top (b \odot x)$ exactly: it is
$\min_u \tfrac12 u^\top (G + d_{\min}^2 \mathbf 1 \mathbf 1^\top) u - \mathbf 1^\top u$
(whose solution is $w^\star / (d_{\min}^2 + f^\star)$) in the variable $x = D u / d_{\min}$.
Every entry of the matrix is at most 2 in magnitude whatever the spread of the norms, so no
gradient is lost next to a much larger one (as it is next to $\max_i G_{ii}\,
\mathbf 1 \mathbf 1^\top$). Every min-norm path for ``K >= 3`` solves this problem.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NORM_FLOOR", "jacobi_scale", "scaled_residual", "weights_from"]

#: Norms below this fraction of the largest one are raised to it by the Jacobi scaling (keeps
#: every ratio within float64's range; such a gradient is zero for every practical purpose).
NORM_FLOOR = 1e-150


def jacobi_scale(g: Tensor) -> tuple[Tensor, Tensor]:
    """The min-norm problem of the symmetric ``g`` (B, K, K) as the well-scaled NNQP above.

    Returns ``(q, b)`` with ``q = Ĝ + b bᵀ`` (B, K, K) and ``b`` (B, K).
    """
    norms = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    d = torch.maximum(norms, norms.amax(-1, keepdim=True) * NORM_FLOOR)
    d = torch.where(d > 0, d, torch.ones_like(d))  # an all-zero Gramian
    gh = g / d.unsqueeze(-1) / d.unsqueeze(-2)
    b = d.amin(-1, keepdim=True) / d
    return gh + b.unsqueeze(-1) * b.unsqueeze(-2), b


def weights_from(x: Tensor, b: Tensor) -> Tensor:
    """``w = b x / 1ᵀ(b x)`` (uniform when that is zero)."""
    u = b * x
    tot = u.sum(-1, keepdim=True)
    return torch.where(tot > 0, u / tot.clamp_min(torch.finfo(u.dtype).tiny), 1.0 / x.shape[-1])


def scaled_residual(q: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """KKT residual of ``x`` for the scaled NNQP, relative to ``1 + max(x)`` (as in the
    engine of `gradbalance.solvers.pivoting`)."""
    y = (q @ x.unsqueeze(-1)).squeeze(-1) - b
    res = torch.where(x > 0, y.abs(), (-y).clamp_min(0)).amax(-1)
    return res / (1 + x.amax(-1))
