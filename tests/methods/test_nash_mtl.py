"""Nash-MTL: the bargaining condition Gα = 1/α (KKT) with both solvers, the update vs cvxpy's
maximiser of Σ log <g_i, d> on the gradient vectors, cvxpy with CLARABEL/SCS and never ECOS,
loud failures, scale behaviour, update frequency, a training step and an exact resume."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.errors import SolverError
from gradbalance.methods.nash_mtl import NashMTL
from gradbalance.solvers import nash
from tests.methods.jacobians import (
    HAND_BUILT,
    THREE_CONFLICT,
    batch,
    check_training_step,
    jac,
    jacobians,
    make_balancer,
    make_net,
    permutations,
    run,
    step_inputs,
    tasks_of,
    update_of,
    weights_of,
)
from tests.methods.resume import check_resume

cp = pytest.importorskip("cvxpy")


def kkt_residual(J: torch.Tensor, alpha: torch.Tensor) -> float:
    return float((alpha * ((J @ J.T) @ alpha) - 1).abs().max())


def cvxpy_bargaining(J: torch.Tensor) -> np.ndarray:
    """argmax_d Σ log <g_i, d> s.t. ‖d‖² <= K, on the vectors (CLARABEL); the bargaining
    solution has ‖d‖² = Σ α_i <g_i, d> = K."""
    Jn = J.numpy()
    d = cp.Variable(Jn.shape[1])
    prob = cp.Problem(cp.Maximize(cp.sum(cp.log(Jn @ d))), [cp.sum_squares(d) <= Jn.shape[0]])
    prob.solve(solver=cp.CLARABEL)
    return d.value


@pytest.fixture
def solver_calls(monkeypatch):
    """Record the solver of every cvxpy solve; fail on ECOS."""
    calls = []
    original = cp.Problem.solve

    def spy(self, *args, **kwargs):
        solver = kwargs.get("solver", args[0] if args else None)
        assert solver != "ECOS", "Nash-MTL must never use ECOS"
        calls.append(solver)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cp.Problem, "solve", spy)
    return calls


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_hand_built_kkt_and_the_bargaining_maximiser(name):
    J = jac(HAND_BUILT[name])
    alpha = weights_of(NashMTL(solver="newton"), J)
    assert bool((alpha > 0).all())
    assert kkt_residual(J, alpha) <= 1e-9
    d = alpha @ J
    assert bool(((J @ d) > 0).all())  # every loss decreases
    # the maximiser of Σ log <g_i, d> on ‖d‖² <= K: cvxpy's is accurate to ~1e-5, ours is at
    # least as good
    ref = cvxpy_bargaining(J)
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert float(d @ d) == pytest.approx(J.shape[0], rel=1e-9)
    ours, theirs = float(torch.log(J @ d).sum()), float(np.log(J.numpy() @ ref).sum())
    assert ours >= theirs - 1e-9


def test_orthogonal_gradients_get_inverse_norms():
    J = jac([[4.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(
        weights_of(NashMTL(solver="newton"), J), torch.tensor([0.25, 2.0, 0.5], dtype=torch.float64)
    )


@settings(max_examples=60, deadline=None)
@given(J=jacobians(max_k=8, feasible=True))
def test_newton_satisfies_the_kkt_conditions(J):
    alpha = weights_of(NashMTL(solver="newton"), J)
    assert bool((alpha > 0).all()) and bool(torch.isfinite(alpha).all())
    assert kkt_residual(J, alpha) <= 1e-8


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_cvxpy_with_clarabel_matches_newton(name, solver_calls):
    J = jac(HAND_BUILT[name])
    m = NashMTL(solver="cvxpy", cvxpy_solver="CLARABEL")
    assert m.solver_used == "cvxpy"
    alpha = weights_of(m, J)
    assert kkt_residual(J, alpha) <= 1e-5
    torch.testing.assert_close(alpha, weights_of(NashMTL(solver="newton"), J), rtol=1e-4, atol=0)
    assert set(solver_calls) <= {"CLARABEL"}
    # no subproblem only when the feasible start is already the solution (symmetric cases)
    assert solver_calls or kkt_residual(J, alpha) <= 1e-12


def test_cvxpy_with_scs(solver_calls):
    J = jac(THREE_CONFLICT)
    alpha = weights_of(NashMTL(solver="cvxpy", cvxpy_solver="SCS"), J)
    assert kkt_residual(J, alpha) <= 1e-3
    assert set(solver_calls) == {"SCS"}


@settings(max_examples=15, deadline=None)
@given(J=jacobians(max_k=5, feasible=True))
def test_cvxpy_on_random_gradients(J):
    alpha = weights_of(NashMTL(solver="cvxpy"), J)
    assert kkt_residual(J, alpha) <= 1e-5


def test_auto_picks_cvxpy_when_installed_and_newton_without(monkeypatch):
    assert NashMTL().solver_used == "cvxpy"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cvxpy" else real(name, *a)
    )
    m = NashMTL()
    assert m.solver_used == "newton"
    assert kkt_residual(jac(THREE_CONFLICT), weights_of(m, jac(THREE_CONFLICT))) <= 1e-9
    with pytest.raises(ImportError, match="gradbalance\\[cvxpy\\]"):
        NashMTL(solver="cvxpy")


def test_missing_cvxpy_import_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cvxpy", None)
    with pytest.raises(ImportError, match="solver='newton'"):
        nash.import_cvxpy()


@settings(max_examples=40, deadline=None)
@given(
    J=jacobians(max_k=5, feasible=True),
    log_s=st.floats(-6.0, 6.0),
    log_per_task=st.lists(st.floats(-8.0, 8.0), min_size=5, max_size=5),
    data=st.data(),
)
def test_update_invariant_to_loss_scales_and_equivariant(J, log_s, log_per_task, data):
    # down to gradients of 1e-6 and one loss scaled by 1e-8: the solver's thresholds are
    # relative to the problem (they used to refuse these as "0 in the convex hull")
    m = NashMTL(solver="newton")
    d = update_of(m, J)
    tol = 1e-7 * float(d.norm())
    torch.testing.assert_close(update_of(m, 10.0**log_s * J), d, rtol=1e-7, atol=tol)
    per_task = 10.0 ** torch.tensor(log_per_task[: J.shape[0]], dtype=torch.float64)
    scaled = J * per_task[:, None]
    torch.testing.assert_close(update_of(m, scaled), d, rtol=1e-7, atol=tol)
    perm = data.draw(permutations(J.shape[0]))
    torch.testing.assert_close(weights_of(m, J[perm]), weights_of(m, J)[perm], rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    "rows",
    [[[1.0, 0.0], [-2.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]]],
)
@pytest.mark.parametrize("solver", ["newton", "cvxpy"])
def test_no_solution_raises(rows, solver):
    with pytest.raises(SolverError, match="Nash-MTL"):
        weights_of(NashMTL(solver=solver), jac(rows))


def test_a_failed_step_applies_nothing():
    # two identical heads with opposite targets: g_0 = -g_1 on the trunk at any point
    model = make_net(num_tasks=2)
    opt = make_balancer(model, NashMTL(solver="newton"))
    x, _ = batch(model, 0)
    z = model.trunk(x)
    out = model.heads[0](z).squeeze(-1)
    with pytest.raises(SolverError):
        opt.backward({"a": out.mean(), "b": -out.mean()})
    assert all(p.grad is None for p in model.parameters())
    # a failed first step leaves the method unbound, or bound without weights
    assert not opt.method.is_bound or not bool(opt.method.has_alpha)


def test_on_failure_warn_reuses_the_previous_weights_loudly():
    m = NashMTL(solver="newton", on_failure="warn")
    m.bind(tasks_of(2))
    bad = jac([[1.0, 0.0], [-2.0, 0.0]])
    with pytest.raises(SolverError, match="no previous"):
        m.weights(step_inputs(bad))
    good = jac([[1.0, 0.0], [0.0, 2.0]])
    inputs = step_inputs(good)
    alpha = m.weights(inputs)
    m.update(inputs, alpha)
    with pytest.warns(RuntimeWarning, match="reusing the previous"):
        again = m.weights(step_inputs(bad, step=1))
    assert torch.equal(again, alpha)


def test_update_weights_every_reuses_the_weights():
    m = NashMTL(solver="newton", update_weights_every=3)
    m.bind(tasks_of(3))
    gen = torch.Generator().manual_seed(0)
    base = jac(HAND_BUILT["three_agree"])
    history = []
    for step in range(7):
        J = base + 0.2 * torch.rand(3, 3, dtype=torch.float64, generator=gen)
        inputs = step_inputs(J, step)
        w = m.weights(inputs)
        m.update(inputs, w)
        history.append(w)
        if step % 3 == 0:
            assert kkt_residual(J, w) <= 1e-9
        else:
            assert torch.equal(w, history[step - 1])
    assert not torch.equal(history[3], history[0])


def test_weights_do_not_change_state():
    m = NashMTL(solver="cvxpy")
    J = jac(THREE_CONFLICT)
    w = weights_of(m, J)
    assert not bool(m.has_alpha) and torch.equal(m.alpha, torch.zeros(3, dtype=torch.float64))
    m.update(step_inputs(J), w)
    assert bool(m.has_alpha) and torch.equal(m.alpha, w)


def test_validation_and_registry():
    for kwargs, match in (
        ({"solver": "ecos"}, "solver"),
        ({"cvxpy_solver": "ECOS"}, "cvxpy_solver"),
        ({"update_weights_every": 0}, "update_weights_every"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"on_failure": "ignore"}, "on_failure"),
    ):
        with pytest.raises(ValueError, match=match):
            NashMTL(**kwargs)
    m = gb.methods.get("nash-mtl", solver="newton", update_weights_every=2)
    assert isinstance(m, NashMTL) and "update_weights_every=2" in repr(m)


@pytest.mark.parametrize("solver", ["newton", "cvxpy"])
def test_training_step(solver):
    check_training_step(NashMTL(solver=solver))


@pytest.mark.parametrize("solver", ["newton", "cvxpy"])
def test_state_dict_resume_is_exact(solver):
    run(make_balancer(model := make_net(), NashMTL(solver=solver)), model, range(2))
    check_resume(
        lambda model, seed: make_balancer(model, NashMTL(solver=solver, update_weights_every=2))
    )
