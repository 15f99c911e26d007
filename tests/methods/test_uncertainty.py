"""Uncertainty weighting: the objective and its gradients, s_i → log σ_i² on regression tasks
with known noise, the param group, checkpoints, skipped and failed steps."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.methods import StepInputs, Uncertainty
from tests.conftest import MultiHeadNet, clone
from tests.methods.resume import check_resume, train_step

TASKS = ["t0", "t1", "t2"]


def make_opt(model, inner=None, **kw):
    inner = inner or torch.optim.SGD(model.parameters(), lr=0.1)
    return gb.GradBalancer(inner, method="uncertainty", shared=model.trunk, **kw)


def test_weights_extra_loss_and_gradient_of_the_log_variances():
    model = MultiHeadNet("mlp")
    init = {"t0": 0.3, "t1": -0.2, "t2": 1.0}
    types = {"t0": "regression", "t1": "classification", "t2": "regression"}
    opt = make_opt(model, task_types=types, init=init, tasks=TASKS)
    s = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    c = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    x, y = model.inputs()
    losses = model.losses(x, y)
    loss_values = torch.stack([v.detach().double() for v in losses.values()])
    w = opt.backward(losses)
    # backward returns the effective weights c_i·exp(−s_i), detached
    assert not w.requires_grad
    torch.testing.assert_close(w.double(), c * torch.exp(-s), atol=1e-6, rtol=1e-6)
    # d/ds_i [c_i·exp(−s_i)·L_i + ½·s_i] = −c_i·exp(−s_i)·L_i + ½
    expected = -c * torch.exp(-s) * loss_values + 0.5
    torch.testing.assert_close(opt.method.log_vars.grad.double(), expected, atol=1e-6, rtol=1e-5)


def test_network_gradient_is_that_of_the_weighted_sum():
    base = MultiHeadNet("mlp")
    model, ref = clone(base), clone(base)
    opt = make_opt(model, init=0.7, tasks=TASKS)
    x, y = base.inputs()
    opt.backward(model.losses(x, y))
    objective = sum(0.5 * math.exp(-0.7) * v for v in ref.losses(x, y).values())
    expected = torch.autograd.grad(objective, list(ref.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_weights_is_free_of_side_effects_and_differentiable():
    m = Uncertainty(task_types="classification", init=[0.0, 1.0])
    m.bind(("a", "b"))
    inputs = StepInputs(tasks=("a", "b"), losses=torch.tensor([1.0, 2.0], dtype=torch.float64))
    w = m.weights(inputs)
    assert w.requires_grad
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, math.exp(-1.0)], dtype=torch.float64))
    assert m.extra_loss(inputs).item() == pytest.approx(0.5)
    assert torch.equal(m.log_variances, torch.tensor([0.0, 1.0]))


def test_log_variances_are_their_own_param_group_without_weight_decay():
    model = MultiHeadNet("mlp")
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = make_opt(model, inner=inner, tasks=TASKS)
    assert len(inner.param_groups) == 2
    group = inner.param_groups[-1]
    assert group["params"] == [opt.method.log_vars]
    assert group["weight_decay"] == 0.0
    assert group["lr"] == 1e-2
    # a learning rate of their own, and a group created at the first backward without tasks=
    model2 = MultiHeadNet("mlp")
    inner2 = torch.optim.SGD(model2.parameters(), lr=0.1, weight_decay=1e-3)
    opt2 = make_opt(model2, inner=inner2, lr=0.5)
    assert len(inner2.param_groups) == 1
    x, y = model2.inputs()
    opt2.backward(model2.losses(x, y))
    assert inner2.param_groups[-1]["lr"] == 0.5
    assert inner2.param_groups[-1]["weight_decay"] == 0.0
    before = opt2.method.log_variances
    opt2.step()
    assert not torch.equal(before, opt2.method.log_variances)


def test_log_variances_converge_to_the_log_noise_variance():
    """Regression tasks y_k = a_k·x + σ_k·ε with known σ_k and an MSE loss. The minimum of
    ½·exp(−s)·L + ½·s over s is s* = log L, and at the fitted model L → σ_k² (the noise
    variance), so s_k → log σ_k² = 2·log σ_k, the log of the noise *variance*."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, d = 2000, 4
    noise = torch.tensor([0.1, 0.5, 2.0])
    x = torch.randn(n, d, generator=gen)
    a = torch.randn(3, d, generator=gen)
    y = x @ a.T + noise * torch.randn(n, 3, generator=gen)
    trunk = nn.Linear(d, 8)
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(torch.optim.Adam(params, lr=0.05), method="uncertainty", tasks=TASKS)
    for _ in range(800):
        z = trunk(x)
        losses = [(heads[i](z).squeeze(-1) - y[:, i]).pow(2).mean() for i in range(3)]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
    s = opt.method.log_variances
    torch.testing.assert_close(s, 2 * noise.log(), atol=0.1, rtol=0)
    # and s sits at its optimum log L for the final losses
    final = torch.tensor([math.log(float(v.detach())) for v in losses])
    torch.testing.assert_close(s, final, atol=0.02, rtol=0)


