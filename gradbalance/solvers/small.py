"""One min-norm problem on the CPU, solved on NumPy arrays.

`gradbalance.solvers.min_norm` solves batches with tensor code built for throughput: every
step is a batched tensor operation, which costs a few microseconds of dispatch even on an 8 × 8
problem, so a single Gramian of a handful of tasks (the common case in a training step) spends
most of its time in dispatch. This module solves that case with Lawson and Hanson's active-set
method on NumPy arrays (about a microsecond per operation). It is only a fast path:
`min_norm_small` verifies the KKT residual of its answer and returns ``None`` (the caller then
uses the batched solver) when it does not meet the tolerance or when a linear system is
singular, so the guarantees do not change. Beyond ``SMALL_MAX_K`` tasks (up to
``NUMPY_MAX_K``) the same Jacobi-scaled problem goes to `gradbalance.solvers.numpy_nnqp`
(pivoting, then an active set with a growing Cholesky factor), verified the same way, with
NumPy's BLAS held to one thread where ``threadpoolctl`` is importable (on a busy machine a
second BLAS thread made K = 128 solves several times slower).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from scipy.linalg.lapack import dgesv as _dgesv
from torch import Tensor

from gradbalance.solvers.jacobi import NORM_FLOOR
from gradbalance.solvers.numpy_nnqp import solve_numpy_nnqp
from gradbalance.solvers.pivoting import RIDGE

__all__ = ["NUMPY_MAX_K", "SMALL_MAX_K", "min_norm_small", "solve_small"]

#: Largest number of tasks solved by Lawson-Hanson with a full solve per step (`solve_small`).
SMALL_MAX_K = 24
#: Largest number of tasks the NumPy path takes (`gradbalance.solvers.numpy_nnqp` beyond
#: ``SMALL_MAX_K``); the batched solver takes larger ones.
NUMPY_MAX_K = 256

_BLAS: list = []  # the threadpoolctl controller, created at first use (None without it)


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """A context holding NumPy's BLAS to one thread (a no-op without threadpoolctl)."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

            _BLAS.append(ThreadpoolController())
        except Exception:  # optional: not a dependency of the package
            _BLAS.append(None)
    return (
        contextlib.nullcontext() if _BLAS[0] is None else _BLAS[0].limit(limits=1, user_api="blas")
    )


