r"""Small conic programs on a Gramian: CAGrad's ball-constrained max-min and Nash bargaining.

Both kernels read only the Gramian $G = J J^\top$ of the task gradients (rows of $J$) and
return weights $w$ such that the update is $J^\top w$; they work in float64 on the CPU (the
problems are $K \times K$), return the weights in the dtype and on the device of ``G``, and
verify their own answer: a certificate (duality gap, KKT residual) is computed from ``G`` and a
`gradbalance.errors.SolverError` is raised when it is not met, never a silent fallback.

- `cagrad_weights`: Liu et al. (NeurIPS 2021), the maximiser of
  $\min_i \langle g_i, d\rangle$ over the ball $\lVert d - g_0\rVert \le c \lVert g_0\rVert$,
  solved exactly through its dual with the exact min-norm solver.
- `nash_bargaining`: Navon et al. (ICML 2022), the solution of $G\alpha = 1/\alpha$, by a
  damped Newton method on a self-concordant convex problem, or by the paper's
  concave-convex procedure with cvxpy (optional dependency).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Literal, overload

import scipy.optimize
import torch
from torch import Tensor

from gradbalance.errors import NonFiniteError, SolverError
from gradbalance.solvers._threads import cpu_single_thread
from gradbalance.solvers.min_norm import min_norm
from gradbalance.solvers.qp import nonneg_qp

__all__ = ["cagrad_weights", "nash_bargaining"]

_F64 = torch.float64
#: A min-norm value (relative to ``max diag G``) at or below this means 0 is in the hull.
_ZERO_HULL = 1e-12
#: Largest accepted duality gap of `cagrad_weights`, relative to ``max diag G``.
_CAGRAD_GAP = 1e-7
#: Newton's method stops when the squared Newton decrement is below this (rounding floor).
_NEWTON_DEC2 = 1e-24
#: Below this squared decrement, a decrement that stops shrinking means the rounding floor.
_NEWTON_FLOOR = 1e-12
#: cvxpy solvers accepted by `nash_bargaining` (ECOS is deliberately not used).
CVXPY_SOLVERS = ("CLARABEL", "SCS")


def _validate(G: Tensor, what: str) -> int:
    if not isinstance(G, Tensor):
        raise TypeError(f"{what} expects a tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(
            f"{what} expects a Gramian of shape (K, K) with K >= 1, got {tuple(G.shape)}"
        )
    if not G.is_floating_point():
        raise TypeError(f"{what} expects a floating-point Gramian, got {G.dtype}")
    if not bool(torch.isfinite(G).all()):
        raise NonFiniteError(
            f"{what} received a Gramian with NaN or infinite entries; a task loss or gradient is "
            "not finite (check the losses, or skip the step)"
        )
    return G.shape[0]


def _sym64(G: Tensor) -> Tensor:
    g = G.detach().to(device="cpu", dtype=_F64)
    return 0.5 * (g + g.T)


# ---------------------------------------------------------------------------------- CAGrad
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
        >>> from gradbalance.solvers.conic import cagrad_weights
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
        >>> cagrad_weights(G, 0.0)
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> cagrad_weights(G, 0.5)  # symmetric tasks: still the mean direction, longer
        tensor([0.7500, 0.7500], dtype=torch.float64)
    """
    k = _validate(G, "cagrad_weights")
    c = float(c)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"c must be a finite non-negative number, got {c!r}")
    g = _sym64(G)
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


# ------------------------------------------------------------------------ Nash bargaining
def _nash_residual(g: Tensor, alpha: Tensor) -> Tensor:
    """``max_i |α_i (Gα)_i − 1|``: zero exactly at the bargaining solution."""
    return (alpha * (g @ alpha) - 1.0).abs().max()


