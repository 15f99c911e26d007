"""CAGrad: c = 0 is the mean gradient, the update solves the paper's max-min problem (cvxpy
reference on the gradient vectors), both branches of the exact solver, scale behaviour and a
training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods.cagrad import CAGrad
from gradbalance.solvers.cagrad import cagrad_weights
from tests.methods.jacobians import (
    HAND_BUILT,
    THREE_AGREE,
    THREE_CONFLICT,
    check_training_step,
    jac,
    jacobians,
    permutations,
    update_of,
    weights_of,
)

cp = pytest.importorskip("cvxpy")


def cvxpy_max_min(J: torch.Tensor, c: float) -> float:
    """The optimal value of max_d min_i <g_i, d> s.t. ‖d - g0‖ <= c‖g0‖ (CLARABEL)."""
    Jn = J.numpy()
    g0 = Jn.mean(0)
    d = cp.Variable(Jn.shape[1])
    t = cp.Variable()
    prob = cp.Problem(cp.Maximize(t), [Jn @ d >= t, cp.norm(d - g0) <= c * np.linalg.norm(g0)])
    prob.solve(solver=cp.CLARABEL)
    return float(prob.value)


def cvxpy_dual_update(J: torch.Tensor, c: float) -> np.ndarray:
    """The paper's dual: w = argmin_{w in simplex} <g_w, g0> + c‖g0‖‖g_w‖, d = g0 + ... g_w."""
    Jn = J.numpy()
    g0 = Jn.mean(0)
    r0 = c * np.linalg.norm(g0)
    w = cp.Variable(Jn.shape[0], nonneg=True)
    prob = cp.Problem(cp.Minimize((Jn @ g0) @ w + r0 * cp.norm(Jn.T @ w)), [cp.sum(w) == 1])
    prob.solve(solver=cp.CLARABEL)
    gw = Jn.T @ w.value
    return g0 + r0 * gw / np.linalg.norm(gw)


def check_solves_max_min(J: torch.Tensor, c: float) -> torch.Tensor:
    d = update_of(CAGrad(c=c, rescale=0), J)
    g0 = J.mean(0)
    scale = float((J * J).sum(1).max())
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9) + 1e-12 * scale**0.5
    assert float((J @ d).min()) == pytest.approx(cvxpy_max_min(J, c), abs=1e-6 * scale)
    return d


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_c_zero_is_the_mean_gradient(name):
    J = jac(HAND_BUILT[name])
    k = J.shape[0]
    for rescale in (0, 1, 2):
        w = weights_of(CAGrad(c=0.0, rescale=rescale), J)
        assert torch.equal(w, torch.full((k,), 1.0 / k, dtype=torch.float64))
    torch.testing.assert_close(update_of(CAGrad(c=0.0), J), J.mean(0))


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
@pytest.mark.parametrize("c", [0.2, 0.5, 1.0, 3.0])
def test_hand_built_updates_solve_the_max_min_problem(name, c):
    check_solves_max_min(jac(HAND_BUILT[name]), c)


@pytest.mark.parametrize("rows", [THREE_CONFLICT, THREE_AGREE, [[1.0, 0.0], [-0.5, 2.0]]])
def test_update_is_the_papers_dual_formula(rows):
    # d = g0 + c‖g0‖ g_w/‖g_w‖ with w from cvxpy's solution of the dual; the dual is flat near
    # its optimum, so cvxpy's w (and d) is only accurate to ~1e-5, and ours is at least as good
    J = jac(rows)
    expected = torch.from_numpy(cvxpy_dual_update(J, 0.5))
    got = update_of(CAGrad(c=0.5, rescale=0), J)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert float((J @ got).min()) >= float((J @ expected).min()) - 1e-12


def test_zero_in_hull_and_ball_reaching_the_dual_cone():
    # g1 = -g2: the dual optimum has g_w = 0 (the official code divides by 1e-8 there); the
    # optimal value is 0 and g0 = (0, 1/3) already lies in the dual cone {(0, t), t >= 0}
    J = jac([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    d = check_solves_max_min(J, 0.5)
    torch.testing.assert_close(d, J.mean(0))
    _, gap = cagrad_weights(J @ J.T, 0.5, return_gap=True)
    assert float(gap) <= 1e-12


@pytest.mark.parametrize("c", [0.05, 0.1, 0.19])
def test_zero_in_hull_with_the_dual_cone_out_of_reach(c):
    # 0 is in the hull but the ball does not reach the dual cone: value < 0, root search branch
    J = jac([[1.0, 0.0], [-1.0, 0.0], [0.2, -1.0]])
    d = check_solves_max_min(J, c)
    assert float((J @ d).min()) < 0


@settings(max_examples=30, deadline=None)
@given(J=jacobians(max_k=5), c=st.floats(0.05, 3.0))
def test_random_updates_solve_the_max_min_problem(J, c):
    check_solves_max_min(J, c)


@settings(max_examples=12, deadline=None)
@given(J=jacobians(max_k=5), s=st.floats(1e-3, 1e3), data=st.data())
def test_finite_scale_invariant_and_permutation_equivariant(J, s, data):
    m = CAGrad(c=0.4)
    w = weights_of(m, J)
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(weights_of(m, s * J), w, rtol=1e-7, atol=1e-9)
    perm = data.draw(permutations(J.shape[0]))
    torch.testing.assert_close(weights_of(m, J[perm]), w[perm], rtol=1e-7, atol=1e-9)


def test_rescale_options_divide_the_update():
    J = jac(THREE_CONFLICT)
    raw = weights_of(CAGrad(c=0.7, rescale=0), J)
    torch.testing.assert_close(weights_of(CAGrad(c=0.7), J), raw / (1 + 0.7**2))
    torch.testing.assert_close(weights_of(CAGrad(c=0.7, rescale=2), J), raw / 1.7)


def test_larger_c_improves_the_worst_task():
    J = jac(THREE_CONFLICT)
    worst = [float((J @ update_of(CAGrad(c=c, rescale=0), J)).min()) for c in (0.0, 0.3, 1.0)]
    assert worst[0] < worst[1] < worst[2]


def test_zero_gradients_and_validation():
    assert torch.equal(
        weights_of(CAGrad(), torch.zeros(3, 4, dtype=torch.float64)),
        torch.full((3,), 1 / 3, dtype=torch.float64) / 1.25,
    )
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="c must"):
            CAGrad(c=bad)
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)


def test_registry_and_training_step():
    m = gb.methods.get("cagrad", c=0.4)
    assert isinstance(m, CAGrad) and repr(m) == "CAGrad(c=0.4, rescale=1)"
    check_training_step(m)
