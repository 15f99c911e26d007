"""IMTL-G: the paper's closed form on the gradient vectors, equal projections on every unit
gradient, the sign deviation, scale and permutation behaviour, degenerate cases and a
training step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.errors import SolverError
from gradbalance.methods.imtl_g import IMTLG
from tests.methods.jacobians import (
    ORTHOGONAL,
    THREE_AGREE,
    THREE_CONFLICT,
    TWO_AGREE,
    TWO_CONFLICT,
    check_training_step,
    jac,
    jacobians,
    permutations,
    update_of,
    weights_of,
)

#: Independent gradients for which 1ᵀG⁻¹n < 0: the paper's Σα = 1 gives an ascent direction.
FLIPPED = [[-1.0, 0.0, 0.0], [-2.0, 0.0, 1.0], [0.0, 1.0, -2.0]]


def paper_closed_form(J: torch.Tensor) -> torch.Tensor:
    """Liu et al. (2021): α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:K}, on the vectors."""
    u = J / J.norm(dim=1, keepdim=True)
    D = J[:1] - J[1:]
    U = u[:1] - u[1:]
    rest = J[0] @ U.T @ torch.linalg.inv(D @ U.T)
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


def projections(J: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (J @ d) / J.norm(dim=1)


@pytest.mark.parametrize("rows", [TWO_CONFLICT, TWO_AGREE, THREE_CONFLICT, THREE_AGREE, ORTHOGONAL])
def test_hand_built_weights_equal_the_papers_closed_form(rows):
    J = jac(rows)
    alpha = paper_closed_form(J)
    assert float(alpha.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(weights_of(IMTLG(), J), alpha, rtol=1e-10, atol=1e-12)
    p = projections(J, update_of(IMTLG(), J))
    torch.testing.assert_close(p, p[:1].expand_as(p), rtol=1e-10, atol=1e-12)
    assert float(p[0]) > 0


@settings(max_examples=60, deadline=None)
@given(J=jacobians(max_k=6, full_rank=True))
def test_update_has_equal_positive_projections_on_every_unit_gradient(J):
    G = J @ J.T
    assume(float(torch.linalg.eigvalsh(G / G.diagonal().max()).min()) > 1e-8)
    w = weights_of(IMTLG(), J)
    assert bool(torch.isfinite(w).all())
    assert float(w.sum().abs()) == pytest.approx(1.0)
    p = projections(J, w @ J)
    torch.testing.assert_close(p, p[:1].expand_as(p), rtol=1e-6, atol=0)
    assert float(p[0]) > 0
    if float(w.sum()) > 0:  # the paper's normalisation: same weights
        torch.testing.assert_close(w, paper_closed_form(J), rtol=1e-6, atol=1e-9)


def test_sign_deviation_keeps_a_descent_direction():
    J = jac(FLIPPED)
    paper = paper_closed_form(J)
    assert float(projections(J, paper @ J)[0]) < 0  # the paper's Σα = 1 ascends every loss
    w = weights_of(IMTLG(), J)
    torch.testing.assert_close(w, -paper)
    assert float(w.sum()) == pytest.approx(-1.0)
    p = projections(J, w @ J)
    assert bool((p > 0).all())


@settings(max_examples=40, deadline=None)
@given(
    J=jacobians(max_k=5, full_rank=True),
    s=st.floats(1e-3, 1e3),
    per_task=st.lists(st.floats(1e-2, 1e2), min_size=5, max_size=5),
    data=st.data(),
)
def test_scale_and_permutation_behaviour(J, s, per_task, data):
    k = J.shape[0]
    G = J @ J.T
    assume(float(torch.linalg.eigvalsh(G / G.diagonal().max()).min()) > 1e-8)
    w = weights_of(IMTLG(), J)
    torch.testing.assert_close(weights_of(IMTLG(), s * J), w, rtol=1e-6, atol=1e-12)
    # per-task loss scales leave the direction of the update unchanged (the paper's claim)
    scaled = J * torch.tensor(per_task[:k], dtype=torch.float64)[:, None]
    d, d_scaled = w @ J, update_of(IMTLG(), scaled)
    torch.testing.assert_close(d_scaled / d_scaled.norm(), d / d.norm(), rtol=0, atol=1e-6)
    perm = data.draw(permutations(k))
    torch.testing.assert_close(weights_of(IMTLG(), J[perm]), w[perm], rtol=1e-6, atol=1e-12)


def test_dependent_gradients_use_the_pseudo_inverse():
    # g3 = 2 g1 duplicates g1's direction: n is in the range of G, equal projections hold
    J = jac([[1.0, 0.5, 0.0], [-0.4, 1.0, 0.3], [2.0, 1.0, 0.0]])
    d = update_of(IMTLG(), J)
    p = projections(J, d)
    torch.testing.assert_close(p, p[:1].expand_as(p), rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 2.0], [-2.0, -4.0]],
        [[1.0, 2.0], [-1.0, -2.0]],
        [[1.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    ],
)
def test_no_equal_projection_direction_gives_zero_weights(rows):
    # u_2 = -u_1: <d, u_1> = <d, u_2> forces <d, g_1> = 0, and then d = 0 in the span
    w = weights_of(IMTLG(), jac(rows))
    assert torch.equal(w, torch.zeros(len(rows), dtype=torch.float64))


def test_zero_gradients_give_zero_weights():
    assert torch.equal(
        weights_of(IMTLG(), torch.zeros(2, 3, dtype=torch.float64)),
        torch.zeros(2, dtype=torch.float64),
    )


def test_impossible_normalisation_raises():
    # rescaling g_1 by s multiplies v_1 by 1/s: choose s so that 1ᵀv = 0 exactly (to rounding)
    J = jac(FLIPPED)
    G = J @ J.T
    v = torch.linalg.solve(G, G.diagonal().sqrt())
    s = float(-v[0] / (v[1] + v[2]))
    assert s > 0
    J[0] *= s
    with pytest.raises(SolverError, match="summing to 0"):
        weights_of(IMTLG(), J)


def test_registry_and_training_step():
    m = gb.methods.get("imtl-g")
    assert isinstance(m, IMTLG)
    check_training_step(m)
