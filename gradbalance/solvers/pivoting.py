r"""The exact, batched, sync-free engine for non-negative quadratic programs.

This module holds the engine behind `gradbalance.solvers.min_norm` (for K >= 9) and
`gradbalance.solvers.nonneg_qp`: block principal pivoting with a primal active-set finish. It
solves, for a batch of problems,

$$
\min_{u \ge 0}\ \tfrac12 u^\top Q u - b^\top u, \qquad Q \succeq 0 .
$$

Its optimality (KKT) conditions are a linear complementarity problem: with $y = Qu - b$,
$u \ge 0$, $y \ge 0$, $u_i y_i = 0$. The engine has three stages, every one of
them a fixed sequence of batched tensor operations with per-problem masks (a solved problem stops
changing), so the same code runs on CPU, on CUDA and under ``torch.compile``:

1. **Block principal pivoting** (Júdice & Pires, *Comput. Oper. Res.* 1994; Kim & Park, *SIAM J.
   Sci. Comput.* 2011) on $Q + \varepsilon I$ with a tiny ridge $\varepsilon$:
   guess the passive set $F$ (the support), solve $Q_{FF} u_F = b_F$ exactly, and
   exchange *every* index that violates the KKT conditions at once; when the number of violators
   stops decreasing for three iterations, exchange only the last one (Murty's rule, which is
   finite for P-matrices). From $F = \{1..K\}$ this typically ends in 2 to 5 solves.
2. A **rescue** run of the same pivoting on the well-conditioned $Q + 10^{-3} I$ for the
   problems stage 1 did not solve (degenerate or rank-deficient ones, where pivoting on a nearly
   singular matrix can cycle): it yields a support guess and a feasible starting point.
3. A **primal active-set** finish (Lawson & Hanson, *Solving Least Squares Problems*, 1974,
   ch. 23, in Gram form; it is Wolfe's 1976 nearest-point algorithm when used for
   `min_norm`): solve on the current support, move to that solution or to the first
   constraint that blocks the way (dropping it), and when the solution is reached free the most
   violated constraint. The objective never increases, supports stay linearly independent, and
   the loop stops on the KKT residual.

A problem leaves the engine as soon as its KKT residual, relative to ``1 + max(u)`` (the scale
of the rounding errors), is at most ``tol``; the residual is reported, so exactness is verified
rather than assumed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.solvers._threads import is_compiling

__all__ = ["RIDGE", "default_max_iter", "resolve_flags", "solve_nnqp"]

#: Tikhonov term of the exact stages, relative to ``max(diag(Q)) = 1``. Its effect on the KKT
#: residual is at most ``RIDGE * max(u)``, far below any tolerance we accept.
RIDGE = 1e-14
#: Regularisation of the rescue stage (well conditioned, so pivoting converges quickly).
_RESCUE_RIDGE = 1e-3
#: Iterations of each pivoting stage.
_BPP_ITERS = 10
#: Júdice and Pires' number of full exchanges allowed without progress (their p-bar).
_BPP_BACKUP = 3


def resolve_flags(
    device: torch.device, early_exit: bool | None, check_finite: bool | None
) -> tuple[bool, bool]:
    """Default: early exit and finiteness checks on CPU in eager mode only (no device sync)."""
    auto = device.type == "cpu" and not is_compiling()
    return (auto if early_exit is None else bool(early_exit)), (
        auto if check_finite is None else bool(check_finite)
    )


def _eye(k: int, ref: Tensor) -> Tensor:
    return torch.eye(k, dtype=ref.dtype, device=ref.device)


def _masked_solve(q: Tensor, mask: Tensor, b: Tensor, eye: Tensor) -> Tensor:
    """Solve ``q[F, F] x[F] = b[F]`` with ``x = 0`` off ``F``, for every problem of the batch.

    The rows and columns outside the mask are replaced by those of the identity (right-hand
    side zero), so all problems share one batched LU solve and need no gather or Python loop.
    """
    m = torch.where(mask.unsqueeze(-1) & mask.unsqueeze(-2), q, eye)
    x = torch.linalg.solve_ex(m, (b * mask).unsqueeze(-1))[0].squeeze(-1)
    # an exactly singular system (never reached in exact arithmetic thanks to the ridge) must
    # not poison the iteration with NaN: treat it as "no solution", which the callers handle
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _matvec(q: Tensor, u: Tensor) -> Tensor:
    return (q @ u.unsqueeze(-1)).squeeze(-1)


def _kkt_residual(u: Tensor, y: Tensor) -> Tensor:
    """``max(|y_i| on the support, max(-y_i, 0) off it)``: zero exactly at the optimum.

    Relative to ``1 + max(u)`` (with ``max diag Q = max|b| = 1`` after scaling), the size of the
    rounding errors in ``y = Qu - b``.
    """
    res = torch.where(u > 0, y.abs(), (-y).clamp_min(0)).amax(-1)
    return res / (1 + u.amax(-1))


def _bpp(q: Tensor, b: Tensor, tol: float, iters: int, early_exit: bool) -> Tensor:
    """Block principal pivoting from the full passive set; returns the last iterate (clamped)."""
    bsz, k = b.shape
    eye = _eye(k, q)
    idx = torch.arange(k, device=q.device)
    passive = torch.ones(bsz, k, dtype=torch.bool, device=q.device)
    ninf = torch.full((bsz,), k + 1, dtype=torch.long, device=q.device)
    backup = torch.full((bsz,), _BPP_BACKUP, dtype=torch.long, device=q.device)
    u = torch.zeros_like(b)
    for _ in range(iters):
        u = _masked_solve(q, passive, b, eye)
        y = _matvec(q, u) - b
        viol = torch.where(passive, u < -tol, y < -tol)
        nviol = viol.sum(-1)
        if early_exit and not bool(nviol.any()):
            break
        improved = nviol < ninf
        full = improved | (backup > 0)
        backup = torch.where(improved, torch.full_like(backup, _BPP_BACKUP), backup - full.long())
        ninf = torch.minimum(ninf, nviol)
        last = torch.where(viol, idx, -1).amax(-1, keepdim=True)
        passive = passive ^ torch.where(full.unsqueeze(-1), viol, idx == last)
    return torch.where(u > 0, u, 0.0)  # also maps -0.0 to +0.0


def _primal_active_set(
    q: Tensor,
    q_ridge: Tensor,
    b: Tensor,
    u: Tensor,
    done: Tensor,
    tol: float,
    iters: int,
    early_exit: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lawson-Hanson / Wolfe primal active set from a feasible ``u``; frozen where ``done``."""
    k = b.shape[-1]
    eye = _eye(k, q)
    idx = torch.arange(k, device=q.device)
    support = u > 0
    y = _matvec(q, u) - b
    res = _kkt_residual(u, y)
    for _ in range(iters):
        if early_exit and bool(done.all()):
            break
        z = _masked_solve(q_ridge, support, b, eye)
        neg = support & (z <= 0)
        reached = ~neg.any(-1, keepdim=True)
        # largest step from u towards z that keeps u >= 0 (1 when z itself is feasible)
        ratio = torch.where(neg, u / (u - z).clamp_min(torch.finfo(u.dtype).tiny), torch.inf)
        alpha = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        blocked = neg & (ratio <= alpha)
        u_new = torch.where(blocked | ~support, 0.0, u + alpha * (z - u))
        s_new = support & ~blocked
        y_new = _matvec(q, u_new) - b
        ymin, j = y_new.min(-1, keepdim=True)
        # free the most violated constraint once the support's own optimum has been reached
        s_new = s_new | ((idx == j) & reached & (ymin < -tol))
        res_new = _kkt_residual(u_new, y_new)
        keep = done.unsqueeze(-1)
        u = torch.where(keep, u, u_new)
        support = torch.where(keep, support, s_new)
        res = torch.where(done, res, res_new)
        done = done | (res_new <= tol)
    return u, done, res


def solve_nnqp(
    q: Tensor, b: Tensor, tol: float, max_iter: int, early_exit: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The engine on a normalised float problem ``q`` (B, K, K), ``b`` (B, K).

    Returns ``(u, converged, kkt_residual)``.
    """
    k = b.shape[-1]
    eye = _eye(k, q)
    q_ridge = q + RIDGE * eye
    u = _bpp(q_ridge, b, tol, _BPP_ITERS, early_exit)
    res = _kkt_residual(u, _matvec(q, u) - b)
    done = res <= tol
    if not early_exit or not bool(done.all()):
        u_rescue = _bpp(q + _RESCUE_RIDGE * eye, b, tol, _BPP_ITERS, early_exit)
        u = torch.where(done.unsqueeze(-1), u, u_rescue)
        u, done, res = _primal_active_set(q, q_ridge, b, u, done, tol, max_iter, early_exit)
    return u, done, res


def default_max_iter(k: int) -> int:
    """The default iteration budget of the active-set finish for ``K`` unknowns."""
    return 2 * k + 20
