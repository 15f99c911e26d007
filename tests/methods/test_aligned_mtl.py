"""Aligned-MTL: the update vs the paper's formula computed from an SVD of the gradient vectors,
condition number 1 of the aligned gradients, the three scale choices, scale and permutation
behaviour, and a training step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods.aligned_mtl import AlignedMTL, balance_transformation
from tests.methods.jacobians import (
    HAND_BUILT,
    ORTHOGONAL,
    THREE_CONFLICT,
    check_training_step,
    jac,
    jacobians,
    permutations,
    update_of,
    weights_of,
)


def paper_update(J: torch.Tensor, scale: str = "min", pref=None) -> torch.Tensor:
    """Algorithm 1 on the vectors: Jᵀ = V S Uᵀ (SVD) → aligned Ĝ = √σ · V Uᵀ, update Ĝ p."""
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    lam = S**2
    keep = lam > lam.max() * J.shape[0] * torch.finfo(J.dtype).eps
    U, lam, Vh = U[:, keep], lam[keep], Vh[keep]
    sigma = {"min": lam.min(), "median": lam.median(), "rmse": lam.mean()}[scale]
    p = torch.ones(J.shape[0], dtype=J.dtype) if pref is None else torch.tensor(pref, dtype=J.dtype)
    return sigma.sqrt() * (Vh.T @ (U.T @ p))


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_hand_built_updates_follow_the_paper(name, scale):
    J = jac(HAND_BUILT[name])
    torch.testing.assert_close(
        update_of(AlignedMTL(scale=scale), J), paper_update(J, scale), rtol=1e-9, atol=1e-10
    )


def test_orthogonal_gradients_get_the_smallest_length():
    J = jac(ORTHOGONAL)  # lengths 3 and 1
    torch.testing.assert_close(
        update_of(AlignedMTL(), J), torch.tensor([1.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        update_of(AlignedMTL(scale="rmse"), J), torch.full((2,), 5.0**0.5, dtype=torch.float64)
    )


@settings(max_examples=60, deadline=None)
@given(J=jacobians(max_k=6), scale=st.sampled_from(["min", "median", "rmse"]))
def test_aligned_gradients_have_condition_number_one_on_their_range(J, scale):
    G = J @ J.T
    B = balance_transformation(G, scale)
    aligned = B @ G @ B  # Gramian of the aligned gradients B J
    lam = torch.linalg.eigvalsh(G)
    kept = lam > lam.max() * G.shape[0] * torch.finfo(G.dtype).eps
    mu = torch.linalg.eigvalsh(aligned)
    top = mu.max()
    nonzero = mu[mu > 1e-9 * top]
    assert nonzero.numel() == int(kept.sum())
    assert float(nonzero.max() / nonzero.min()) == pytest.approx(1.0, abs=1e-7)
    torch.testing.assert_close(
        update_of(AlignedMTL(scale=scale), J),
        paper_update(J, scale),
        rtol=1e-7,
        atol=1e-9 * float(J.norm(dim=1).max()),
    )


@settings(max_examples=40, deadline=None)
@given(J=jacobians(max_k=5, full_rank=True), s=st.floats(1e-3, 1e3), data=st.data())
def test_finite_scale_invariant_and_permutation_equivariant(J, s, data):
    G = J @ J.T
    assume(float(torch.linalg.eigvalsh(G / G.diagonal().max()).min()) > 1e-10)
    w = weights_of(AlignedMTL(), J)
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(weights_of(AlignedMTL(), s * J), w, rtol=1e-6, atol=1e-9)
    perm = data.draw(permutations(J.shape[0]))
    torch.testing.assert_close(weights_of(AlignedMTL(), J[perm]), w[perm], rtol=1e-6, atol=1e-9)


def test_independent_aligned_gradients_have_equal_lengths():
    J = jac(THREE_CONFLICT)
    G = J @ J.T
    aligned = balance_transformation(G) @ J
    norms = aligned.norm(dim=1)
    torch.testing.assert_close(norms, norms[:1].expand(3))
    torch.testing.assert_close(norms[0] ** 2, torch.linalg.eigvalsh(G).min())


def test_preferences_and_validation():
    J = jac(THREE_CONFLICT)
    pref = [0.2, 0.5, 0.3]
    torch.testing.assert_close(
        update_of(AlignedMTL(pref=pref), J), paper_update(J, pref=pref), rtol=1e-9, atol=1e-10
    )
    with pytest.raises(ValueError, match="preferences"):
        weights_of(AlignedMTL(pref=[1.0, 1.0]), J)
    with pytest.raises(ValueError, match="pref"):
        AlignedMTL(pref=[1.0, float("nan")])
    with pytest.raises(ValueError, match="scale"):
        AlignedMTL(scale="max")


def test_zero_gradients():
    w = weights_of(AlignedMTL(), torch.zeros(3, 2, dtype=torch.float64))
    assert torch.equal(w, torch.ones(3, dtype=torch.float64))


def test_registry_and_training_step():
    m = gb.methods.get("aligned-mtl", scale="median")
    assert isinstance(m, AlignedMTL) and "median" in repr(m)
    check_training_step(m)
