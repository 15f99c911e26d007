"""FAMO: the weights and the logit update of Liu et al. (2023) on hand-computed examples, the
official code's Adam against torch.optim.Adam, both post-step modes, checkpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import StepInputs
from gradbalance.methods.famo import FAMO
from tests.conftest import MultiHeadNet, clone
from tests.methods.resume import check_resume, train_step

F64 = torch.float64


def make(k: int = 2, **kw) -> FAMO:
    m = FAMO(**kw)
    m.bind(tuple(f"t{i}" for i in range(k)))
    return m


def inputs(losses, step: int = 0) -> StepInputs:
    values = torch.tensor(losses, dtype=F64)
    return StepInputs(tuple(f"t{i}" for i in range(len(losses))), values, step=step)


def test_weights_are_the_normalised_gradient_of_the_weighted_log_losses():
    m = make(3)
    w = m.weights(inputs([1.0, 2.0, 4.0]))
    # z = 1/3 each: w_i = (z_i / L_i) / Σ_j z_j / L_j = (1, ½, ¼) / 1.75
    torch.testing.assert_close(
        w, torch.tensor([1.0, 0.5, 0.25], dtype=F64) / 1.75, atol=1e-7, rtol=0
    )
    # and with logits: Σ w_i ∇L_i = c ∇ Σ z_i log L_i, c = 1 / Σ z_j / L_j
    m.logits.copy_(torch.tensor([0.3, -1.0, 0.5], dtype=F64))
    losses = torch.tensor([1.5, 0.7, 2.0], dtype=F64, requires_grad=True)
    z = torch.softmax(m.logits, 0)
    objective = (z * torch.log(losses)).sum() / (z / losses.detach()).sum()
    (grad,) = torch.autograd.grad(objective, losses)
    torch.testing.assert_close(m.weights(inputs([1.5, 0.7, 2.0])), grad, atol=1e-7, rtol=1e-7)


def test_sgd_logit_update_matches_the_paper_formula_by_hand():
    beta, gamma = 0.1, 0.01
    m = make(2, lr=beta, gamma=gamma, logit_optimizer="sgd")
    m.update(inputs([1.0, 1.0]), m.weights(inputs([1.0, 1.0])))  # the step: L(θ_t) = (1, 1)
    assert m.observe([0.5, 1.0])  # after the step: task 0 halved, task 1 unchanged
    # δ = (log 2, 0); z = (½, ½); J_zᵀδ = z ⊙ (δ − zᵀδ) = (log 2 / 4, −log 2 / 4); ξ_0 = 0
    expected = torch.tensor([-beta * math.log(2) / 4, beta * math.log(2) / 4], dtype=F64)
    torch.testing.assert_close(m.logits, expected, atol=1e-9, rtol=0)
    # the task that improved less now gets the larger share
    assert float(m.task_weights[1]) > 0.5
    # a second step includes the decay term: ξ ← ξ − β(J_zᵀδ + γξ)
    xi = m.logits.clone()
    m.update(inputs([0.5, 1.0]), m.weights(inputs([0.5, 1.0])))
    m.observe([0.5, 0.8])
    z = torch.softmax(xi, 0)
    delta = torch.tensor([0.0, math.log(1.0 / 0.8)], dtype=F64)
    grad = z * (delta - z @ delta)
    torch.testing.assert_close(m.logits, xi - beta * (grad + gamma * xi), atol=1e-9, rtol=0)


def test_adam_logit_update_matches_torch_adam_with_weight_decay():
    m = make(3, lr=0.025, gamma=0.01)
    xi = torch.zeros(3, dtype=F64, requires_grad=True)
    adam = torch.optim.Adam([xi], lr=0.025, weight_decay=0.01)
    sequence = [[1.0, 2.0, 3.0], [0.9, 1.9, 3.1], [0.7, 1.95, 2.5], [0.6, 1.7, 2.6]]
    for before, after in itertools.pairwise(sequence):
        with torch.no_grad():
            grad = m.logit_gradient(
                torch.tensor(before, dtype=F64), torch.tensor(after, dtype=F64), xi
            )
        m.update(inputs(before), m.weights(inputs(before)))
        m.observe(after)
        xi.grad = grad
        adam.step()
        torch.testing.assert_close(m.logits, xi.detach(), atol=1e-12, rtol=0)


def test_default_mode_uses_the_next_steps_losses_and_commits_after_that_step():
    m = make(2, lr=0.1, logit_optimizer="sgd", gamma=0.0)
    m.update(inputs([1.0, 1.0]), m.weights(inputs([1.0, 1.0])))
    nxt = inputs([0.5, 1.0], step=1)
    w = m.weights(nxt)
    # the weights of the next step already use the updated logits ...
    xi = torch.tensor([-0.1 * math.log(2) / 4, 0.1 * math.log(2) / 4], dtype=F64)
    z = torch.softmax(xi, 0)
    expected = (z / torch.tensor([0.5, 1.0], dtype=F64)) / (
        z / torch.tensor([0.5, 1.0], dtype=F64)
    ).sum()
    torch.testing.assert_close(w, expected, atol=1e-7, rtol=0)
    # ... but nothing is committed before update()
    assert torch.equal(m.logits, torch.zeros(2, dtype=F64))
    m.update(nxt, w)
    torch.testing.assert_close(m.logits, xi, atol=1e-9, rtol=0)
    torch.testing.assert_close(m.prev_losses, torch.tensor([0.5, 1.0], dtype=F64))


def test_observe_without_a_step_warns_and_bad_inputs_raise():
    m = make(2)
    with pytest.warns(RuntimeWarning, match="no step was applied"):
        assert not m.observe([1.0, 1.0])
    m.update(inputs([1.0, 1.0]), m.weights(inputs([1.0, 1.0])))
    with pytest.raises(ValueError, match="expected"):
        m.observe({"t0": 1.0, "x": 2.0})
    with pytest.raises(ValueError, match="non-finite"):
        m.observe([math.nan, 1.0])
    assert m.observe({"t1": torch.tensor(0.9), "t0": torch.tensor(0.8)})
    with pytest.raises(gb.LossError, match="t1"):
        make(2, min_losses=[0.0, 2.0]).weights(inputs([1.0, 1.0]))
    with pytest.raises(ValueError, match="logit_optimizer"):
        FAMO(logit_optimizer="rmsprop")


def test_min_losses_shift_the_log():
    m = make(2, min_losses={"t0": 0.5, "t1": 0.0})
    w = m.weights(inputs([1.0, 1.0]))
    inv = torch.tensor([1 / 0.5, 1 / 1.0], dtype=F64)
    torch.testing.assert_close(w, inv / inv.sum(), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------- through GradBalancer
def make_opt(model, **kw):
    return gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.05), "famo", shared=model.trunk, **kw
    )


def test_balancer_gradient_is_that_of_the_weighted_losses_and_exact_mode_runs():
    model = MultiHeadNet("mlp")
    ref = clone(model)
    opt = make_opt(model)
    x, y = model.inputs()
    opt.zero_grad()
    w = opt.backward(model.losses(x, y))
    losses = ref.losses(x, y)
    values = torch.stack([v.detach().double() for v in losses.values()])
    inv = 1.0 / (values + 1e-8)
    torch.testing.assert_close(w.double(), inv / inv.sum(), atol=1e-6, rtol=1e-6)
    objective = sum(float(wi) * v for wi, v in zip(w, losses.values()))
    expected = torch.autograd.grad(objective, list(ref.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-5)
    opt.step()
    with torch.no_grad():
        assert opt.method.observe(model.losses(x, y))
    assert not bool(opt.method.has_prev)
    assert not torch.equal(opt.method.logits, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("exact", [False, True])
def test_checkpoint_resumes_identically(exact):
    def step(opt, model, t):
        weights = train_step(opt, model, t, batch=8)
        if exact:
            x, y = model.inputs(seed=t)
            with torch.no_grad():
                opt.method.observe(model.losses(x, y))
        return weights

    run = check_resume(
        lambda model, seed: make_opt(model),
        steps=5,
        make_model=lambda seed: MultiHeadNet("mlp", seed=seed),
        step=step,
    )
    assert torch.equal(run.reference.method.logits, run.resumed.method.logits)


def test_balancer_observe_forwards_to_the_method():
    models = [MultiHeadNet("mlp"), MultiHeadNet("mlp")]
    opts = [make_opt(m) for m in models]
    x, y = models[0].inputs(seed=1)
    for i, (model, opt) in enumerate(zip(models, opts)):
        train_step(opt, model, 1, batch=8)
        with torch.no_grad():
            after = model.losses(x, y)
        if i == 0:
            opt.observe(after)
        else:
            assert opt.method.observe(after)
    assert not bool(opts[0].method.has_prev)
    assert torch.equal(opts[0].method.logits, opts[1].method.logits)
    assert not torch.equal(opts[0].method.logits, torch.zeros(3, dtype=F64))
