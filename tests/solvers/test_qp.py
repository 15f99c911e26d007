"""nonneg_qp: KKT conditions and cvxpy agreement on strictly convex and singular problems,
closed forms, broadcasting, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance.errors import NonFiniteError
from gradbalance.solvers import nonneg_qp

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def cvxpy_value(q: np.ndarray, b: np.ndarray) -> float:
    import cvxpy as cp

    u = cp.Variable(len(b))
    obj = 0.5 * cp.quad_form(u, cp.psd_wrap(0.5 * (q + q.T))) - b @ u
    problem = cp.Problem(cp.Minimize(obj), [u >= 0])
    problem.solve(solver=cp.CLARABEL)
    assert problem.status in ("optimal", "optimal_inaccurate")
    return float(problem.value)


def value(q: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> float:
    return float(0.5 * u @ q @ u - b @ u)


def problem(k: int, seed: int, singular: bool):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, (k // 2 + 1) if singular else 2 * k + 2))
    q = a @ a.T * 10.0 ** rng.uniform(-4, 4)
    # singular Q: b in the range of Q keeps the problem bounded (the dual-cone projection case)
    b = (
        q @ rng.standard_normal(k)
        if singular
        else rng.standard_normal(k) * 10.0 ** rng.uniform(-4, 4)
    )
    return torch.from_numpy(q), torch.from_numpy(b)


@SETTINGS
@given(st.integers(1, 64), st.integers(0, 2**32 - 1), st.booleans())
def test_kkt_and_cvxpy(k, seed, singular):
    q, b = problem(k, seed, singular)
    u, res = nonneg_qp(q, b, return_residual=True)
    assert u.shape == (k,) and (u >= 0).all()
    y = q @ u - b
    tol = 1e-9 * b.abs().max().item()
    assert (y >= -tol).all()
    assert (y[u > 0].abs() <= tol).all()
    assert res.item() <= tol
    # the optimal value, relative to the scale of the problem
    scale = max(1.0, abs(value(q, b, u)))
    assert value(q, b, u) <= cvxpy_value(q.numpy(), b.numpy()) + 1e-7 * scale


def test_identity_is_clipping():
    b = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(nonneg_qp(torch.eye(4, dtype=torch.float64), b), b.clamp_min(0))


def test_upgrad_style_projection():
    """min_{u >= e_0} uᵀGu with conflicting gradients: shift u = e_0 + z, z >= 0."""
    j = torch.tensor([[1.0, 0.0], [-0.5, 1.0], [-0.4, -1.0]], dtype=torch.float64)
    g = j @ j.T
    z = nonneg_qp(g, -g[0])
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + z
    # the projected gradient uᵀJ has non-negative inner product with every task gradient
    assert (j @ (u @ j) >= -1e-12).all()


def test_zero_linear_term_gives_zero():
    q, _ = problem(6, 0, False)
    assert (nonneg_qp(q, torch.zeros(6, dtype=torch.float64)) == 0).all()


def test_broadcasting_and_dtype():
    q, b = problem(5, 1, False)
    bs = torch.stack([b, -b, 2 * b])
    u = nonneg_qp(q.float(), bs.float())
    assert u.shape == (3, 5) and u.dtype == torch.float32
    for i in range(3):
        torch.testing.assert_close(u[i], nonneg_qp(q, bs[i]).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(u[2], 2 * u[0], atol=1e-5, rtol=1e-4)


def test_sync_free_path_matches():
    q, b = problem(20, 3, True)
    torch.testing.assert_close(
        nonneg_qp(q, b, early_exit=False, check_finite=False), nonneg_qp(q, b), atol=1e-9, rtol=1e-9
    )


def test_errors():
    q = torch.eye(3)
    with pytest.raises(ValueError, match="shape"):
        nonneg_qp(q, torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        nonneg_qp(torch.ones(3), torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        nonneg_qp(q.long(), torch.ones(3))
    with pytest.raises(ValueError, match="tol"):
        nonneg_qp(q, torch.ones(3), tol=-1)
    with pytest.raises(NonFiniteError):
        nonneg_qp(q, torch.tensor([1.0, float("nan"), 0.0]))