def _nash_feasible(g: Tensor, what: str) -> Tensor:
    """Raise unless some direction has a positive inner product with every gradient.

    By Gordan's theorem that holds exactly when 0 is not in the convex hull of the gradients;
    the min-norm weights returned make ``G w > 0`` componentwise.
    """
    diag = g.diagonal()
    if bool((diag <= 0).any()):
        zero = (diag <= 0).nonzero().flatten().tolist()
        raise SolverError(
            f"{what}: the gradient of task(s) {zero} is zero, so the Nash bargaining problem "
            "(α_i ⟨g_i, d⟩ = 1) has no solution; drop the task or use another method"
        )
    w = min_norm(g)
    if float(w @ g @ w) <= _ZERO_HULL:
        raise SolverError(
            f"{what}: 0 is in the convex hull of the task gradients (Pareto-stationary point: "
            "no direction decreases every loss), so the Nash bargaining problem has no "
            "solution; nothing was applied"
        )
    return w


def _nash_newton(g: Tensor, w_mn: Tensor, max_iter: int) -> Tensor:
    """Damped Newton on ``f(y) = ½‖y‖² − Σ log (R y)_i`` with ``G = R Rᵀ`` (R full column rank).

    ``y`` are the coordinates of the update ``d`` in an orthonormal basis of the span of the
    gradients; ``f`` is strictly convex and self-concordant, its minimiser satisfies
    ``y = Rᵀ α`` with ``α = 1/(R y)``, i.e. ``α_i (Gα)_i = 1``.
    """
    lam, vec = torch.linalg.eigh(g)
    keep = lam > lam.max() * g.shape[0] * torch.finfo(_F64).eps
    r = vec[:, keep] * lam[keep].sqrt()
    y = r.T @ w_mn
    y = y * (math.sqrt(g.shape[0]) / float(y.norm()))  # best multiple of the start
    eye = torch.eye(r.shape[1], dtype=_F64)
    prev = math.inf
    for _ in range(max_iter):
        ry = r @ y
        inv = 1.0 / ry
        grad = y - r.T @ inv
        hess = eye + (r * (inv * inv).unsqueeze(1)).T @ r
        step = -torch.linalg.solve(hess, grad)
        dec2 = float(-(grad @ step))
        dec = math.sqrt(max(dec2, 0.0))
        # converged, or after a full step the (tiny) decrement stopped shrinking quadratically:
        # the rounding floor is reached
        if dec2 <= _NEWTON_DEC2 or (dec2 < _NEWTON_FLOOR and dec2 > 0.25 * prev):
            break
        # damped phase of Newton's method for self-concordant functions: the step
        # 1/(1+λ) keeps R y > 0 and decreases f; full steps once λ < 1/4
        full = dec < 0.25
        y = y + (step if full else step / (1.0 + dec))
        prev = dec2 if full else math.inf
    return 1.0 / (r @ y)


def _cvxpy():
    try:
        return importlib.import_module("cvxpy")
    except ImportError as e:  # pragma: no cover - exercised with cvxpy hidden
        raise ImportError(
            "Nash-MTL's solver='cvxpy' needs the optional dependency cvxpy: "
            "pip install 'gradbalance[cvxpy]', or use solver='newton' (no extra dependency)"
        ) from e


_CCP_CACHE: dict[int, Any] = {}


def _ccp_problem(k: int) -> Any:
    """The paper's convex subproblem for ``K`` tasks, parametrised (built once per ``K``)."""
    prob = _CCP_CACHE.get(k)
    if prob is None:
        cp = _cvxpy()
        alpha = cp.Variable(k, nonneg=True, name="alpha")
        gram = cp.Parameter((k, k), name="G")
        coef = cp.Parameter(k, name="coef")
        # α_i (Gα)_i >= 1, written as the convex constraint -log α_i - log (Gα)_i <= 0
        constraints = [cp.log(alpha) + cp.log(gram @ alpha) >= 0]
        prob = cp.Problem(cp.Minimize(coef @ alpha), constraints)
        _CCP_CACHE[k] = prob
    return prob