def test_classification_optimum_is_log_of_twice_the_loss():
    """For exp(−s)·L + ½·s the minimum is s* = log(2L): train s alone on a constant loss."""
    theta = torch.zeros((), requires_grad=True)
    opt = gb.GradBalancer(
        torch.optim.SGD([theta], lr=0.0),
        method="uncertainty",
        task_types="classification",
        lr=0.1,
        tasks=["a", "b"],
    )
    for _ in range(500):
        opt.zero_grad()
        opt.backward([0.3 + 0.0 * theta, 2.0 + 0.0 * theta])
        opt.step()
    torch.testing.assert_close(
        opt.method.log_variances, torch.tensor([0.6, 4.0]).log(), atol=1e-3, rtol=0
    )


# ---------------------------------------------------------------------------- state
def train(model, opt, start, steps):
    for t in range(start, start + steps):
        train_step(opt, model, t, batch=8)


@pytest.mark.parametrize("declare_tasks", [True, False])
def test_save_and_resume_bit_identically(declare_tasks):
    kw = {"tasks": TASKS} if declare_tasks else {}

    def make(model, seed):
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return make_opt(
            model, inner=inner, task_types=["regression", "classification", "regression"], **kw
        )

    run = check_resume(
        make,
        make_model=lambda seed: MultiHeadNet("convbn", seed=seed),
        step=partial(train_step, batch=8),
    )
    assert "log_vars" in run.checkpoint["gradbalance"]["method"]
    assert torch.equal(run.reference.method.log_vars, run.resumed.method.log_vars)
    opt2 = run.resumed
    assert opt2.method.log_vars is opt2.optimizer.param_groups[-1]["params"][0]


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_skipped_or_failed_step_leaves_state_untouched(policy):
    model = MultiHeadNet("mlp")
    opt = make_opt(model, inner=torch.optim.Adam(model.parameters(), lr=0.1), nonfinite=policy)
    train(model, opt, 0, 2)
    before = opt.method.log_variances
    x, y = model.inputs(seed=9)
    losses = model.losses(x, y)
    losses["t2"] = losses["t2"] * float("inf")
    opt.zero_grad()
    if policy == "skip":
        assert torch.isnan(opt.backward(losses)).all()
        opt.step()
    else:
        with pytest.raises(gb.NonFiniteError, match="t2"):
            opt.backward(losses)
    assert opt.method.log_vars.grad is None
    assert torch.equal(before, opt.method.log_variances)
    train(model, opt, 10, 1)
    assert not torch.equal(before, opt.method.log_variances)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task_types": "ranking"}, "task type"),
        ({"init": float("nan")}, "finite"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Uncertainty(**kwargs)


def test_per_task_options_must_match_the_tasks():
    model = MultiHeadNet("mlp")
    with pytest.raises(ValueError, match="2 entries"):
        make_opt(model, task_types=["regression", "regression"], tasks=TASKS)
    with pytest.raises(ValueError, match="missing"):
        make_opt(model, init={"t0": 0.0}, tasks=TASKS)
    with pytest.raises(ValueError, match="task type"):
        make_opt(model, task_types={"t0": "regression", "t1": "x", "t2": "regression"}, tasks=TASKS)


def test_registry_and_repr():
    m = gb.methods.get("uncertainty", task_types="classification")
    assert isinstance(m, Uncertainty)
    assert "classification" in repr(m)
    assert "Kendall" in Uncertainty.paper


def test_init_accepts_a_scalar_tensor_a_sequence_and_a_mapping():
    for init, expected in [
        (torch.tensor(0.5), [0.5, 0.5]),
        ((1.0, 2.0), [1.0, 2.0]),
        ({"b": 3.0, "a": -1.0}, [-1.0, 3.0]),
    ]:
        m = Uncertainty(init=init)
        m.bind(("a", "b"))
        assert m.log_variances.tolist() == expected
