r"""Exact, batched, sync-free non-negative quadratic programs: the public `nonneg_qp`.

$$
\min_{u \ge 0}\ \tfrac12 u^\top Q u - b^\top u, \qquad Q \succeq 0 ,
$$

checked, scaled and handed to the engine of `gradbalance.solvers.pivoting` (block principal
pivoting with a primal active-set finish), which documents the algorithm.
"""

from __future__ import annotations

import warnings
from typing import Literal, overload

import torch
from torch import Tensor

from gradbalance.errors import NonFiniteError
from gradbalance.solvers._threads import cpu_single_thread
from gradbalance.solvers.pivoting import default_max_iter, resolve_flags, solve_nnqp

__all__ = ["nonneg_qp"]


@overload
def nonneg_qp(
    Q: Tensor,
    b: Tensor,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    return_residual: Literal[False] = ...,
    early_exit: bool | None = ...,
    check_finite: bool | None = ...,
) -> Tensor: ...


@overload
def nonneg_qp(
    Q: Tensor,
    b: Tensor,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    return_residual: Literal[True],
    early_exit: bool | None = ...,
    check_finite: bool | None = ...,
) -> tuple[Tensor, Tensor]: ...


@cpu_single_thread
def nonneg_qp(
    Q: Tensor,
    b: Tensor,
    *,
    tol: float = 1e-12,
    max_iter: int | None = None,
    return_residual: bool = False,
    early_exit: bool | None = None,
    check_finite: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Solve a batch of non-negative quadratic programs exactly.

    $$
    u^\star = \arg\min_{u \ge 0}\ \tfrac12 u^\top Q u - b^\top u
    $$

    with ``Q`` symmetric positive semi-definite (only its symmetric part is used) and the
    problem bounded below (e.g. ``b`` in the range of ``Q``; a strictly convex ``Q`` always
    is). This is the building block of projections onto dual cones (UPGrad-style
    $\min_{u \ge e_i} u^\top G u$ becomes ``nonneg_qp(G, -G[i])`` after the shift
    $u = e_i + z$) and, with ``Q = G + 11ᵀ`` and ``b = 1``, of `min_norm`.

    Algorithm (details in `gradbalance.solvers.pivoting` and on the solvers page of the
    docs): block principal pivoting on the exact system, a rescue pivoting on a regularised one
    where the first does not converge, then a Lawson-Hanson primal active-set finish, all
    batched and masked. The problem is scaled first (``Q / max(diag Q)``, ``b / max|b|``), so
    ``tol`` is relative, and solved in float64.

    Args:
        Q: ``(..., K, K)`` positive semi-definite matrices.
        b: ``(..., K)`` linear terms; batch dimensions broadcast with those of ``Q``.
        tol: relative tolerance on the KKT residual
            ``r = max(|y_i| for u_i > 0, -y_i for u_i = 0)``, ``y = Qu - b``: a problem has
            converged when ``r <= tol * (max|b| + max(diag Q) * max(u))``.
        max_iter: iteration budget of the active-set finish (default ``2K + 20``).
        return_residual: also return the KKT residual, in the units of ``b``.
        early_exit: stop iterating when every problem of the batch has converged. This reads
            a boolean from the tensors, so it is the default only on CPU in eager mode (where
            it is not a device synchronisation); on CUDA and under ``torch.compile`` the full,
            fixed budget runs with converged problems frozen. ``True`` forces the check (one
            host synchronisation per iteration on CUDA).
        check_finite: raise `gradbalance.errors.NonFiniteError` on NaN/inf input.
            Default: on CPU in eager mode only (on CUDA non-finite input gives NaN output).

    Returns:
        ``u`` of shape ``(..., K)`` in the dtype and on the device of ``Q``; with
        ``return_residual=True`` the pair ``(u, residual)``, with the residual ``r`` (float64,
        shape ``(...)``, units of ``b``) defined under ``tol``.

    Raises:
        ValueError: on shapes that do not fit or a negative ``tol``.
        TypeError: on non floating-point input.
        NonFiniteError: on NaN or infinite input when ``check_finite`` applies.

    Warns:
        RuntimeWarning: when a problem did not converge within ``max_iter`` (checked only when
            ``early_exit`` applies, so never on the sync-free path).

    Examples:
        >>> import torch
        >>> from gradbalance.solvers import nonneg_qp
        >>> Q = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> nonneg_qp(Q, torch.tensor([1.0, -1.0], dtype=torch.float64))
        tensor([0.5000, 0.0000], dtype=torch.float64)
    """
    for name, t in (("Q", Q), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"nonneg_qp expects tensors, got {name} of type {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"nonneg_qp expects floating-point tensors, got {name}.dtype={t.dtype}")
    if Q.dim() < 2 or Q.shape[-1] != Q.shape[-2] or Q.shape[-1] == 0:
        raise ValueError(f"Q must have shape (..., K, K) with K >= 1, got {tuple(Q.shape)}")
    k = Q.shape[-1]
    if b.dim() < 1 or b.shape[-1] != k:
        raise ValueError(f"b must have shape (..., {k}) to match Q, got {tuple(b.shape)}")
    if not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol}")
    iters = default_max_iter(k) if max_iter is None else int(max_iter)
    if iters < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter}")
    early, check = resolve_flags(Q.device, early_exit, check_finite)
    if check and not bool(torch.isfinite(Q).all() & torch.isfinite(b).all()):
        raise NonFiniteError(
            "nonneg_qp received NaN or infinite entries in Q or b; check the losses and "
            "gradients that produced them"
        )
    batch = torch.broadcast_shapes(Q.shape[:-2], b.shape[:-1])
    q = Q.to(torch.float64).expand(*batch, k, k).reshape(-1, k, k)
    bb = b.to(device=Q.device, dtype=torch.float64).expand(*batch, k).reshape(-1, k)
    q = 0.5 * (q + q.mT)
    sq = q.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    sb = bb.abs().amax(-1, keepdim=True)
    sb_safe = torch.where(sb > 0, sb, torch.ones_like(sb))
    u, done, res = solve_nnqp(q / sq.unsqueeze(-1), bb / sb_safe, tol, iters, early)
    if early and not bool(done.all()):
        warnings.warn(
            f"nonneg_qp: {int((~done).sum())} of {done.numel()} problems did not reach "
            f"tol={tol:g} within max_iter={iters} (largest scaled KKT residual "
            f"{float(res.max()):.3g}); returning the best feasible iterate. Increase max_iter.",
            RuntimeWarning,
            stacklevel=2,
        )
    res = res * (1 + u.amax(-1)) * sb.squeeze(-1)  # back to the units of b
    u = u * (sb_safe / sq) * (sb > 0)
    out = u.to(Q.dtype).reshape(*batch, k)
    if return_residual:
        return out, res.reshape(batch)
    return out