def _nash_ccp(
    g: Tensor, w_mn: Tensor, init: Tensor | None, solver: str, tol: float, max_iter: int
) -> Tensor:
    """Navon et al.'s sequential convex procedure (their Sec. 3.2), with cvxpy."""
    k = g.shape[0]
    prob = _ccp_problem(k)
    alpha_var = prob.variables()[0]
    params = {p.name(): p for p in prob.parameters()}
    params["G"].value = g.numpy()
    gw = g @ w_mn
    alpha = None
    if init is not None:
        a = init.to(device="cpu", dtype=_F64)
        if bool((a > 0).all()) and bool(((g @ a) > 0).all()):
            alpha = a
    if alpha is None:
        # a strictly feasible point: the min-norm weights (G w > 0) nudged to be positive
        spread = float(g.sum(1).abs().max())
        alpha = w_mn + (float(gw.min()) / (2.0 * spread) if spread > 0 else 1.0)
    alpha = alpha / math.sqrt(float((alpha * (g @ alpha)).min()))
    for _ in range(max_iter):
        if float(_nash_residual(g, alpha)) <= tol:
            return alpha
        # objective Σ_i (Gα)_i + linearisation of φ(α) = Σ_i log α_i + log (Gα)_i at α_t
        ga = g @ alpha
        params["coef"].value = (g.sum(0) + 1.0 / alpha + g @ (1.0 / ga)).numpy()
        alpha_var.value = alpha.numpy()
        try:
            # no warm start: the problem object is cached per K, and a warm start would make
            # the result depend on what was solved before (breaking bit-exact resume)
            prob.solve(solver=solver, warm_start=False)
        except Exception as e:  # cvxpy raises SolverError and others on failures
            raise SolverError(f"nash_bargaining: cvxpy solver {solver} failed: {e}") from e
        if prob.status not in ("optimal", "optimal_inaccurate") or alpha_var.value is None:
            raise SolverError(
                f"nash_bargaining: cvxpy solver {solver} returned status {prob.status!r}"
            )
        new = torch.as_tensor(alpha_var.value, dtype=_F64).clamp_min(0.0)
        if not bool((new > 0).all()) or not bool(((g @ new) > 0).all()):
            raise SolverError(
                f"nash_bargaining: cvxpy solver {solver} returned a point outside the domain "
                f"(α = {new.tolist()})"
            )
        alpha = new
    return alpha


@overload
def nash_bargaining(
    G: Tensor,
    *,
    solver: str = ...,
    cvxpy_solver: str = ...,
    init: Tensor | None = ...,
    tol: float | None = ...,
    max_iter: int | None = ...,
    return_residual: Literal[False] = ...,
) -> Tensor: ...


