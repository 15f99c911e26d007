"""DTP: the lower-KPI task gets the larger weight, the moving average and the focal formula,
missing or bad KPIs raise, checkpoints, skipped and failed steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods import DTP, StepInputs
from tests.conftest import MultiHeadNet
from tests.methods.resume import check_resume, method_state, same_state, train_step

TASKS = ("t0", "t1", "t2")


def focal(kappa, gamma, eps=1e-6):
    k = min(max(kappa, eps), 1 - eps)
    return -((1 - k) ** gamma) * math.log(k)


def make_opt(model, **kw):
    return gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.05), method="dtp", shared=model.trunk, **kw
    )


def train(model, opt, start, steps, kpis=lambda t: [0.9, 0.5 + 0.01 * t, 0.2]):
    for t in range(start, start + steps):
        x, y = model.inputs(seed=t)
        opt.zero_grad()
        opt.backward(model.losses(x, y), kpis=kpis(t))
        opt.step()


@settings(max_examples=60, deadline=None)
@given(
    a=st.floats(0.0, 1.0),
    b=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 5.0),
)
def test_lower_kpi_gets_more_weight(a, b, gamma):
    m = DTP(gamma=gamma, alpha=1.0)
    m.bind(("a", "b"))
    inputs = StepInputs(
        tasks=("a", "b"),
        losses=torch.ones(2, dtype=torch.float64),
        kpis=torch.tensor([a, b], dtype=torch.float64),
    )
    w = m.weights(inputs)
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    ka, kb = (min(max(v, 1e-6), 1 - 1e-6) for v in (a, b))
    if ka < kb:
        assert w[0] >= w[1]
    elif kb < ka:
        assert w[1] >= w[0]
    if gamma < 4 and abs(ka - kb) > 1e-3 and max(ka, kb) < 0.99:
        assert (w[0] > w[1]) == (ka < kb)


def test_weights_through_the_balancer_follow_the_formula_and_the_moving_average():
    model = MultiHeadNet("mlp")
    gammas = {"t0": 0.0, "t1": 1.0, "t2": 2.0}
    opt = make_opt(model, gamma=gammas, alpha=0.25)
    x, y = model.inputs()
    kpi_seq = [[0.9, 0.5, 0.2], [0.7, 0.6, 0.0], [1.0, 0.4, 0.3]]
    avg = None
    for kpis in kpi_seq:
        # the first KPI initialises the average; then κ̄ = α·κ + (1 − α)·κ̄, including this step's
        avg = kpis if avg is None else [0.25 * k + 0.75 * a for k, a in zip(kpis, avg)]
        opt.zero_grad()
        w = opt.backward(model.losses(x, y), kpis=dict(zip(TASKS, kpis)))
        expected = [focal(a, g) for a, g in zip(avg, gammas.values())]
        torch.testing.assert_close(
            w.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7
        )
        opt.step()
        torch.testing.assert_close(opt.method.smoothed_kpis, torch.tensor(avg, dtype=torch.float64))


def test_the_hard_task_gets_the_larger_weight_during_training():
    model = MultiHeadNet("mlp")
    opt = make_opt(model, gamma=1.0)
    train(model, opt, 0, 5)
    w = opt.last_weights
    assert w[2] > w[1] > w[0]  # KPIs 0.2 < ~0.52 < 0.9


def test_kpi_zero_and_one_give_finite_weights():
    m = DTP(gamma=1.0, alpha=1.0, eps=1e-4)
    m.bind(("a", "b"))
    w = m.focal_weights(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert w.tolist() == pytest.approx([focal(0.0, 1.0, 1e-4), focal(1.0, 1.0, 1e-4)])
    assert 0 < w[1] < 1e-7 and w[0] == pytest.approx(-math.log(1e-4), rel=1e-3)


# ---------------------------------------------------------------------------- errors
def test_backward_without_kpis_raises_and_changes_nothing():
    model = MultiHeadNet("mlp")
    opt = make_opt(model)
    train(model, opt, 0, 2)
    before = opt.method.smoothed_kpis
    params = [p.detach().clone() for p in model.parameters()]
    x, y = model.inputs(seed=4)
    opt.zero_grad()
    with pytest.raises(gb.MissingInputError, match="KPI"):
        opt.backward(model.losses(x, y))
    with pytest.raises(gb.MissingInputError, match="t2"):
        opt.backward(model.losses(x, y), kpis={"t0": 0.5, "t1": 0.5})
    with pytest.raises(ValueError, match="t1"):
        opt.backward(model.losses(x, y), kpis={"t0": 0.5, "t1": 1.5, "t2": 0.5})
    with pytest.raises(ValueError, match="t0"):
        opt.backward(model.losses(x, y), kpis=[float("nan"), 0.5, 0.5])
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert torch.equal(before, opt.method.smoothed_kpis)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_weights_without_kpis_raises_missing_input():
    m = DTP()
    m.bind(("a",))
    with pytest.raises(gb.MissingInputError):
        m.weights(StepInputs(tasks=("a",), losses=torch.ones(1, dtype=torch.float64)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": -1.0}, "gamma"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"eps": 0.5}, "eps"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DTP(**kwargs)


def test_per_task_gamma_must_name_every_task():
    model = MultiHeadNet("mlp")
    with pytest.raises(ValueError, match="missing"):
        make_opt(model, gamma={"t0": 1.0}, tasks=list(TASKS))
    with pytest.raises(ValueError, match="gamma"):
        make_opt(model, gamma=[1.0, -2.0, 0.0], tasks=list(TASKS))


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_skipped_or_failed_step_leaves_state_untouched(policy):
    model = MultiHeadNet("mlp")
    opt = make_opt(model, nonfinite=policy)
    train(model, opt, 0, 2)
    before = method_state(opt.method)
    x, y = model.inputs(seed=3)
    losses = model.losses(x, y)
    losses["t0"] = losses["t0"] * float("nan")
    opt.zero_grad()
    if policy == "skip":
        opt.backward(losses, kpis=[0.1, 0.1, 0.1])
        opt.step()
    else:
        with pytest.raises(gb.NonFiniteError):
            opt.backward(losses, kpis=[0.1, 0.1, 0.1])
    assert same_state(before, method_state(opt.method))


def test_save_and_resume_bit_identically():
    def step(opt, model, t):
        return train_step(opt, model, t, batch=8, kpis=[0.9, 0.5 + 0.01 * t, 0.2])

    check_resume(
        lambda model, seed: make_opt(model, gamma=[0.5, 1.0, 2.0], alpha=0.3),
        make_model=lambda seed: MultiHeadNet("mlp", seed=seed),
        step=step,
    )


def test_registry_and_repr():
    m = gb.methods.get("DTP", gamma=2.0, alpha=0.5)
    assert isinstance(m, DTP)
    assert "alpha=0.5" in repr(m)
    assert "Guo" in DTP.paper
