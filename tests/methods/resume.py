"""The one resume check every stateful method's test file runs: `check_resume`.

A run of ``steps`` training steps in one go is the reference; a second run stops after
``split`` steps, saves the model's and the balancer's ``state_dict`` (through ``torch.save`` /
``torch.load(weights_only=True)``), loads them into a fresh model (other initial values) and a
fresh balancer (its method built with another seed), and trains the remaining steps. Weights of
every step, final parameters and the method's tensor state must agree bit for bit.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import gradbalance as gb
from tests.conftest import MultiHeadNet
from tests.methods.jacobians import make_net

#: ``make_opt(model, seed)``: a balancer for ``model``; ``seed`` seeds the method (0 for the
#: reference runs, 1 for the fresh balancer the checkpoint is loaded into).
MakeOpt = Callable[[MultiHeadNet, int], gb.GradBalancer]
#: ``step(opt, model, t)``: one training step on batch ``t``; returns the weights it used.
Step = Callable[[gb.GradBalancer, MultiHeadNet, int], Tensor]


def train_step(
    opt: gb.GradBalancer, model: MultiHeadNet, t: int, *, batch: int = 16, **backward: Any
) -> Tensor:
    """One step on the batch ``t`` (inputs in the model's dtype); ``backward`` goes to
    ``opt.backward``. Returns a copy of the weights."""
    x, y = model.inputs(batch=batch, seed=t)
    dtype = next(model.parameters()).dtype
    opt.zero_grad()
    weights = opt.backward(model.losses(x.to(dtype), y.to(dtype)), **backward).clone()
    opt.step()
    return weights


def roundtrip(state: Any) -> Any:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def method_state(method: gb.methods.Method) -> dict[str, Tensor]:
    """Copies of the tensors of the method's ``state_dict``."""
    return {k: v.detach().clone() for k, v in method.state_dict().items() if torch.is_tensor(v)}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Whether two `method_state` results have the same keys and equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class Resumed:
    """What `check_resume` ran, for checks of a particular method."""

    #: the uninterrupted run's balancer and model, after ``steps`` steps
    reference: gb.GradBalancer
    reference_model: MultiHeadNet
    #: the balancer and model the checkpoint was loaded into, after ``steps`` steps
    resumed: gb.GradBalancer
    resumed_model: MultiHeadNet
    #: the balancer's ``state_dict`` saved after ``split`` steps (as loaded back)
    checkpoint: dict[str, Any]
    #: `method_state` of the interrupted run's method when it was saved
    split_state: dict[str, Tensor]


def check_resume(
    make_opt: MakeOpt,
    *,
    steps: int = 6,
    split: int = 3,
    make_model: Callable[[int], MultiHeadNet] = make_net,
    step: Step = train_step,
) -> Resumed:
    """Train ``steps`` steps in one go, and ``split`` steps + save + load into a fresh model
    and balancer + the rest: the weights of every step, the final parameters and the method's
    tensor state (same keys, equal values) are identical. The fresh model has other initial
    values and the fresh method another seed, so only the loaded state can make them agree."""
    assert 0 < split < steps
    model = make_model(0)
    opt = make_opt(model, 0)
    straight = [step(opt, model, t) for t in range(steps)]

    first_model = make_model(0)
    first = make_opt(first_model, 0)
    before = [step(first, first_model, t) for t in range(split)]
    saved_model = copy.deepcopy(first_model.state_dict())
    checkpoint = roundtrip(first.state_dict())
    split_state = method_state(first.method)

    fresh_model = make_model(123)
    fresh_model.load_state_dict(saved_model)
    fresh = make_opt(fresh_model, 1)
    fresh.load_state_dict(checkpoint)
    after = [step(fresh, fresh_model, t) for t in range(split, steps)]

    for t, (a, b) in enumerate(zip(straight, before + after)):
        assert torch.equal(a, b), (t, a, b)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    expected, got = method_state(opt.method), method_state(fresh.method)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
    return Resumed(opt, model, fresh, fresh_model, checkpoint, split_state)