@overload
def nash_bargaining(
    G: Tensor,
    *,
    solver: str = ...,
    cvxpy_solver: str = ...,
    init: Tensor | None = ...,
    tol: float | None = ...,
    max_iter: int | None = ...,
    return_residual: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@cpu_single_thread
def nash_bargaining(
    G: Tensor,
    *,
    solver: str = "newton",
    cvxpy_solver: str = "CLARABEL",
    init: Tensor | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    return_residual: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The Nash bargaining weights of Nash-MTL (Navon et al., ICML 2022): $G\alpha = 1/\alpha$.

    Solves $\alpha_i\,(G\alpha)_i = 1$ for all $i$ with $\alpha > 0$, so the update
    $d = J^\top \alpha$ satisfies $\langle g_i, d\rangle = 1/\alpha_i > 0$: it is the
    maximiser of $\sum_i \log \langle g_i, d\rangle$ over the ball $\lVert d\rVert \le
    \sqrt K$ (the Nash bargaining solution). A solution exists exactly when some direction
    decreases every loss, i.e. when 0 is not in the convex hull of the gradients; it is unique
    as an update $d$ (and as $\alpha$ when the gradients are linearly independent).

    Solvers:

    - ``"newton"`` (no extra dependency): with $G = R R^\top$ ($R$ of full column rank, from
      an eigendecomposition), minimise the strictly convex, self-concordant
      $f(y) = \tfrac12\lVert y\rVert^2 - \sum_i \log (R y)_i$ by damped Newton steps from the
      min-norm point (strictly feasible by Gordan's theorem); the minimiser gives
      $\alpha = 1 / (R y)$. Converges quadratically; typically 5 to 20 iterations.
    - ``"cvxpy"`` (optional dependency): the paper's sequential convex procedure: minimise
      $\sum_i (G\alpha)_i + \nabla\varphi(\alpha_t)^\top \alpha$ subject to
      $\log \alpha_i + \log (G\alpha)_i \ge 0$, where
      $\varphi(\alpha) = \sum_i \log \alpha_i + \log (G\alpha)_i$ is linearised at the
      previous iterate, with cvxpy's ``CLARABEL`` (default) or ``SCS`` solver (never ECOS),
      warm-started from ``init``.

    The problem is solved for the unit-length gradients $g_i / \lVert g_i\rVert$ (Gramian with
    unit diagonal) and mapped back by $\alpha_i \mapsto \alpha_i / \lVert g_i\rVert$: the
    solution transforms exactly so when each gradient is scaled by its own factor, and the
    update $J^\top\alpha$ does not change at all.

    Args:
        G: the Gramian, shape ``(K, K)``.
        solver: ``"newton"`` or ``"cvxpy"``.
        cvxpy_solver: ``"CLARABEL"`` or ``"SCS"`` (only with ``solver="cvxpy"``).
        init: warm start for ``"cvxpy"`` (previous weights, in the units of ``G``); used
            when strictly feasible, else a feasible point is built from the min-norm point.
        tol: accepted residual $\max_i |\alpha_i (G\alpha)_i - 1|$ (default ``1e-9`` for
            ``"newton"``, ``1e-5`` for cvxpy with CLARABEL, ``1e-3`` with the less accurate SCS;
            the official code stops when $\lVert G\alpha - 1/\alpha\rVert < 10^{-3}$).
        max_iter: iteration budget (default 100 Newton steps / 20 convex subproblems, the
            paper's default).
        return_residual: also return the residual.

    Returns:
        ``α`` of shape ``(K,)`` in the dtype and on the device of ``G`` (and the residual).

    Raises:
        SolverError: if no solution exists (a zero gradient, or 0 in the convex hull of the
            gradients), if cvxpy fails, or if the residual stays above ``tol``.
        ImportError: for ``solver="cvxpy"`` without cvxpy installed.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers.conic import nash_bargaining
        >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> nash_bargaining(G)  # α_i = 1 / ‖g_i‖ for orthogonal gradients
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    _validate(G, "nash_bargaining")
    if solver not in ("newton", "cvxpy"):
        raise ValueError(f"solver must be 'newton' or 'cvxpy', got {solver!r}")
    if cvxpy_solver not in CVXPY_SOLVERS:
        raise ValueError(f"cvxpy_solver must be one of {CVXPY_SOLVERS}, got {cvxpy_solver!r}")
    if tol is None:
        tol = 1e-9 if solver == "newton" else (1e-5 if cvxpy_solver == "CLARABEL" else 1e-3)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    iters = (100 if solver == "newton" else 20) if max_iter is None else int(max_iter)
    if iters < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    g = _sym64(G)
    w_mn = _nash_feasible(g, "nash_bargaining")  # also rejects zero gradients
    # unit diagonal (each gradient scaled to length 1): the solution transforms exactly
    # (α_i ↦ α_i ‖g_i‖) and the problem is as well conditioned as the angles allow
    norms = g.diagonal().sqrt()
    g = g / (norms[:, None] * norms[None, :])
    w_mn = w_mn * norms
    w_mn = w_mn / w_mn.sum()
    if solver == "newton":
        alpha = _nash_newton(g, w_mn, iters)
    else:
        start = None if init is None else init.detach().to(dtype=_F64, device="cpu") * norms
        alpha = _nash_ccp(g, w_mn, start, cvxpy_solver, tol, iters)
    res = _nash_residual(g, alpha)
    if not bool(res <= tol):
        raise SolverError(
            f"nash_bargaining ({solver}{'/' + cvxpy_solver if solver == 'cvxpy' else ''}): the "
            f"residual max|α_i (Gα)_i - 1| = {float(res):.3g} is above tol={tol:g} after "
            f"{iters} iterations; nothing was applied. Increase max_iter or tol"
        )
    alpha = alpha / norms
    out = alpha.to(device=G.device, dtype=G.dtype)
    return (out, res) if return_residual else out