def _solve_on(q: np.ndarray, idx: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """The solution of ``q[idx, idx] z = b[idx]``, or ``None`` when that system is singular."""
    # LAPACK's gesv directly: numpy's and scipy's wrappers cost 5-20x the solve here
    _, _, z, info = _dgesv(q[idx][:, idx], b[idx])
    return z if info == 0 and np.all(np.isfinite(z)) else None


def _warm_start(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A feasible start for the active set: the solution on the full support when it is
    positive (tasks that all pull apart, the usual optimum), else the solution on the support of
    its positive part when that one is positive, else zero. Each is the optimum of the problem
    restricted to its support, as the method requires of its iterates."""
    k = q.shape[0]
    u = np.zeros(k)
    _, _, z, info = _dgesv(q, b)  # the full support: no gather
    if info != 0 or not np.all(np.isfinite(z)):
        return u
    if np.all(z > 0):
        return z
    idx = np.flatnonzero(z > 0)
    z_p = _solve_on(q, idx, b) if idx.size else None
    if z_p is not None and np.all(z_p > 0):
        u[idx] = z_p
    return u


def solve_small(q: np.ndarray, b: np.ndarray, ridge: float, max_iter: int) -> np.ndarray | None:
    r"""The solution ``u ≥ 0`` of $\min_{u \ge 0} \tfrac12 u^\top (q + \text{ridge}\, I) u -
    b^\top u$ for one symmetric ``q`` (float64, ``K ≥ 3``, diagonal of order 1) and ``b > 0``,
    or ``None`` when the method stalls.

    `min_norm_small` passes the Jacobi-scaled problem $q = \hat G + b b^\top$,
    $b_i = d_{\min} / d_i$ (`gradbalance.solvers.jacobi`). Lawson-Hanson's active-set
    method (each passive set's equality-constrained solution, stepping back to feasibility when
    a component turns non-positive), warm-started by `_warm_start`.
    """
    # a degenerate step (0 / 0) gives NaN, which ends in a fallback: no warning for it
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _active_set(q, b, ridge, max_iter)


def _active_set(q0: np.ndarray, b: np.ndarray, ridge: float, max_iter: int) -> np.ndarray | None:
    k = q0.shape[0]
    q = q0 + ridge * np.eye(k)
    u = _warm_start(q, b)
    passive = u > 0
    grad = q @ u - b
    for _ in range(max_iter):
        # the most negative gradient entry off the passive set enters it
        candidates = np.where(passive, np.inf, grad)
        j = int(np.argmin(candidates))
        if not candidates[j] < -1e-15:
            break
        passive[j] = True
        while True:
            idx = np.flatnonzero(passive)
            z_p = _solve_on(q, idx, b)
            if z_p is None:
                return None
            if np.all(z_p > 0):
                u = np.zeros(k)
                u[idx] = z_p
                break
            # step from u towards z until the first passive component reaches zero
            u_p = u[idx]
            shrink = z_p <= 0
            alpha = np.min(u_p[shrink] / (u_p[shrink] - z_p[shrink]))
            u_p = u_p + alpha * (z_p - u_p)
            u = np.zeros(k)
            u[idx] = u_p
            passive &= u > 0
            if not passive.any():
                return None
        grad = q @ u - b
    else:
        return None
    if not u.sum() > 0:
        return None
    return u


def min_norm_small(
    G: Tensor, tol: float, return_gap: bool, large: bool = False
) -> Tensor | tuple[Tensor, Tensor] | None:
    """The min-norm weights of one ``(K, K)`` Gramian on CPU (``3 <= K <= NUMPY_MAX_K``), or
    ``None`` to send the caller to the batched solver.

    `solve_small` (``large=False``, for ``K <= SMALL_MAX_K``) or
    `gradbalance.solvers.numpy_nnqp` (``large=True``) on the Jacobi-scaled problem
    (`gradbalance.solvers.jacobi`, here on NumPy arrays), accepted only with a verified KKT
    residual of at most ``tol / 8``. With ``return_gap``, also the duality gap (float64, units
    of ``G``).
    """
    k = G.shape[-1]
    g = (G if G.dtype == torch.float64 else G.to(torch.float64)).numpy()
    if not np.isfinite(g).all():
        return None  # the caller reports it (or returns NaN weights)
    g = 0.5 * (g + g.T)
    diag = g.diagonal()
    scale = float(diag.max())
    if not scale > 0:
        return None  # a zero Gramian: the batched path returns the uniform weights
    norms = np.sqrt(np.maximum(diag, 0.0))
    d = np.maximum(norms, norms.max() * NORM_FLOOR)
    b = d.min() / d
    q = g / d[:, None] / d + b[:, None] * b  # in this order: no overflow (|g_ij| <= d_i d_j)
    if large:
        with _one_blas_thread():
            x = solve_numpy_nnqp(q + RIDGE * np.eye(k), b, 3 * k + 20)
    else:
        x = solve_small(q, b, RIDGE, 3 * k + 20)
    if x is None:
        return None
    y = q @ x - b
    res = float(np.max(np.where(x > 0, np.abs(y), np.maximum(-y, 0.0))) / (1 + x.max()))
    if not res <= tol / 8:
        return None
    u = b * x
    w = u / u.sum()
    out = torch.from_numpy(w)
    out = out if G.dtype == torch.float64 else out.to(G.dtype)
    if return_gap:
        gw = g @ w
        gap = max(float(w @ gw - gw.min()), 0.0)
        return out, torch.tensor(gap, dtype=torch.float64)
    return out
