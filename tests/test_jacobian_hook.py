"""Methods that read the task gradients themselves (``JACOBIAN``) and build the update."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import GRAMIAN, JACOBIAN, Method, StepInputs
from tests.conftest import GramianOnes, JacobianOnes, MultiHeadNet, clone


class FirstTaskOnly(Method):
    """An update that is not ``Jᵀw`` for the reported weights: task 0's gradient only."""

    name = "test-first-task-only"
    requires = frozenset({GRAMIAN, JACOBIAN})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        return torch.ones(inputs.num_tasks, dtype=torch.float64)

    def combine(self, inputs, weights):
        return [None if r is None else r[0].clone() for r in inputs.jacobian]


class BadShape(FirstTaskOnly):
    name = "test-bad-shape"

    def combine(self, inputs, weights):
        return [None if r is None else r.clone() for r in inputs.jacobian]


def _grads(model, method, scaler=None):
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method, shared=model.trunk)
    x, y = model.inputs()
    opt.zero_grad()
    opt.backward(model.losses(x, y), scaler=scaler)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_default_combine_matches_gramian_path():
    model = MultiHeadNet("mlp")
    a = _grads(model, JacobianOnes())
    b = _grads(clone(model), GramianOnes())
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n])


def test_custom_combine_writes_its_update_on_the_shared_parameters():
    model = MultiHeadNet("mlp")
    got = _grads(model, FirstTaskOnly())
    ref = clone(model)
    x, y = ref.inputs()
    ref.losses(x, y)["t0"].backward()
    for n, p in ref.trunk.named_parameters():
        torch.testing.assert_close(got[f"trunk.{n}"], p.grad)
    # heads still get their own task's gradient
    assert "heads.1.weight" in got


def test_custom_combine_under_grad_scaler_is_unscaled_by_the_scaler():
    model = MultiHeadNet("mlp")
    plain = _grads(clone(model), FirstTaskOnly())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled = _grads(model, FirstTaskOnly(), scaler=scaler)
    for n in plain:
        torch.testing.assert_close(scaled[n] / 2.0**8, plain[n])


def test_wrong_shape_from_combine_raises_before_writing():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), BadShape(), shared=model.trunk
    )
    x, y = model.inputs()
    with pytest.raises(gb.SolverError, match="test-bad-shape"):
        opt.backward(model.losses(x, y))
    assert all(p.grad is None for p in model.parameters())
