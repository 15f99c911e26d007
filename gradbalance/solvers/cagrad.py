r"""CAGrad's ball-constrained max-min problem on a Gramian (Liu et al., NeurIPS 2021).

`cagrad_weights` reads only the Gramian $G = J J^\top$ of the task gradients (rows of $J$)
and returns weights $w$ such that the update is $J^\top w$: the maximiser of
$\min_i \langle g_i, d\rangle$ over the ball $\lVert d - g_0\rVert \le c \lVert g_0\rVert$,
solved exactly through its dual with the exact min-norm solver. It works in float64 on the CPU
(the problem is $K \times K$), returns the weights in the dtype and on the device of ``G``, and
verifies its own answer: the duality gap is computed from ``G`` and a
`gradbalance.errors.SolverError` is raised when it is too large, never a silent fallback.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import scipy.optimize
import torch
from torch import Tensor

from gradbalance.errors import SolverError
from gradbalance.solvers._threads import cpu_single_thread
from gradbalance.solvers.gramian import check_gramian, symmetric_float64
from gradbalance.solvers.min_norm import min_norm
from gradbalance.solvers.qp import nonneg_qp

__all__ = ["cagrad_weights"]

_F64 = torch.float64
#: A min-norm value (relative to ``max diag G``) at or below this means 0 is in the hull.
_ZERO_HULL = 1e-12
#: Largest accepted duality gap of `cagrad_weights`, relative to ``max diag G``.
_CAGRAD_GAP = 1e-7


def _cagrad_h(g: Tensor, b: Tensor, g0sq: Tensor, rho: float) -> tuple[Tensor, float]:
    """``w(ρ)`` (min-norm weights of the shifted gradients ``ρ g_i + g_0``) and
    ``h(ρ) = ρ ‖Jᵀ w(ρ)‖``, the norm of the point of ``ρ·conv(g_i)`` nearest to ``-g_0``."""
    shifted = (rho * rho) * g + rho * (b.view(-1, 1) + b.view(1, -1)) + g0sq
    w = min_norm(shifted)
    n2 = float((w @ g @ w).clamp_min(0.0))
    return w, rho * math.sqrt(n2)


@overload
def cagrad_weights(G: Tensor, c: float, *, return_gap: Literal[False] = ...) -> Tensor: ...


@overload
def cagrad_weights(G: Tensor, c: float, *, return_gap: Literal[True]) -> tuple[Tensor, Tensor]: ...


@cpu_single_thread
def cagrad_weights(
    G: Tensor, c: float, *, return_gap: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Weights of CAGrad's update (Liu et al., NeurIPS 2021), before any rescaling.

    CAGrad moves along the solution of

    $$
    \max_{d}\ \min_i \langle g_i, d\rangle \quad\text{s.t.}\quad
    \lVert d - g_0\rVert \le c\,\lVert g_0\rVert, \qquad g_0 = \tfrac1K \textstyle\sum_i g_i ,
    $$

    whose dual is $\min_{w \in \Delta} F(w) = \langle g_w, g_0\rangle + c\lVert g_0\rVert
    \lVert g_w\rVert$ with $g_w = J^\top w$; the primal solution is
    $d^\star = g_0 + c\lVert g_0\rVert\, g_{w^\star} / \lVert g_{w^\star}\rVert$, i.e. the weights
    $\tfrac1K \mathbf 1 + c\lVert g_0\rVert\, w^\star / \lVert g_{w^\star}\rVert$.

    Solver (exact up to rounding, no iteration count to tune): at the optimum $w^\star$ also
    minimises the quadratic $\langle g_w, g_0\rangle + \tfrac\rho2 \lVert g_w\rVert^2$ over the
    simplex for $\rho = c\lVert g_0\rVert / \lVert g_{w^\star}\rVert$, i.e. $g_{w^\star}$ is the
    point of the hull nearest to $-g_0/\rho$: a min-norm problem of the shifted gradients
    $\rho g_i + g_0$, solved exactly by `gradbalance.solvers.min_norm`. The scalar $\rho$
    is the root of $\rho\,\lVert g_{w(\rho)}\rVert = c \lVert g_0\rVert$, bracketed in closed
    form and found by Brent's method in $\log\rho$ to machine precision. When 0
    lies in the hull and the ball meets the dual cone, the optimal value is 0 and $d^\star$ is
    the projection of $g_0$ onto the dual cone $\{d : \langle g_i, d\rangle \ge 0\}$
    (`gradbalance.solvers.nonneg_qp`). The answer is certified by the duality gap
    $F(w) - \min_i \langle g_i, d\rangle$.

    Args:
        G: the Gramian, shape ``(K, K)``.
        c: the radius factor ``c >= 0``; ``c = 0`` gives the mean gradient (weights ``1/K``).
        return_gap: also return the duality gap (float64, units of ``G``).

    Returns:
        Weights ``(K,)`` in the dtype and on the device of ``G`` (and the gap).

    Raises:
        SolverError: if the certified duality gap exceeds ``1e-7 * max(diag G)``.
        NonFiniteError: if ``G`` has NaN or infinite entries.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers.cagrad import cagrad_weights
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
        >>> cagrad_weights(G, 0.0).tolist()
        [0.5, 0.5]
        >>> w = cagrad_weights(G, 0.5)  # symmetric tasks: still the mean direction, longer
        >>> w.round(decimals=6).tolist()
        [0.75, 0.75]
    """
    k = check_gramian(G, "cagrad_weights")
    c = float(c)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"c must be a finite non-negative number, got {c!r}")
    g = symmetric_float64(G)
    m = torch.full((k,), 1.0 / k, dtype=_F64)
    zero = torch.zeros((), dtype=_F64)

    def done(v: Tensor, gap: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = v.to(device=G.device, dtype=G.dtype)
        return (out, gap) if return_gap else out

    scale = g.diagonal().max()
    if c == 0.0 or not bool(scale > 0):
        return done(m, zero)
    g = g / scale
    b = g @ m
    g0sq = (m @ b).clamp_min(0.0)
    r0 = c * float(g0sq.sqrt())
    if r0 <= 0.0:  # g_0 = 0: the ball is the single point 0
        return done(m, zero)

    w_mn = min_norm(g)
    nmin2 = float(w_mn @ g @ w_mn)
    lo = r0  # h(ρ) <= ρ max_i ‖g_i‖ = ρ: h(r0) <= r0
    if nmin2 > _ZERO_HULL:
        hi = r0 / math.sqrt(nmin2)  # h(ρ) >= ρ ‖min-norm point‖
    else:
        # 0 in the hull: the value is <= 0. The ball reaches the dual cone iff the distance of
        # g_0 to it (= ‖P_cone(-g_0)‖ = lim h) is <= r0; then the projection of g_0 is optimal.
        u = nonneg_qp(g, -b)
        dist = float((u @ g @ u).clamp_min(0.0).sqrt())
        if dist <= r0 * (1 + 1e-12):
            v = m + u
            primal = (g @ v).min()
            gap = (-primal).clamp_min(0.0)  # the dual value at the min-norm point is 0
            _check_gap(gap, "cagrad_weights")
            return done(v, gap * scale)
        hi = 2.0 * r0
        for _ in range(200):
            if _cagrad_h(g, b, g0sq, hi)[1] >= r0:
                break
            hi *= 2.0

    # h(lo) <= r0 <= h(hi) up to rounding: Brent's method on log ρ (h is continuous and
    # piecewise smooth); an end that already meets r0 (to rounding) is the root
    def f(t: float) -> float:
        return _cagrad_h(g, b, g0sq, math.exp(t))[1] - r0

    a, z = math.log(lo), math.log(hi)
    if f(a) >= 0:
        t = a
    elif f(z) <= 0:
        t = z
    else:
        t = scipy.optimize.brentq(
            f, a, z, xtol=1e-15, rtol=4 * float(torch.finfo(_F64).eps), maxiter=500
        )
    w, _ = _cagrad_h(g, b, g0sq, math.exp(t))
    n = float((w @ g @ w).clamp_min(0.0).sqrt())
    if n <= 0.0:
        raise SolverError(
            "cagrad_weights: the dual solution has a zero combined gradient although 0 is not "
            "optimal; the Gramian is numerically degenerate (report this Gramian)"
        )
    v = m + (r0 / n) * w
    dual = b @ w + r0 * n
    primal = (g @ v).min()
    gap = (dual - primal).clamp_min(0.0)
    _check_gap(gap, "cagrad_weights")
    return done(v, gap * scale)


def _check_gap(gap: Tensor, what: str) -> None:
    if not bool(gap <= _CAGRAD_GAP):
        raise SolverError(
            f"{what}: the certified duality gap {float(gap):.3g} (relative to max diag G) "
            f"exceeds {_CAGRAD_GAP:g}; nothing was applied. The Gramian may be severely "
            "ill-conditioned; check the task gradients"
        )
