"""Hypothesis strategies for Gramians G = J Jᵀ of every family the min-norm solver must handle,
and a cvxpy (Clarabel) reference for the min-norm problem."""

from __future__ import annotations

import numpy as np
import torch

try:
    from hypothesis import strategies as st
except ImportError:  # the GPU check's machine may lack Hypothesis; the CUDA tests only need
    st = None  # FAMILIES and make_jacobian

FAMILIES = (
    "random",  # Gaussian rows, about half the pairs conflict
    "rank_deficient",  # fewer parameters than tasks
    "duplicated",  # some tasks repeat exactly
    "zero_gradient",  # one to three gradients are zero
    "collinear",  # all gradients on one line, mixed signs and lengths
    "opposite_1d",  # scalar gradients of both signs: the optimum is 0
    "no_conflict",  # non-negative entries, so every inner product is >= 0
    "mixed_scales",  # gradient norms spanning six orders of magnitude
    "ill_conditioned",  # parameters with scales spanning e^-8..1
)


def make_jacobian(family: str, k: int, rng: np.random.Generator) -> np.ndarray:
    """A K x P matrix whose rows are the task gradients of the given family."""
    if family == "random":
        return rng.standard_normal((k, int(rng.integers(k, 3 * k + 2))))
    if family == "rank_deficient":
        return rng.standard_normal((k, int(rng.integers(1, max(2, k // 2) + 1))))
    if family == "duplicated":
        base = rng.standard_normal((max(1, k // 2), int(rng.integers(2, 2 * k + 2))))
        rows = np.concatenate([np.arange(len(base)), rng.integers(0, len(base), k - len(base))])
        return base[rng.permutation(rows)]
    if family == "zero_gradient":
        j = rng.standard_normal((k, int(rng.integers(1, 2 * k + 2))))
        j[rng.choice(k, size=min(k - 1, int(rng.integers(1, 4))), replace=False)] = 0.0
        return j
    if family == "collinear":
        coef = rng.standard_normal(k) * np.exp(rng.uniform(-2, 2, k))
        return np.outer(coef, rng.standard_normal(int(rng.integers(1, 8))))
    if family == "opposite_1d":
        coef = np.exp(rng.uniform(-2, 2, k)) * rng.choice([-1.0, 1.0], k)
        coef[0], coef[-1] = abs(coef[0]), -abs(coef[-1])
        return coef[:, None]
    if family == "no_conflict":
        return np.abs(rng.standard_normal((k, int(rng.integers(1, 2 * k + 2)))))
    if family == "mixed_scales":
        j = rng.standard_normal((k, int(rng.integers(1, 2 * k + 2))))
        return j * 10.0 ** rng.uniform(-3, 3, (k, 1))
    if family == "ill_conditioned":
        j = rng.standard_normal((k, int(rng.integers(k // 2 + 1, 2 * k + 2))))
        return j * np.exp(rng.uniform(-8, 0, (1, j.shape[1])))
    raise ValueError(family)


@(st.composite if st is not None else lambda f: f)
def gramians(draw, families=FAMILIES, min_k: int = 2, max_k: int = 128, scale: bool = True):
    """``(family, G)`` with G a float64 Gramian, scaled by 10^[-8, 8] when ``scale``."""
    family = draw(st.sampled_from(families))
    small = draw(st.booleans())
    hi = min(max_k, 10) if small else max_k
    k = draw(st.integers(min_k, max(min_k, hi)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    j = make_jacobian(family, k, rng)
    g = torch.from_numpy(j @ j.T)
    if scale:
        g = g * 10.0 ** draw(st.floats(-8, 8))
    return family, g


def cvxpy_optimum(g: torch.Tensor) -> float:
    """min_w wᵀGw on the simplex by cvxpy + Clarabel, for G scaled to max(diag) = 1."""
    import cvxpy as cp

    a = g.double().numpy()
    a = 0.5 * (a + a.T)
    w = cp.Variable(a.shape[0])
    problem = cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(a))), [w >= 0, cp.sum(w) == 1])
    problem.solve(solver=cp.CLARABEL)
    assert problem.status in ("optimal", "optimal_inaccurate"), problem.status
    return float(problem.value)
