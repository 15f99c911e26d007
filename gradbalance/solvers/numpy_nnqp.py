r"""One NNQP on the CPU in NumPy, for tens to hundreds of unknowns: pivoting, then an active set
with a growing Cholesky factor.

$\min_{x \ge 0} \tfrac12 x^\top q x - b^\top x$ for one symmetric positive semi-definite ``q``
(the Jacobi-scaled min-norm problem of `gradbalance.solvers.jacobi`, diagonal of order 1) and
``b > 0``. The batched engine (`gradbalance.solvers.pivoting`) pays a tensor dispatch per
operation and a full ``K x K`` solve per active-set step; one problem on the CPU does better
with LAPACK on NumPy arrays:

1. if ``q`` (with the caller's ridge) has a Cholesky factor, **block principal pivoting**
   (Júdice & Pires 1994, as in the batched engine: exchange every violating index, Murty's
   single exchange after three rounds without progress), each passive set solved by
   Cholesky; it typically ends in 2 to 6 solves; it gets 12 rounds where ``q`` is numerically
   definite and 6 where it is singular to the ridge (rank-deficient Gramians, where it may
   cycle);
2. when pivoting does not finish, **Lawson-Hanson's active set**, warm-started from a support
   guess (the iterate of a pivoting run on the well-conditioned ``q + 1e-3 I``, as the batched
   engine's rescue stage, else the best iterate of stage 1) made feasible and settled by
   Wolfe's minor cycle; each passive system is solved from a Cholesky factor that is
   *extended* when an index enters (one triangular solve, ``O(s^2)``) and factorised again only
   when indices leave: a support of ``s`` indices, built one index at a time (rank-deficient
   Gramians), costs ``O(s^3)`` in all instead of ``O(s^4)``. An entering index whose new pivot
   falls below ``1e-12`` of its diagonal is numerically in the span of the passive ones (its
   gradient is rounding): it is passed over until the passive set changes.

`solve_numpy_nnqp` returns ``None`` when neither stage finishes; the caller verifies the KKT
residual of any answer and falls back to the batched engine otherwise.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dpotrf as _dpotrf
from scipy.linalg.lapack import dpotrs as _dpotrs
from scipy.linalg.lapack import dtrtrs as _dtrtrs

__all__ = ["solve_numpy_nnqp"]

#: Smallest accepted squared pivot of an entering index, relative to its diagonal entry.
_PIVOT = 1e-12
#: Smallest squared pivot of the full factor (relative to the diagonal) for which ``q`` counts
#: as numerically definite: five times the ridge the caller adds (rank-deficient and duplicated
#: Gramians sit at the ridge; near-anti-collinear ones, at ``1e-13`` to ``1e-12``, are above).
_DEFINITE = 5e-14
#: Pivoting rounds before the active set takes over, on a definite and on a singular ``q``
#: (where pivoting may cycle; it still settles duplicated Gramians in a few rounds).
_BPP_ITERS = 12
_BPP_ITERS_SINGULAR = 6
#: The ridge of the rescue pivoting (as in the batched engine), whose answer is only a guess.
_RESCUE_RIDGE = 1e-3
#: Gradients and components beyond these rounding levels count as violations.
_THRESHOLD = 1e-15


def _factor(q: np.ndarray, idx: np.ndarray) -> np.ndarray | None:
    c, info = _dpotrf(q[np.ix_(idx, idx)], lower=1, clean=1)
    return c if info == 0 else None


def _solve(L: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    z, info = _dpotrs(L, rhs, lower=1)
    return z if info == 0 and np.all(np.isfinite(z)) else None


def _pivoting(
    q: np.ndarray, b: np.ndarray, full: np.ndarray, iters: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Block principal pivoting from the full passive set (``full``: the factor of ``q``).

    Returns ``(x, None)`` when it finishes, else ``(None, guess)`` with ``guess`` the iterate
    with the fewest violations (its positive part warm-starts the active set)."""
    k = q.shape[0]
    passive = np.ones(k, dtype=bool)
    best, backup = k + 1, 3
    guess = None
    for it in range(iters):
        idx = np.flatnonzero(passive)
        L = full if it == 0 else _factor(q, idx)
        if L is None:
            return None, guess
        x = np.zeros(k)
        if idx.size:
            z = _solve(L, b[idx])
            if z is None:
                return None, guess
            x[idx] = z
        y = q @ x - b
        viol = np.where(passive, x < -_THRESHOLD, y < -_THRESHOLD)
        n = int(viol.sum())
        if n == 0:
            return np.maximum(x, 0.0), None
        if n < best:
            guess = x
        if n < best or backup > 0:
            backup = 3 if n < best else backup - 1
            best = min(best, n)
            passive ^= viol
        else:  # Murty's rule: the last violating index only
            passive[np.flatnonzero(viol)[-1]] ^= True
    return None, guess


