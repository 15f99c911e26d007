"""`nash_bargaining` judges its problem on the problem's own scale: gradients of any length
(1e-14 to 1e14, together or per task), ill-conditioned Gramians (rows ±u plus small noise)
certified to their float64 rounding floor, Newton run to that floor, the cvxpy path in
agreement, and a loud `SolverError` where 0 is in the convex hull, at any scale."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance.errors import SolverError
from gradbalance.solvers import nash, nash_bargaining
from tests.methods.jacobians import jacobians

F64 = torch.float64
EPS = torch.finfo(F64).eps


def plus_minus_u(seed: int, k: int = 5, p: int = 1000, noise: float = 1e-3) -> torch.Tensor:
    """Rows ``±u`` (alternating signs, ``‖u‖ = 1``) plus ``noise · N(0, 1/P)``: a common
    descent direction exists (the noise), but ``cond(G)`` is about ``5/noise²``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(p, generator=gen, dtype=F64)
    u = u / u.norm()
    signs = torch.tensor([(-1.0) ** i for i in range(k)], dtype=F64)
    return signs[:, None] * u + noise * torch.randn(k, p, generator=gen, dtype=F64) / math.sqrt(p)


def scaled_conflict(seed: int, k: int, p: int = 1000, noise: float = 1e-2) -> torch.Tensor:
    """Rows ``±c_i u`` with random signs and lengths ``c_i = e^N(0,1)``, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(p, generator=gen, dtype=F64)
    u = u / u.norm()
    signs = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    signs[0], signs[1] = 1.0, -1.0
    c = torch.randn(k, generator=gen, dtype=F64).exp()
    noise_rows = noise * torch.randn(k, p, generator=gen, dtype=F64) / math.sqrt(p)
    return (signs * c)[:, None] * u + noise_rows


def check_bargaining(J: torch.Tensor, alpha: torch.Tensor, atol: float) -> None:
    """The bargaining solution on the vectors: α > 0, α_i <g_i, d> = 1, ‖d‖² = K."""
    assert bool((alpha > 0).all())
    d = alpha @ J
    assert bool(((J @ d) > 0).all())  # every loss decreases
    ones = torch.ones(J.shape[0], dtype=F64)
    torch.testing.assert_close(alpha * (J @ d), ones, rtol=0, atol=atol)
    assert float(d @ d) == pytest.approx(J.shape[0], rel=atol)


@pytest.mark.parametrize("seed", range(24))
def test_ill_conditioned_plus_minus_u_family_is_solved(seed):
    # cond(G) ~ 5e6: the residual's float64 floor is ~1e-9 to 1e-8, so a fixed 1e-9 refused it
    J = plus_minus_u(seed)
    alpha, res = nash_bargaining(J @ J.T, return_residual=True)
    assert float(res) <= 1e-7
    check_bargaining(J, alpha, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_ill_conditioned_family_agrees_with_the_cvxpy_path(seed):
    pytest.importorskip("cvxpy")
    J = plus_minus_u(seed)
    G = J @ J.T
    newton = nash_bargaining(G)
    cvx, res = nash_bargaining(G, solver="cvxpy", return_residual=True)
    assert float(res) <= 1e-5
    # the update d = Jᵀα is what both certify (α_i <g_i, d> = 1 to the residual)
    d_newton, d_cvx = newton @ J, cvx @ J
    torch.testing.assert_close(d_cvx, d_newton, rtol=0, atol=1e-4 * float(d_newton.norm()))
    torch.testing.assert_close(cvx, newton, rtol=1e-4, atol=0)


@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("seed", range(8))
def test_newton_reaches_the_default_tolerance_on_moderate_conditioning(k, seed):
    # cond(G) ~ 1e4 to 1e5: the rounding floor is below the default tol 1e-9, yet Newton used
    # to stop early (on an absolute decrement test) at residuals up to 6e-8 and raise
    J = scaled_conflict(seed, k)
    alpha, res = nash_bargaining(J @ J.T, return_residual=True)
    assert float(res) <= 1e-9
    check_bargaining(J, alpha, atol=1e-8)


@pytest.mark.parametrize("scale", [1e-6, 1e-9, 1e-14, 1e6, 1e14])
def test_tiny_and_huge_gradients_give_the_same_update(scale):
    J = scaled_conflict(0, 3, p=20, noise=0.5)
    alpha = nash_bargaining(J @ J.T)
    Js = scale * J
    torch.testing.assert_close(nash_bargaining(Js @ Js.T) * scale, alpha, rtol=1e-9, atol=0)


def test_one_loss_scaled_by_1e_minus_8():
    J = scaled_conflict(1, 4, p=20, noise=0.5)
    c = torch.tensor([1.0, 1e-8, 1.0, 1.0], dtype=F64)
    Js = c[:, None] * J
    alpha = nash_bargaining(J @ J.T)
    torch.testing.assert_close(nash_bargaining(Js @ Js.T) * c, alpha, rtol=1e-9, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    J=jacobians(max_k=5, feasible=True),
    log_c=st.lists(st.floats(-8.0, 8.0), min_size=5, max_size=5),
    overall=st.sampled_from([1e-6, 1.0, 1e6]),
)
def test_weights_scale_as_the_inverse_of_each_tasks_factor(J, log_c, overall):
    # G α = 1/α: scaling g_i by c_i maps α_i to α_i / c_i and leaves d = Jᵀα unchanged
    c = overall * 10.0 ** torch.tensor(log_c[: J.shape[0]], dtype=F64)
    Js = c[:, None] * J
    alpha = nash_bargaining(J @ J.T)
    torch.testing.assert_close(nash_bargaining(Js @ Js.T) * c, alpha, rtol=1e-7, atol=0)


OPPOSED = {
    "opposite": [[1.0, 0.5], [-1.0, -0.5]],
    "opposite_lengths": [[1.0, 0.5], [-3.0, -1.5]],
    "triangle": [[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]],
    "with_a_bystander": [[1.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
}


@pytest.mark.parametrize("scale", [1.0, 1e-8, 1e8])
@pytest.mark.parametrize("name", sorted(OPPOSED))
@pytest.mark.parametrize("solver", ["newton", "cvxpy"])
def test_zero_in_the_convex_hull_raises_at_any_scale(name, scale, solver):
    if solver == "cvxpy":
        pytest.importorskip("cvxpy")
    J = torch.tensor(OPPOSED[name], dtype=F64)
    # overall scale, and one task further scaled by its own factor
    c = torch.full((J.shape[0],), scale, dtype=F64)
    c[0] = 1.0
    Js = c[:, None] * J
    with pytest.raises(SolverError, match="convex hull"):
        nash_bargaining(Js @ Js.T, solver=solver)


def test_pareto_stationary_to_float64_precision_raises():
    # noise 1e-8: the min-norm point of the unit gradients is ~1e-8 long, at the rounding level
    J = plus_minus_u(0, noise=1e-8)
    with pytest.raises(SolverError, match="convex hull"):
        nash_bargaining(J @ J.T)


def test_a_residual_above_the_rounding_floor_still_raises():
    # one Newton step cannot reach the floor: the error names the floor and the bound
    J = scaled_conflict(0, 3)
    with pytest.raises(SolverError, match="rounding floor"):
        nash_bargaining(J @ J.T, max_iter=1)


def test_rounding_floor_is_relative_to_the_terms():
    g = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=F64)
    alpha = torch.tensor([2.0, 3.0], dtype=F64)
    # 4 K ε max_i Σ_j |α_i G_ij α_j| = 4 · 2 · ε · max(4 + 3, 3 + 9)
    assert nash._nash_floor(g, alpha) == pytest.approx(4 * 2 * EPS * 12.0, rel=1e-12)


def test_a_problem_beyond_float64_is_refused_not_certified():
    # noise 3e-6: a common descent direction exists, but the residual's rounding floor
    # (~3e-3) is above the cap 1e-3: the answer would be noise, so it is refused
    J = plus_minus_u(0, noise=3e-6)
    with pytest.raises(SolverError, match="cannot be certified"):
        nash_bargaining(J @ J.T)
    # a tol the user chose above the floor accepts it, and the answer is still the bargaining
    # solution to that accuracy
    alpha = nash_bargaining(J @ J.T, tol=1e-2)
    check_bargaining(J, alpha, atol=1e-2)
