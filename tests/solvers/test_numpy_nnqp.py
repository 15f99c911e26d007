"""The CPU path of min_norm for one Gramian with 24 < K <= 256 (gradbalance.solvers.numpy_nnqp):
exact on every family of benchmarks/solver.py and tests/solvers/gramians.py (the same optimum as
the batched engine, a duality gap <= 1e-9 max diag G), taken when it should be, and replaced by
the batched engine when it gives up or its answer does not verify."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradbalance.errors import NonFiniteError
from gradbalance.solvers import min_norm
from gradbalance.solvers.numpy_nnqp import solve_numpy_nnqp
from tests.solvers.gramians import FAMILIES, make_jacobian

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from solver import FAMILIES as BENCH_FAMILIES
from solver import make_problems

small = importlib.import_module("gradbalance.solvers.small")
EXACT = 1e-9


def objective(g: torch.Tensor, w: torch.Tensor) -> float:
    return float(w.double() @ g @ w.double())


def assert_exact(g: torch.Tensor, w: torch.Tensor, gap: torch.Tensor) -> None:
    scale = float(g.diagonal().max())
    assert (w >= 0).all() and abs(float(w.sum()) - 1) <= 1e-12
    assert float(gap) <= EXACT * scale
    # the batched engine (an explicit max_iter sends the problem there) finds the same optimum
    ref, ref_gap = min_norm(g, max_iter=2 * g.shape[0] + 20, return_gap=True)
    assert abs(objective(g, w) - objective(g, ref)) <= 2 * max(float(gap), float(ref_gap)) + 1e-13


@pytest.mark.parametrize("family", BENCH_FAMILIES)
@pytest.mark.parametrize("k", [30, 64, 128])
def test_benchmark_families(family, k):
    for _, g in make_problems(k, 2, seed=7, family=family):
        w, gap = min_norm(g, return_gap=True)
        assert_exact(g, w, gap)


@pytest.mark.parametrize("family", FAMILIES)
def test_test_families(family):
    rng = np.random.default_rng(3)
    for k in (25, 57, 128):
        j = make_jacobian(family, k, rng)
        g = torch.from_numpy(j @ j.T)
        w, gap = min_norm(g, return_gap=True)
        assert_exact(g, w, gap)


def test_taken_for_one_cpu_gramian_only(monkeypatch):
    calls = []
    real = small.solve_numpy_nnqp
    monkeypatch.setattr(small, "solve_numpy_nnqp", lambda *a: calls.append(1) or real(*a))
    g = make_problems(40, 1, seed=1, family="rank_deficient")[0][1]
    min_norm(g)
    assert len(calls) == 1
    min_norm(g, max_iter=100)  # an explicit budget is the batched engine's
    min_norm(g.unsqueeze(0))  # so is a batch
    min_norm(make_problems(300, 1, seed=1, family="gaussian")[0][1])  # and K > 256
    assert len(calls) == 1


def test_gives_up_to_the_batched_engine(monkeypatch):
    g = make_problems(50, 1, seed=2, family="anti_collinear")[0][1]
    expected = min_norm(g)
    monkeypatch.setattr(small, "solve_numpy_nnqp", lambda *a: None)
    w, gap = min_norm(g, return_gap=True)
    assert_exact(g, w, gap)
    assert abs(objective(g, w) - objective(g, expected)) <= 1e-12 * float(g.diagonal().max())
    # an answer that does not verify is not returned either
    monkeypatch.setattr(small, "solve_numpy_nnqp", lambda q, b, n: np.ones(len(b)))
    w, gap = min_norm(g, return_gap=True)
    assert_exact(g, w, gap)


def test_non_finite_still_raises():
    g = make_problems(40, 1, seed=3, family="gaussian")[0][1].clone()
    g[3, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        min_norm(g)
    g4 = torch.eye(4)
    g4[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        min_norm(g4)


def test_solver_on_its_own():
    q = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    x = solve_numpy_nnqp(q, np.array([1.0, 1.0, -1.0]), 10)
    np.testing.assert_allclose(x, [1 / 3, 1 / 3, 0.0], atol=1e-15)
    # a singular q (duplicated rows) still gets an answer on one of the copies' span
    q = np.array([[1.0, 1.0], [1.0, 1.0]]) + 1e-14 * np.eye(2)
    x = solve_numpy_nnqp(q, np.array([1.0, 1.0]), 10)
    assert x is not None and abs(x.sum() - 1) <= 1e-9
