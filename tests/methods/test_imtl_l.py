"""IMTL-L: the loss transform e^s L − s, its gradients, the param group, convergence of s to
−log L, and checkpoints."""

from __future__ import annotations

import math
from functools import partial

import torch

import gradbalance as gb
from gradbalance.methods import StepInputs
from gradbalance.methods.imtl_l import IMTLL
from tests.conftest import MultiHeadNet, clone
from tests.methods.resume import check_resume, train_step

TASKS = ["t0", "t1", "t2"]


def make_opt(model, inner=None, **kw):
    inner = inner or torch.optim.SGD(model.parameters(), lr=0.1)
    return gb.GradBalancer(inner, "imtl-l", shared=model.trunk, tasks=TASKS, **kw)


def test_transform_and_its_gradients():
    model = MultiHeadNet("mlp")
    ref = clone(model)
    s = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    opt = make_opt(model, init=s.tolist())
    x, y = model.inputs()
    w = opt.backward(model.losses(x, y))
    torch.testing.assert_close(w.double(), s.exp(), atol=1e-6, rtol=1e-6)
    losses = ref.losses(x, y)
    values = torch.stack([v.detach().double() for v in losses.values()])
    # ∂/∂s_i [e^{s_i} L_i − s_i] = e^{s_i} L_i − 1
    expected_s = s.exp() * values - 1.0
    torch.testing.assert_close(
        opt.method.log_scales.grad.double(), expected_s, atol=1e-6, rtol=1e-5
    )
    # the network gets the gradient of Σ e^{s_i} L_i
    objective = sum(math.exp(si) * v for si, v in zip(s.tolist(), losses.values()))
    expected = torch.autograd.grad(objective, list(ref.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-5)


def test_own_param_group_without_weight_decay():
    model = MultiHeadNet("mlp")
    inner = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    opt = make_opt(model, inner=inner, lr=0.5)
    group = inner.param_groups[-1]
    assert group["params"] == [opt.method.log_scales]
    assert group["weight_decay"] == 0.0 and group["lr"] == 0.5


def test_scales_converge_to_the_inverse_losses():
    m = IMTLL()
    m.bind(("a", "b", "c"))
    losses = torch.tensor([0.05, 1.0, 40.0], dtype=torch.float64)
    inputs = StepInputs(("a", "b", "c"), losses)
    sgd = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(600):
        sgd.zero_grad()
        objective = (m.weights(inputs) * losses).sum() + m.extra_loss(inputs)
        objective.backward()
        sgd.step()
    torch.testing.assert_close(
        m.scales.double() * losses, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(m.log_scales.detach().double(), -losses.log(), atol=1e-4, rtol=0)


def test_checkpoint_resumes_identically():
    run = check_resume(
        lambda model, seed: make_opt(model, inner=torch.optim.Adam(model.parameters(), lr=1e-2)),
        steps=5,
        make_model=lambda seed: MultiHeadNet("mlp", seed=seed),
        step=partial(train_step, batch=8),
    )
    assert torch.equal(run.reference.method.log_scales, run.resumed.method.log_scales)
