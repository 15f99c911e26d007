"""GLS: the balancer's gradient is the gradient of the geometric mean of the losses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods import StepInputs
from gradbalance.methods.gls import GLS
from tests.conftest import MultiHeadNet, clone, same_snapshot, snapshot


def test_gradient_equals_autograd_of_the_geometric_mean():
    model = MultiHeadNet("mlp")
    ref = clone(model)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "gls", shared=model.trunk)
    x, y = model.inputs()
    opt.zero_grad()
    w = opt.backward(model.losses(x, y))
    losses = ref.losses(x, y)
    values = list(losses.values())
    objective = torch.stack(values).prod() ** (1.0 / len(values))
    expected = torch.autograd.grad(objective, list(ref.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-5)
    # w_i = GLS / (K L_i), and Σ w_i L_i = GLS
    detached = torch.stack([v.detach() for v in values])
    torch.testing.assert_close(w, objective.detach() / (3 * detached), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close((w * detached).sum(), objective.detach(), atol=1e-6, rtol=1e-6)
    opt.step()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    losses=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=8),
    scale=st.floats(1e-3, 1e3),
)
def test_weights_formula_and_scale_invariance(losses, scale):
    k = len(losses)
    m = GLS()
    m.bind(tuple(f"t{i}" for i in range(k)))
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    objective = GLS.objective(values)
    (grad,) = torch.autograd.grad(objective, values)
    tasks = tuple(f"t{i}" for i in range(k))
    w = m.weights(StepInputs(tasks, values.detach()))
    torch.testing.assert_close(w, grad, rtol=1e-10, atol=0)
    torch.testing.assert_close(objective, values.detach().prod() ** (1 / k), rtol=1e-10, atol=0)
    scaled = m.weights(StepInputs(tasks, values.detach() * scale))
    torch.testing.assert_close(scaled, w, rtol=1e-10, atol=0)


def test_many_small_losses_do_not_underflow():
    m = GLS()
    tasks = tuple(f"t{i}" for i in range(400))
    m.bind(tasks)
    w = m.weights(StepInputs(tasks, torch.full((400,), 1e-3, dtype=torch.float64)))
    torch.testing.assert_close(w, torch.full((400,), 1 / 400, dtype=torch.float64))


def test_non_positive_loss_names_the_task_and_applies_nothing():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "gls", shared=model.trunk)
    x, y = model.inputs()
    losses = model.losses(x, y)
    losses["t1"] = losses["t1"] * 0.0
    before = snapshot(model)
    with pytest.raises(gb.LossError, match=r"\['t1'\]"):
        opt.backward(losses)
    assert same_snapshot(before, snapshot(model))
