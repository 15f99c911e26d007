r"""The minimum-norm point of the convex hull of the task gradients (MGDA's subproblem).

Sener & Koltun (NeurIPS 2018, eq. (3)) solve

$$
\min_{w \in \Delta^K} \Big\| \sum_i w_i g_i \Big\|^2 = \min_{w \in \Delta^K} w^\top G w,
\qquad \Delta^K = \{w \ge 0,\ \mathbf 1^\top w = 1\},\quad G = J J^\top,
$$

with a Frank-Wolfe loop in Python. `min_norm` solves the same problem exactly (to the
tolerance of a verified duality gap) with batched tensor code; the algorithm and its guarantees
are documented on the solvers page of the docs and in `gradbalance.solvers.qp`.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from gradbalance.errors import NonFiniteError
from gradbalance.solvers._small import SMALL_MAX_K, solve_small
from gradbalance.solvers._threads import cpu_single_thread
from gradbalance.solvers.qp import (
    _RIDGE,
    _default_max_iter,
    _is_compiling,
    _resolve_flags,
    _solve_nnqp,
)

__all__ = ["min_norm", "min_norm_gap"]

_NONFINITE = (
    "min_norm received a Gramian with NaN or infinite entries; a task loss or gradient is not "
    "finite (check the losses, or skip the step)"
)
#: Largest K solved by enumerating the supports (2^K - 1 small systems, no iteration).
_ENUM_MAX_K = 8
#: Cap on the number of small systems per enumeration chunk (bounds the memory).
_ENUM_CHUNK = 1 << 15


#: Norms below this fraction of the largest one are raised to it by the Jacobi scaling (keeps
#: every ratio within float64's range; such a gradient is zero for every practical purpose).
_NORM_FLOOR = 1e-150


def _jacobi(g: Tensor) -> tuple[Tensor, Tensor]:
    r"""The min-norm problem of the symmetric ``g`` (B, K, K) as a well-scaled NNQP.

    With $d_i = \sqrt{G_{ii}}$ (floored at ``_NORM_FLOOR`` times the largest),
    $\hat G = D^{-1} G D^{-1}$ (unit diagonal) and $b_i = d_{\min} / d_i \in (0, 1]$, the
    solution $x \ge 0$ of $\min_x \tfrac12 x^\top (\hat G + b b^\top) x - b^\top x$ gives
    $w^\star = (b \odot x) / \mathbf 1^\top (b \odot x)$ exactly: it is
    $\min_u \tfrac12 u^\top (G + d_{\min}^2 \mathbf 1 \mathbf 1^\top) u - \mathbf 1^\top u$
    (whose solution is $w^\star / (d_{\min}^2 + f^\star)$) in the variable $x = D u / d_{\min}$.
    Every entry of the matrix is at most 2 in magnitude whatever the spread of the norms, so no
    gradient is lost next to a much larger one (as it is next to $\max_i G_{ii}\,
    \mathbf 1 \mathbf 1^\top$). Returns ``(q, b)``.
    """
    norms = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    d = torch.maximum(norms, norms.amax(-1, keepdim=True) * _NORM_FLOOR)
    d = torch.where(d > 0, d, torch.ones_like(d))  # an all-zero Gramian
    gh = g / d.unsqueeze(-1) / d.unsqueeze(-2)
    b = d.amin(-1, keepdim=True) / d
    return gh + b.unsqueeze(-1) * b.unsqueeze(-2), b


def _weights_from(x: Tensor, b: Tensor) -> Tensor:
    """``w = b x / 1ᵀ(b x)`` (uniform when that is zero)."""
    u = b * x
    tot = u.sum(-1, keepdim=True)
    return torch.where(tot > 0, u / tot.clamp_min(torch.finfo(u.dtype).tiny), 1.0 / x.shape[-1])


def _scaled_residual(q: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """KKT residual of ``x`` for the scaled NNQP, relative to ``1 + max(x)`` (as in qp)."""
    y = (q @ x.unsqueeze(-1)).squeeze(-1) - b
    res = torch.where(x > 0, y.abs(), (-y).clamp_min(0)).amax(-1)
    return res / (1 + x.amax(-1))


def min_norm_gap(G: Tensor, w: Tensor) -> Tensor:
    r"""Frank-Wolfe duality gap of weights ``w`` for the min-norm problem of ``G``.

    $$
    \operatorname{gap}(w) = w^\top G w - \min_i (G w)_i \;\ge\; w^\top G w - \min_{v \in
    \Delta} v^\top G v \;\ge\; 0 ,
    $$

    an upper bound on the suboptimality of ``w`` (for ``w`` on the simplex and ``G`` positive
    semi-definite), zero exactly at the optimum. It is the KKT condition
    $(Gw)_i \ge w^\top G w$ with equality on the support, in one number.

    Args:
        G: ``(..., K, K)`` Gramians.
        w: ``(..., K)`` weights on the simplex.

    Returns:
        The gap, shape ``(...)``, in float64 and in the units of ``G``.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers import min_norm_gap
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> min_norm_gap(G, torch.tensor([0.5, 0.5])).item()
        0.0
        >>> min_norm_gap(G, torch.tensor([1.0, 0.0])).item()
        1.0
    """
    g = G.to(torch.float64)
    g = 0.5 * (g + g.mT)
    ww = w.to(device=G.device, dtype=torch.float64)
    gw = (g @ ww.unsqueeze(-1)).squeeze(-1)
    return (ww * gw).sum(-1) - gw.amin(-1)


def _gap(g: Tensor, w: Tensor) -> Tensor:
    gw = (g @ w.unsqueeze(-1)).squeeze(-1)
    return (w * gw).sum(-1) - gw.amin(-1)


def _solve_two(g: Tensor) -> Tensor:
    """Closed form for K = 2: w_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1).

    Reads the symmetric part of ``g`` itself (``G12 = (g12 + g21) / 2``) and needs no scaling;
    identical gradients (``|g1 - g2|^2 = 0``, including ``G = 0``) get ``(1/2, 1/2)``.
    """
    a, b, c, d = g.reshape(-1, 4).unbind(-1)
    off = 0.5 * (b + c)
    num = d - off
    den = a - off + num  # = G11 + G22 - 2 G12 = |g1 - g2|^2
    w1 = torch.where(den > 0, num / den, 0.5).clamp(0.0, 1.0)
    return torch.stack([w1, 1 - w1], dim=-1)


_SUBSETS: dict[tuple[int, torch.device], Tensor] = {}


def _subsets(k: int, device: torch.device) -> Tensor:
    """All non-empty subsets of range(k) as a (2^k - 1, k) boolean mask (cached in eager mode)."""
    key = (k, device)
    masks = None if _is_compiling() else _SUBSETS.get(key)
    if masks is None:
        codes = torch.arange(1, 1 << k, device=device)
        masks = ((codes.unsqueeze(-1) >> torch.arange(k, device=device)) & 1).bool()
        if not _is_compiling():
            _SUBSETS[key] = masks
    return masks


def _solve_enum(q: Tensor, b: Tensor) -> Tensor:
    """Exact solve of the scaled NNQP (`_jacobi`) by enumerating supports: every KKT point is
    one of these candidates; returns ``x``.

    For each subset S, solve the equality-constrained problem on S, ``q_SS x_S = b_S``, clip it
    to ``x ≥ 0`` and keep the candidate with the smallest KKT residual. An optimal support that
    is linearly independent always exists (Carathéodory), its system is non-singular and its
    candidate has residual zero; candidates of singular or infeasible subsets violate the KKT
    conditions after the clip, so they can only lose.
    """
    bsz, k, _ = q.shape
    masks = _subsets(k, q.device)
    n = masks.shape[0]
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    q_ridge = q + _RIDGE * eye
    mm = masks.unsqueeze(-1) & masks.unsqueeze(-2)  # (n, k, k)
    out = []
    step = max(1, _ENUM_CHUNK // n)
    for start in range(0, bsz, step):
        qc, bc = q_ridge[start : start + step], b[start : start + step]
        m = torch.where(mm, qc.unsqueeze(1), eye)  # (b, n, k, k)
        rhs = (masks.to(q.dtype) * bc.unsqueeze(1)).unsqueeze(-1)  # (b, n, k, 1)
        x = torch.linalg.solve_ex(m, rhs)[0].squeeze(-1)
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
        res = _scaled_residual(q[start : start + step].unsqueeze(1), bc.unsqueeze(1), x)
        best = torch.nan_to_num(res, nan=torch.inf).argmin(-1)
        out.append(x.gather(1, best.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1))
    return torch.cat(out) if out else q.new_zeros(0, k)


def _solve_two_scalar(G: Tensor, check: bool, return_gap: bool) -> Tensor | tuple[Tensor, Tensor]:
    (a, b), (c, d) = G.tolist()
    if check and not all(math.isfinite(x) for x in (a, b, c, d)):
        raise NonFiniteError(_NONFINITE)
    off = 0.5 * (b + c)
    num = d - off
    den = a - off + num
    w1 = min(max(num / den, 0.0), 1.0) if den > 0 else 0.5
    w = torch.tensor([w1, 1.0 - w1], dtype=G.dtype)
    if not return_gap:
        return w
    w2 = 1.0 - w1
    g1, g2 = a * w1 + off * w2, off * w1 + d * w2
    gap = w1 * g1 + w2 * g2 - min(g1, g2)
    return w, torch.tensor(gap, dtype=torch.float64)


def _min_norm_small(
    G: Tensor, tol: float, return_gap: bool
) -> Tensor | tuple[Tensor, Tensor] | None:
    """One small Gramian on CPU by `solve_small` on the Jacobi-scaled problem (`_jacobi`),
    accepted only with a verified KKT residual of at most ``tol / 8``; ``None`` sends the
    caller to the batched solver."""
    k = G.shape[-1]
    g = G.to(torch.float64).numpy()
    g = 0.5 * (g + g.T)
    scale = float(np.diagonal(g).max())
    if not scale > 0:
        return None  # a zero Gramian: the batched path returns the uniform weights
    norms = np.sqrt(np.maximum(np.diagonal(g), 0.0))
    d = np.maximum(norms, norms.max() * _NORM_FLOOR)
    b = d.min() / d
    q = g / d[:, None] / d[None, :] + np.outer(b, b)
    x = solve_small(q, b, _RIDGE, 3 * k + 20)
    if x is None:
        return None
    y = q @ x - b
    res = float(np.max(np.where(x > 0, np.abs(y), np.maximum(-y, 0.0))) / (1 + x.max()))
    if not res <= tol / 8:
        return None
    u = b * x
    w = u / u.sum()
    out = torch.from_numpy(w).to(G.dtype)
    if return_gap:
        gw = g @ w
        gap = max(float(w @ gw - gw.min()), 0.0)
        return out, torch.tensor(gap, dtype=torch.float64)
    return out


@overload
def min_norm(
    G: Tensor,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    return_gap: Literal[False] = ...,
    early_exit: bool | None = ...,
    check_finite: bool | None = ...,
) -> Tensor: ...


@overload
def min_norm(
    G: Tensor,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    return_gap: Literal[True],
    early_exit: bool | None = ...,
    check_finite: bool | None = ...,
) -> tuple[Tensor, Tensor]: ...


@cpu_single_thread
def min_norm(
    G: Tensor,
    *,
    tol: float = 1e-12,
    max_iter: int | None = None,
    return_gap: bool = False,
    early_exit: bool | None = None,
    check_finite: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Minimum-norm point of the convex hull of the task gradients, from their Gramian.

    Solves, for every Gramian of the batch (Sener & Koltun, NeurIPS 2018, eq. (3)),

    $$
    w^\star = \arg\min_{w \ge 0,\ \mathbf 1^\top w = 1} w^\top G w ,
    $$

    so that $\sum_i w^\star_i g_i$ is the minimum-norm element of the convex hull of the
    gradients $g_i$ (rows of $J$, $G = JJ^\top$).

    Method (see the solvers page of the docs for the guarantees): ``G`` is symmetrised and
    divided by its largest diagonal entry (so the result does not depend on the scale of
    ``G`` and ``tol`` is relative). For ``K >= 3`` the problem is then solved in Jacobi-scaled
    variables (`_jacobi`: ``D^{-1} G D^{-1}`` with ``D = diag(sqrt(G_ii))``, an exact
    reformulation), so gradients whose norms differ by many orders of magnitude (``1e8 : 1 :
    1e-8``) keep their own relative precision and the weights land on the true minimiser,
    whose objective is then at most ``min_i G_ii``. Then

    - ``K = 1``: ``w = [1]``; ``K = 2``: the closed form
      $w_1 = \operatorname{clip}\big((G_{22}-G_{12})/(G_{11}+G_{22}-2G_{12}), 0, 1\big)$
      (the published code clips to [0.001, 0.999]; we do not);
    - ``3 <= K <= 8``: every support is solved at once (``2^K - 1`` tiny linear systems in one
      batched call) and the candidate with the smallest KKT residual is kept;
    - ``K >= 9``: the problem is rewritten as the non-negative least-squares problem
      $\min_{u \ge 0} \tfrac12 u^\top (G + \mathbf 1\mathbf 1^\top) u - \mathbf 1^\top u$,
      whose solution is $u^\star = w^\star / (1 + w^{\star\top} G w^\star)$ (here in its
      Jacobi-scaled form), and solved by block principal pivoting with a primal active-set
      (Wolfe / Lawson-Hanson) finish, which stops on the KKT residual.

    A single Gramian with ``3 <= K <= 24`` on CPU (the usual training step) is first solved by
    Lawson-Hanson's active-set method on NumPy arrays (`gradbalance.solvers._small`), which
    skips the tensor dispatch the batched code pays per operation; its answer is returned only
    if its KKT residual is at most ``tol / 8``, otherwise the batched path above solves it.

    Differences from the paper's solver: no Frank-Wolfe iterations (the active-set method
    terminates at the exact optimum instead of approaching it at a sublinear rate), no pairwise
    initialisation, no clipping; a zero Gramian gives uniform weights.

    Args:
        G: Gramians, shape ``(..., K, K)``, symmetric positive semi-definite (only the
            symmetric part is read; positivity is not checked). Any floating dtype and device.
        tol: stopping tolerance: on the KKT residual of the Jacobi-scaled problem for
            ``K >= 3``, which keeps the duality gap below about ``tol * max(diag(G))`` (default
            ``1e-12``; values below ~1e-14 are under the rounding floor and only make the
            solver use its whole budget). For inputs in a lower precision than float64 it is
            raised to the machine epsilon of the input dtype (``1.2e-7`` for float32), the
            precision to which such a Gramian is known.
        max_iter: iteration budget of the active-set finish for ``K >= 9`` (default
            ``2K + 20``; the pivoting stages before it use at most 20 solves).
        return_gap: also return the duality gap `min_norm_gap` of the result.
        early_exit: stop iterating once every problem of the batch has converged. Reading
            that boolean is free on CPU, so it is the default there (eager mode); on CUDA and
            under ``torch.compile`` the default runs the whole budget with converged problems
            frozen, with no host synchronisation. ``True`` on CUDA syncs once per iteration.
        check_finite: raise `gradbalance.errors.NonFiniteError` if ``G`` has NaN or
            infinite entries. Default: on CPU in eager mode only; elsewhere non-finite input
            yields NaN weights (no synchronisation is spent on the check).

    Returns:
        Weights of shape ``(..., K)`` on the simplex, in the dtype and on the device of ``G``
        (computed in float64 whatever the input dtype). With ``return_gap=True``, the pair
        ``(weights, gap)`` where ``gap`` (float64, shape ``(...)``, units of ``G``) is
        $w^\top G w - \min_i (Gw)_i \ge f(w) - f^\star$, at most ``tol * max(diag G)``
        for a converged problem (up to rounding).

    Raises:
        ValueError: if ``G`` is not of shape ``(..., K, K)`` with ``K >= 1`` or ``tol < 0``.
        TypeError: if ``G`` is not a floating-point tensor.
        NonFiniteError: on NaN or infinite entries, when ``check_finite`` applies.

    Warns:
        RuntimeWarning: if a problem did not converge within ``max_iter`` (only checked when
            ``early_exit`` applies).

    Examples:
        >>> import torch
        >>> from gradbalance.solvers import min_norm
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 4.0]])
        >>> min_norm(G)
        tensor([0.7500, 0.2500])
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> w, gap = min_norm(J @ J.T, return_gap=True)
        >>> w, gap.item() < 1e-12
        (tensor([0.5000, 0.5000, 0.0000]), True)
        >>> min_norm(torch.zeros(2, 3, 3)).shape  # a batch of problems
        torch.Size([2, 3])
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"min_norm expects a tensor, got {type(G).__name__}")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2] or G.shape[-1] == 0:
        raise ValueError(
            f"min_norm expects Gramians of shape (..., K, K) with K >= 1, got {tuple(G.shape)}"
        )
    if not G.is_floating_point():
        raise TypeError(f"min_norm expects a floating-point Gramian, got {G.dtype}")
    if not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol}")
    k = G.shape[-1]
    iters = _default_max_iter(k) if max_iter is None else int(max_iter)
    if iters < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter}")
    early, check = _resolve_flags(G.device, early_exit, check_finite)
    G = G.detach()
    if k == 2 and G.dim() == 2 and G.device.type == "cpu" and not _is_compiling():
        # one two-task problem on CPU: the same closed form on Python floats (no tensor op
        # dispatch, no device involved); this is the most common MTL case
        return _solve_two_scalar(G, check, return_gap)
    if check and not bool(torch.isfinite(G).all()):
        raise NonFiniteError(_NONFINITE)
    # a Gramian stored in lower precision is only known to its machine epsilon (and is often
    # slightly indefinite after rounding): asking for more than that only burns iterations
    tol = max(tol, torch.finfo(G.dtype).eps) if G.dtype != torch.float64 else tol
    if 3 <= k <= SMALL_MAX_K and G.dim() == 2 and G.device.type == "cpu" and not _is_compiling():
        fast = _min_norm_small(G, tol, return_gap)
        if fast is not None:
            return fast
    batch = G.shape[:-2]
    g = G.reshape(-1, k, k).to(torch.float64)
    scale = None
    if k == 1:
        w = torch.ones_like(g[:, 0])
    elif k == 2:
        w = _solve_two(g)  # scale-free closed form
    else:
        g = 0.5 * (g + g.mT)
        scale = g.diagonal(dim1=-2, dim2=-1).amax(-1)
        positive = scale > 0
        g = g / torch.where(positive, scale, torch.ones_like(scale)).view(-1, 1, 1)
        q, b = _jacobi(g)
        if k <= _ENUM_MAX_K:
            w = _weights_from(_solve_enum(q, b), b)
        else:
            x, done, res = _solve_nnqp(q, b, tol / 8, iters, early)
            w = _weights_from(x, b)
            if early and not bool(done.all()):
                bad = res > tol  # the engine aims at tol / 8; warn only well beyond it
                if bool(bad.any()):
                    warnings.warn(
                        f"min_norm: {int(bad.sum())} of {res.numel()} problems did not reach "
                        f"tol={tol:g} within max_iter={iters}; returning the best feasible "
                        f"weights (largest scaled KKT residual {float(res.max()):.3g}). "
                        "Increase max_iter.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        # an all-zero Gramian (every gradient zero): every w is optimal, return the uniform one
        w = torch.where(positive.unsqueeze(-1), w, 1.0 / k)
    out = w.to(device=G.device, dtype=G.dtype).reshape(*batch, k)
    if return_gap:
        gap = _gap(0.5 * (g + g.mT), w)  # on the symmetric part, in relative units for K >= 3
        gap = gap if scale is None else gap * scale.clamp_min(0)
        return out, gap.reshape(batch)
    return out
