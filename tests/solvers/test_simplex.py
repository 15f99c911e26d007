"""project_simplex: on the simplex, optimal (variational inequality), idempotent, batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance.solvers import project_simplex


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 64), st.integers(0, 2**32 - 1), st.floats(-6, 6))
def test_projection_is_optimal(k, seed, log_scale):
    v = torch.from_numpy(np.random.default_rng(seed).standard_normal(k) * 10.0**log_scale)
    p = project_simplex(v)
    assert (p >= 0).all() and abs(p.sum().item() - 1) <= 1e-12
    # p = Π(v) iff <v - p, q - p> <= 0 for every q in the simplex, i.e. for every vertex e_j
    r = v - p
    assert (r - r @ p <= 1e-12 * max(1.0, v.abs().max().item())).all()
    torch.testing.assert_close(project_simplex(p), p, atol=1e-12, rtol=0)


def test_known_values_and_ties():
    torch.testing.assert_close(
        project_simplex(torch.tensor([0.2, 0.3, 0.5])), torch.tensor([0.2, 0.3, 0.5])
    )
    torch.testing.assert_close(project_simplex(torch.tensor([1.0, 1.0])), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(project_simplex(torch.tensor([5.0])), torch.tensor([1.0]))
    torch.testing.assert_close(project_simplex(torch.zeros(4)), torch.full((4,), 0.25))


def test_batched_and_dtype():
    v = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    p = project_simplex(v)
    assert p.shape == v.shape and p.dtype == torch.float32
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(p[i, j], project_simplex(v[i, j]))


def test_errors():
    with pytest.raises(ValueError):
        project_simplex(torch.tensor(1.0))
    with pytest.raises(ValueError):
        project_simplex(torch.zeros(3, 0))
    with pytest.raises(TypeError):
        project_simplex(torch.ones(3, dtype=torch.long))
