"""Shared fixtures: small multi-task networks with a shared trunk and one head per task.

Hypothesis runs derandomized by default, so a test run (and CI) draws the same examples every
time and cannot go red by chance. To search for new counterexamples, run with random draws:
``HYPOTHESIS_PROFILE=explore python -m pytest tests -q`` (repeat; each run draws afresh).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

try:
    from hypothesis import settings
except ImportError:  # the GPU check's machine may lack Hypothesis: only property tests need it
    settings = None

from gradbalance.methods import GRAMIAN, JACOBIAN, Method, StepInputs

if settings is not None:
    settings.register_profile("deterministic", derandomize=True, print_blob=True)
    settings.register_profile("explore", derandomize=False, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


class MultiHeadNet(nn.Module):
    """A shared trunk and K heads; ``kind`` picks an MLP, a conv net, or a conv net with BN."""

    def __init__(self, kind: str = "mlp", num_tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        if kind == "mlp":
            self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh())
            feat = 12
        else:
            bn = kind == "convbn"
            layers: list[nn.Module] = [nn.Conv2d(2, 6, 3, padding=1, bias=not bn)]
            if kind == "convbn":
                layers.append(nn.BatchNorm2d(6))
            layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=not bn)]
            if kind == "convbn":
                layers.append(nn.BatchNorm2d(8))
            layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
            self.trunk = nn.Sequential(*layers)
            feat = 32
        self.heads = nn.ModuleList(nn.Linear(feat, 1) for _ in range(num_tasks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def inputs(self, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = (batch, 6) if self.kind == "mlp" else (batch, 2, 8, 8)
        x = torch.randn(shape, generator=g)
        y = torch.randn(batch, len(self.heads), generator=g)
        return x, y

    def losses(self, x: torch.Tensor, y: torch.Tensor, features: bool = False):
        z = self.trunk(x)
        out = {}
        for i, head in enumerate(self.heads):
            pred = head(z).squeeze(-1)
            if i % 2 == 0:
                out[f"t{i}"] = (pred - y[:, i]).pow(2).mean()
            else:
                out[f"t{i}"] = (pred - y[:, i]).abs().mean() + 0.1 * pred.pow(2).mean()
        return (out, z) if features else out


class GramianOnes(Method):
    """A gradient method with all weights 1 (used to test the gradient path against `equal`)."""

    name = "test-gramian-ones"
    requires = frozenset({GRAMIAN})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        assert inputs.gramian is not None
        return torch.ones(inputs.num_tasks, dtype=torch.float64)


class JacobianOnes(Method):
    """A method that reads the Jacobian, with the default `combine` (``Jᵀw``) and unit weights:
    its update must match the Gramian path's with the same weights."""

    name = "test-jacobian-ones"
    requires = frozenset({GRAMIAN, JACOBIAN})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        assert inputs.jacobian is not None
        return torch.ones(inputs.num_tasks, dtype=torch.float64)


class GramianFixed(Method):
    """A gradient method with fixed weights, and a counter that `update` bumps."""

    name = "test-gramian-fixed"
    requires = frozenset({GRAMIAN})

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float64)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        return self.w

    def update(self, inputs, weights):
        self.updates += 1


@pytest.fixture(params=["mlp", "conv", "convbn"])
def net(request):
    return MultiHeadNet(request.param)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def snapshot(model: nn.Module):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {
        n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()
    }
    return params, grads


def same_snapshot(a, b) -> bool:
    pa, ga = a
    pb, gb_ = b
    for n in pa:
        if not torch.equal(pa[n], pb[n]):
            return False
        if (ga[n] is None) != (gb_[n] is None):
            return False
        if ga[n] is not None and not torch.equal(ga[n], gb_[n]):
            return False
    return True
