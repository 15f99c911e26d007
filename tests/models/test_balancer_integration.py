"""The zoo's common face drives GradBalancer: parameter-space and representation engines."""

from __future__ import annotations

import pytest
import torch

from gradbalance import GradBalancer, models
from gradbalance.losses import task_loss
from gradbalance.methods import FEATURES, GRAMIAN, Method, StepInputs
from tests.models.helpers import build, inputs, target_for, task_losses


class FeatureOnes(Method):
    """A gradient method on the shared features with all weights one."""

    name = "test-models-feature-ones"
    requires = frozenset({GRAMIAN, FEATURES})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        assert inputs.gramian is not None and inputs.gramian.shape == (inputs.num_tasks,) * 2
        return torch.ones(inputs.num_tasks, dtype=torch.float64)


class ParamOnes(Method):
    name = "test-models-param-ones"
    requires = frozenset({GRAMIAN})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        return torch.ones(inputs.num_tasks, dtype=torch.float64)


def losses_from_features(model, x, z):
    """Task losses computed from the shared features (deep supervision for PAD-Net)."""
    if isinstance(model, models.PADNet):
        outputs = model._decode_all(z, tuple(x.shape[-2:]))
        specs = {**model.tasks, **model.auxiliary}
        targets = {
            t: target_for(s, outputs.initial[t], i) for i, (t, s) in enumerate(specs.items())
        }
        return model.deep_supervision_losses(outputs, targets)
    out = model.decode(z)
    return {
        t: task_loss(s, out[t], target_for(s, out[t], i))
        for i, (t, s) in enumerate(model.tasks.items())
    }


@pytest.mark.parametrize("name", ["split", "multilenet", "pad-net"])
def test_representation_engine_matches_plain_backward(name):
    """With all weights one, the feature-space path gives the plain summed gradient."""
    model = build(name)
    x = inputs(name)
    opt = GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        method=FeatureOnes(),
        shared=model.shared_parameters(),
        engine="representation",
    )
    torch.manual_seed(1)
    z = model.encode(x)
    losses = losses_from_features(model, x, z)
    opt.zero_grad()
    opt.backward(losses, features=z, retain_graph=True)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(losses.values()).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mtan", "cross-stitch", "nddr-cnn", "dense", "mmoe"])
def test_parameter_engine_runs(name):
    model = build(name)
    opt = GradBalancer(
        torch.optim.SGD(model.param_groups(lr=0.01), lr=0.01),
        method=ParamOnes(),
        shared=model.shared_parameters(),
        engine="loop",
    )
    before = [p.detach().clone() for p in model.shared_parameters()]
    opt.zero_grad()
    w = opt.backward(task_losses(model, inputs(name)))
    opt.step()
    assert w.shape == (len(model.tasks),)
    moved = [not torch.equal(b, p) for b, p in zip(before, model.shared_parameters())]
    assert any(moved)
