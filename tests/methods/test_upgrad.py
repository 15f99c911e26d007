"""UPGrad: the update lies in the dual cone and equals the mean of cvxpy's projections of the
gradient vectors, the mean gradient without conflicts, scale and permutation behaviour, and a
training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods.upgrad import UPGrad, dual_cone_weights
from tests.methods.jacobians import (
    HAND_BUILT,
    THREE_AGREE,
    THREE_CONFLICT,
    TWO_CONFLICT,
    check_training_step,
    jac,
    jacobians,
    permutations,
    update_of,
    weights_of,
)

cp = pytest.importorskip("cvxpy")


_ATTEMPTS = (
    ("CLARABEL", {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}),
    ("CLARABEL", {}),
    ("OSQP", {"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iter": 100000}),
)


def cvxpy_projections(J: torch.Tensor) -> np.ndarray:
    """Row i: argmin_x ‖x - g_i‖² s.t. <g_j, x> >= 0 for all j (CLARABEL with tight tolerances,
    else its defaults, else OSQP; accurate to ~1e-6 where a constraint is weakly active)."""
    Jn = J.numpy()
    out = []
    for g in Jn:
        x = cp.Variable(Jn.shape[1])
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - g)), [Jn @ x >= 0])
        for solver, options in _ATTEMPTS:  # Clarabel occasionally fails on these; fall back
            try:
                prob.solve(solver=solver, **options)
                break
            except cp.error.SolverError:
                continue
        out.append(x.value)
    return np.stack(out)


def check_projection_kkt(J: torch.Tensor) -> None:
    """Exact certificate: x_i = g_i + Jᵀu with u >= 0, Jx_i >= 0 and u ⊙ Jx_i = 0 (the KKT
    conditions of the projection onto the dual cone), to rounding."""
    G = J @ J.T
    v = dual_cone_weights(G)
    u = v - torch.eye(J.shape[0], dtype=torch.float64)
    scale = float(G.diagonal().max())
    inner = v @ G  # row i: <g_j, x_i> for every j
    assert bool((u >= 0).all())
    assert bool((inner >= -1e-10 * scale).all())
    assert float((u * inner).abs().max()) <= 1e-10 * scale * (1 + float(u.max()))


def check_against_cvxpy(J: torch.Tensor) -> None:
    check_projection_kkt(J)
    expected = cvxpy_projections(J)
    scale = float(J.norm(dim=1).max())
    rows = dual_cone_weights(J @ J.T) @ J
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(
        update_of(UPGrad(), J).numpy(), expected.mean(0), rtol=1e-5, atol=1e-5 * scale
    )


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_hand_built_updates_are_the_mean_of_the_projections(name):
    check_against_cvxpy(jac(HAND_BUILT[name]))


def test_two_conflicting_gradients_by_hand():
    # the projection of g1 onto {x : <g2, x> >= 0} is g1 - <g1,g2>/‖g2‖² g2 (and it already
    # has <g1, x> >= 0), and symmetrically: UPGrad is the mean of the two PCGrad projections
    J = jac(TWO_CONFLICT)
    g1, g2 = J
    expected = 0.5 * ((g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1))
    torch.testing.assert_close(update_of(UPGrad(), J), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(J=jacobians(max_k=5))
def test_random_updates_match_cvxpy(J):
    check_against_cvxpy(J)


@settings(max_examples=30, deadline=None)
@given(J=jacobians(max_k=8))
def test_update_lies_in_the_dual_cone(J):
    d = update_of(UPGrad(), J)
    scale = float((J * J).sum(1).max())
    assert bool(((J @ d) >= -1e-9 * scale).all())


def test_no_conflict_gives_the_mean_gradient():
    J = jac(THREE_AGREE)
    torch.testing.assert_close(
        weights_of(UPGrad(), J), torch.full((3,), 1 / 3, dtype=torch.float64)
    )


@settings(max_examples=30, deadline=None)
@given(J=jacobians(max_k=8))
def test_projections_satisfy_their_kkt_conditions(J):
    check_projection_kkt(J)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(max_k=6, full_rank=True), s=st.floats(1e-4, 1e4), data=st.data())
def test_weights_finite_scale_invariant_and_permutation_equivariant(J, s, data):
    # independent gradients: the weights are unique, so they can be compared
    w = weights_of(UPGrad(), J)
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(weights_of(UPGrad(), s * J), w, rtol=1e-7, atol=1e-9)
    perm = data.draw(permutations(J.shape[0]))
    torch.testing.assert_close(weights_of(UPGrad(), J[perm]), w[perm], rtol=1e-7, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(max_k=6), s=st.floats(1e-4, 1e4), data=st.data())
def test_update_scales_and_is_permutation_invariant_for_any_rank(J, s, data):
    # dependent gradients: the weights need not be unique, the update is
    d = update_of(UPGrad(), J)
    tol = 1e-7 * float(J.norm(dim=1).max())
    torch.testing.assert_close(update_of(UPGrad(), s * J), s * d, rtol=1e-7, atol=s * tol)
    perm = data.draw(permutations(J.shape[0]))
    torch.testing.assert_close(update_of(UPGrad(), J[perm]), d, rtol=1e-7, atol=tol)


def test_preferences_weight_the_projections():
    J = jac(THREE_CONFLICT)
    rows = dual_cone_weights(J @ J.T)
    torch.testing.assert_close(weights_of(UPGrad(pref=[1.0, 0.0, 0.0]), J), rows[0])
    torch.testing.assert_close(
        weights_of(UPGrad(pref=[0.2, 0.3, 0.5]), J),
        torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64) @ rows,
    )
    with pytest.raises(ValueError, match="preferences"):
        weights_of(UPGrad(pref=[1.0, 1.0]), J)
    with pytest.raises(ValueError, match="pref"):
        UPGrad(pref=[1.0, -1.0])


def test_zero_and_opposite_gradients():
    w = weights_of(UPGrad(), torch.zeros(3, 2, dtype=torch.float64))
    assert bool(torch.isfinite(w).all())
    d = update_of(UPGrad(), jac([[1.0, 0.0], [-2.0, 0.0]]))  # dual cone {0} × R
    torch.testing.assert_close(d, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_registry_and_training_step():
    m = gb.methods.get("upgrad")
    assert isinstance(m, UPGrad)
    w = check_training_step(m)
    assert bool((w >= 1 / 3 - 1e-12).all())  # the weights are (1/K)(1 + Σ z_i) with z >= 0