def _extend(L: np.ndarray, q: np.ndarray, idx: list[int], j: int) -> np.ndarray | None:
    """The factor of ``q[idx + [j]]`` from the factor ``L`` of ``q[idx]``, or ``None`` when
    ``j`` is numerically in the span of ``idx``."""
    s, qjj = len(idx), q[j, j]
    if s == 0:
        return np.full((1, 1), np.sqrt(qjj), order="F") if qjj > 0 else None
    row, info = _dtrtrs(L, q[idx, j], lower=1)
    d = qjj - float(row @ row)
    if info != 0 or not d > _PIVOT * qjj:
        return None
    out = np.zeros((s + 1, s + 1), order="F")  # LAPACK's layout: no copy in the solves
    out[:s, :s] = L
    out[s, :s] = row
    out[s, s] = np.sqrt(d)
    return out


_Settled = tuple[np.ndarray, list[int], np.ndarray]


def _settle(
    q: np.ndarray, b: np.ndarray, x: np.ndarray, idx: list[int], L: np.ndarray
) -> _Settled | None:
    """Wolfe's minor cycle from the feasible ``x`` with support ``idx`` (factor ``L``): solve on
    the support, step back to the first sign change and drop, until the solution is positive.
    Returns ``(x, idx, L)`` with ``x`` optimal on its support, or ``None``."""
    k = q.shape[0]
    while True:
        z = _solve(L, b[idx])
        if z is None:
            return None
        if np.all(z > 0):
            x = np.zeros(k)
            x[idx] = z
            return x, idx, L
        # step from x towards z until the first passive component reaches zero
        xp = x[idx]
        shrink = z <= 0
        alpha = np.min(xp[shrink] / (xp[shrink] - z[shrink]))
        xp = xp + alpha * (z - xp)
        keep = xp > 0
        if not keep.any():
            return None
        idx = [i for i, kept in zip(idx, keep) if kept]
        x = np.zeros(k)
        x[idx] = xp[keep]
        again = _factor(q, np.asarray(idx))
        if again is None:
            return None
        L = again


def _active_set(
    q: np.ndarray, b: np.ndarray, max_iter: int, guess: np.ndarray | None
) -> np.ndarray | None:
    k = q.shape[0]
    idx: list[int] = []
    x, L = np.zeros(k), np.zeros((0, 0))
    settled: _Settled | None
    if guess is not None and guess.any():  # pivoting's best iterate, made feasible
        start = [int(i) for i in np.flatnonzero(guess > 0)]
        factor = _factor(q, np.asarray(start))
        settled = None if factor is None else _settle(q, b, np.maximum(guess, 0.0), start, factor)
        if settled is not None:
            x, idx, L = settled
    grad = q @ x - b
    closed = np.zeros(k, dtype=bool)  # passive, or passed over since the last change
    closed[idx] = True
    for _ in range(max_iter):
        candidates = np.where(closed, np.inf, grad)
        j = int(np.argmin(candidates))
        if not candidates[j] < -_THRESHOLD:
            return x if x.sum() > 0 else None
        new = _extend(L, q, idx, j)
        closed[j] = True
        if new is None:
            continue  # dependent on the passive set: pass over it
        settled = _settle(q, b, x, [*idx, j], new)
        if settled is None:
            return None
        x, idx, L = settled
        closed = np.zeros(k, dtype=bool)
        closed[idx] = True
        grad = q @ x - b
    return None


def solve_numpy_nnqp(q: np.ndarray, b: np.ndarray, max_iter: int) -> np.ndarray | None:
    """The solution ``x >= 0`` (see the module), or ``None`` when no stage finishes.

    Examples:
        >>> import numpy as np
        >>> q = np.array([[2.0, 1.0], [1.0, 2.0]])
        >>> solve_numpy_nnqp(q, np.array([1.0, 1.0]), 10).round(4)
        array([0.3333, 0.3333])
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        full, info = _dpotrf(q, lower=1, clean=1)
        guess = None
        if info == 0:
            definite = np.diagonal(full).min() ** 2 > _DEFINITE * np.diagonal(q).max()
            x, guess = _pivoting(q, b, full, _BPP_ITERS if definite else _BPP_ITERS_SINGULAR)
            if x is not None:
                return x
        # a support guess from the well-conditioned q + 1e-3 I (where pivoting settles fast)
        soft = q + _RESCUE_RIDGE * np.eye(q.shape[0])
        full, info = _dpotrf(soft, lower=1, clean=1)
        if info == 0:
            x, rough = _pivoting(soft, b, full, _BPP_ITERS)
            guess = x if x is not None else rough if rough is not None else guess
        return _active_set(q, b, max_iter, guess)
