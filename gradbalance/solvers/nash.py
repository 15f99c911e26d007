r"""Nash bargaining on a Gramian: the weights of Nash-MTL (Navon et al., ICML 2022).

`nash_bargaining` reads only the Gramian $G = J J^\top$ of the task gradients (rows of $J$)
and returns the solution $\alpha$ of $G\alpha = 1/\alpha$ (the update is $J^\top \alpha$), by a
damped Newton method on a self-concordant convex problem, or by the paper's concave-convex
procedure with cvxpy (optional dependency). It works in float64 on the CPU (the problem is
$K \times K$), returns the weights in the dtype and on the device of ``G``, and verifies its own
answer: the residual is computed from ``G`` and a `gradbalance.errors.SolverError` is raised when
it is not met, never a silent fallback.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Literal, overload

import torch
from torch import Tensor

from gradbalance.errors import SolverError
from gradbalance.solvers._threads import cpu_single_thread
from gradbalance.solvers.gramian import check_gramian, symmetric_float64
from gradbalance.solvers.min_norm import min_norm

__all__ = ["CVXPY_SOLVERS", "nash_bargaining"]

_F64 = torch.float64
#: `nash_bargaining`: 0 is taken to be in the convex hull of the gradients when the min-norm
#: point of the unit-length gradients has squared norm at or below this (length 1e-6).
_NASH_ZERO_HULL = 1e-12
#: The float64 rounding floor of the Nash residual is this times
#: ``K ε max_i Σ_j |α_i G_ij α_j|`` (G with unit diagonal): the error of evaluating it.
_NASH_FLOOR_FACTOR = 4.0
#: A rounding floor above this (and above ``tol``) means the answer cannot be certified.
_NASH_FLOOR_CAP = 1e-3
#: Newton stops after this many full steps in a row that do not halve the best residual.
_NEWTON_STALL = 3
#: cvxpy solvers accepted by `nash_bargaining` (ECOS is deliberately not used).
CVXPY_SOLVERS = ("CLARABEL", "SCS")


def _nash_residual(g: Tensor, alpha: Tensor) -> Tensor:
    """``max_i |α_i (Gα)_i − 1|``: zero exactly at the bargaining solution."""
    return (alpha * (g @ alpha) - 1.0).abs().max()


def _nash_floor(g: Tensor, alpha: Tensor) -> float:
    """The float64 rounding floor of `_nash_residual` at ``alpha``.

    Evaluating ``α_i (Gα)_i - 1`` sums ``K`` terms ``α_i G_ij α_j``; its rounding error is at
    most about ``K ε Σ_j |α_i G_ij α_j|``, and Newton's iterates reach that level (measured:
    at most ~1.1 times it over ill-conditioned families with K = 2 to 12). Scale-free in ``G``.
    """
    k = g.shape[0]
    terms = (alpha.abs()[:, None] * g.abs() * alpha.abs()[None, :]).sum(1).max()
    return _NASH_FLOOR_FACTOR * k * float(torch.finfo(_F64).eps) * float(terms)


def _nash_feasible(g: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor, float]:
    """The unit-diagonal Gramian, the gradient norms, and min-norm weights of the unit
    gradients; raise unless some direction has a positive inner product with every gradient.

    By Gordan's theorem that holds exactly when 0 is not in the convex hull of the gradients,
    a property that does not change when each gradient is scaled by its own positive factor:
    the test is made on the unit-length gradients, so it does not depend on the loss scales.
    The min-norm weights ``w`` make ``G w > 0`` componentwise.
    """
    diag = g.diagonal()
    if bool((diag <= 0).any()):
        zero = (diag <= 0).nonzero().flatten().tolist()
        raise SolverError(
            f"{what}: the gradient of task(s) {zero} is zero, so the Nash bargaining problem "
            "(α_i ⟨g_i, d⟩ = 1) has no solution; drop the task or use another method"
        )
    norms = diag.sqrt()
    gu = g / (norms[:, None] * norms[None, :])
    gu.fill_diagonal_(1.0)
    w = min_norm(gu)
    nmin2 = float(w @ gu @ w)
    if nmin2 <= _NASH_ZERO_HULL:
        support = (w > 0).nonzero().flatten().tolist()
        raise SolverError(
            f"{what}: 0 is in the convex hull of the task gradients (the gradients of tasks "
            f"{support}, each scaled to length 1, combine to a vector of squared norm "
            f"{max(nmin2, 0.0):.3g} <= {_NASH_ZERO_HULL:g}: a Pareto-stationary point, no "
            "direction decreases every loss), so the Nash bargaining problem has no solution; "
            "nothing was applied"
        )
    return gu, norms, w, nmin2


def _nash_newton(g: Tensor, w_mn: Tensor, max_iter: int) -> Tensor:
    """Damped Newton on ``f(y) = ½‖y‖² − Σ log (R y)_i`` with ``G = R Rᵀ`` (R full column rank).

    ``y`` are the coordinates of the update ``d`` in an orthonormal basis of the span of the
    gradients; ``f`` is strictly convex and self-concordant, its minimiser satisfies
    ``y = Rᵀ α`` with ``α = 1/(R y)``, i.e. ``α_i (Gα)_i = 1``.

    Runs to the rounding floor: once in the quadratic phase (full steps) it keeps the iterate
    with the smallest residual and stops when `_NEWTON_STALL` full steps in a row fail to halve
    it. No absolute threshold on the decrement: how small the residual can get depends on the
    conditioning (see `_nash_floor`), and the caller certifies the residual.
    """
    lam, vec = torch.linalg.eigh(g)
    keep = lam > lam.max() * g.shape[0] * torch.finfo(_F64).eps
    r = vec[:, keep] * lam[keep].sqrt()
    y = r.T @ w_mn
    y = y * (math.sqrt(g.shape[0]) / float(y.norm()))  # best multiple of the start
    eye = torch.eye(r.shape[1], dtype=_F64)
    best, best_res = y.new_ones(g.shape[0]), math.inf
    best_full, stall, full = math.inf, 0, False
    for it in range(max_iter + 1):  # max_iter steps, and the last iterate is evaluated too
        alpha = 1.0 / (r @ y)
        res = float(_nash_residual(g, alpha))
        if res < best_res:
            best, best_res = alpha, res
        if full:
            stall = stall + 1 if res > 0.5 * best_full else 0
            best_full = min(best_full, res)
        if res == 0.0 or stall >= _NEWTON_STALL or it == max_iter:
            break
        grad = y - r.T @ alpha
        hess = eye + (r * (alpha * alpha).unsqueeze(1)).T @ r
        step = -torch.linalg.solve(hess, grad)
        dec2 = float(-(grad @ step))
        if not dec2 > 0.0:  # the gradient vanished to rounding: y is the minimiser
            break
        dec = math.sqrt(dec2)
        # damped phase of Newton's method for self-concordant functions: the step
        # 1/(1+λ) keeps R y > 0 and decreases f; full steps once λ < 1/4
        full = dec < 0.25
        y = y + (step if full else step / (1.0 + dec))
    return best


def import_cvxpy() -> Any:
    """The cvxpy module, or an ImportError that names the extra to install."""
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
        cp = import_cvxpy()
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
        if float(_nash_residual(g, alpha)) <= max(tol, _nash_floor(g, alpha)):
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
      $\alpha = 1 / (R y)$. Converges quadratically; typically 5 to 20 iterations. It runs
      to the rounding floor: once in the quadratic phase it keeps the iterate of smallest
      residual and stops when three full steps in a row fail to halve it.
    - ``"cvxpy"`` (optional dependency): the paper's sequential convex procedure: minimise
      $\sum_i (G\alpha)_i + \nabla\varphi(\alpha_t)^\top \alpha$ subject to
      $\log \alpha_i + \log (G\alpha)_i \ge 0$, where
      $\varphi(\alpha) = \sum_i \log \alpha_i + \log (G\alpha)_i$ is linearised at the
      previous iterate, with cvxpy's ``CLARABEL`` (default) or ``SCS`` solver (never ECOS),
      warm-started from ``init``.

    The problem is solved for the unit-length gradients $g_i / \lVert g_i\rVert$ (Gramian with
    unit diagonal) and mapped back by $\alpha_i \mapsto \alpha_i / \lVert g_i\rVert$. As
    $G\alpha = 1/\alpha$ implies, scaling gradient $g_i$ by $c_i > 0$ maps $\alpha_i$ to
    $\alpha_i / c_i$ (up to rounding; exactly for powers of two) and leaves the update
    $J^\top\alpha$ unchanged, and every threshold is relative to the problem, so neither the
    overall scale of the gradients nor the scale of any one of them matters:

    - 0 is taken to be in the convex hull (no solution) when the min-norm point of the
      unit-length gradients has squared norm $\le 10^{-12}$ (length $10^{-6}$);
    - the residual $r = \max_i |\alpha_i (G\alpha)_i - 1|$ (unit-diagonal $G$) is accepted when
      $r \le \max(\mathrm{tol}, \rho)$, where $\rho = 4 K \varepsilon \max_i \sum_j
      |\alpha_i G_{ij} \alpha_j|$ is the float64 rounding floor of evaluating $r$ (it grows
      with the conditioning: about $3\cdot 10^{-8}$ at $\operatorname{cond}(G) \approx 5\cdot 10^6$,
      negligible for well-conditioned problems); a problem whose floor exceeds
      $\max(\mathrm{tol}, 10^{-3})$ (nearly Pareto-stationary gradients) is refused.

    Args:
        G: the Gramian, shape ``(K, K)``.
        solver: ``"newton"`` or ``"cvxpy"``.
        cvxpy_solver: ``"CLARABEL"`` or ``"SCS"`` (only with ``solver="cvxpy"``).
        init: warm start for ``"cvxpy"`` (previous weights, in the units of ``G``); used
            when strictly feasible, else a feasible point is built from the min-norm point.
        tol: accepted residual $\max_i |\alpha_i (G\alpha)_i - 1|$, raised to the rounding
            floor $\rho$ above where that is larger (default ``1e-9`` for ``"newton"``, ``1e-5``
            for cvxpy with CLARABEL, ``1e-3`` with the less accurate SCS; the official code
            stops when $\lVert G\alpha - 1/\alpha\rVert < 10^{-3}$).
        max_iter: iteration budget (default 100 Newton steps / 20 convex subproblems, the
            paper's default).
        return_residual: also return the residual.

    Returns:
        ``α`` of shape ``(K,)`` in the dtype and on the device of ``G`` (and the residual).

    Raises:
        SolverError: if no solution exists (a zero gradient, or 0 in the convex hull of the
            gradients), if cvxpy fails, if the residual stays above ``max(tol, ρ)``, or if the
            rounding floor ``ρ`` exceeds ``max(tol, 1e-3)``.
        ImportError: for ``solver="cvxpy"`` without cvxpy installed.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers.nash import nash_bargaining
        >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> nash_bargaining(G).round(decimals=6).tolist()  # α_i = 1/‖g_i‖ for orthogonal g_i
        [0.5, 1.0]
    """
    check_gramian(G, "nash_bargaining")
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
    # solved for the unit-length gradients (G with unit diagonal): every threshold below is
    # then relative to the problem, and the solution transforms exactly (α_i ↦ α_i / ‖g_i‖)
    g, norms, w_mn, nmin2 = _nash_feasible(symmetric_float64(G), "nash_bargaining")
    if solver == "newton":
        alpha = _nash_newton(g, w_mn, iters)
    else:
        start = None if init is None else init.detach().to(dtype=_F64, device="cpu") * norms
        alpha = _nash_ccp(g, w_mn, start, cvxpy_solver, tol, iters)
    res = _nash_residual(g, alpha)
    floor = _nash_floor(g, alpha)
    name = solver + ("/" + cvxpy_solver if solver == "cvxpy" else "")
    if floor > max(tol, _NASH_FLOOR_CAP):
        raise SolverError(
            f"nash_bargaining ({name}): the answer cannot be certified in float64: the rounding "
            f"floor of the residual max|α_i (Gα)_i - 1| is {floor:.3g} (above tol={tol:g} and "
            f"{_NASH_FLOOR_CAP:g}); nothing was applied. The gradients are nearly "
            "Pareto-stationary (their min-norm point, with each gradient scaled to length 1, "
            f"has squared norm {nmin2:.3g}); pass a larger tol, or on_failure='warn' to Nash-MTL"
        )
    if not bool(res <= max(tol, floor)):
        raise SolverError(
            f"nash_bargaining ({name}): the residual max|α_i (Gα)_i - 1| = {float(res):.3g} is "
            f"above max(tol={tol:g}, rounding floor {floor:.3g}) after at most {iters} "
            "iterations; nothing was applied. Increase max_iter or tol"
        )
    alpha = alpha / norms
    out = alpha.to(device=G.device, dtype=G.dtype)
    return (out, res) if return_residual else out
