"""The AMP recipe: autocast forward, GradScaler passed to backward, scaler.step(balancer)."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from tests.conftest import GramianFixed, MultiHeadNet, clone, same_snapshot, snapshot


def amp_losses(model, seed):
    x, y = model.inputs(seed=seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model.losses(x, y)


@pytest.mark.parametrize("method", ["equal", "gramian"])
def test_amp_recipe_matches_plain_amp_training(method):
    base = MultiHeadNet("mlp")
    plain, balanced = clone(base), clone(base)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.05)
    scaler_p = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    m = "equal" if method == "equal" else GramianFixed([1.0, 1.0, 1.0])
    opt_b = gb.GradBalancer(
        torch.optim.SGD(balanced.parameters(), lr=0.05),
        method=m,
        shared=balanced.trunk,
        engine="loop",
    )
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(4):
        opt_p.zero_grad()
        scaler_p.scale(sum(amp_losses(plain, t).values())).backward()
        scaler_p.step(opt_p)
        scaler_p.update()
        opt_b.zero_grad()
        opt_b.backward(amp_losses(balanced, t), scaler=scaler_b)
        scaler_b.step(opt_b)
        scaler_b.update()
    # per-task backwards round in bfloat16 before they are summed: allow bf16-level error
    # (a wrong scale would be off by a factor of 2**10)
    tol = {"atol": 1e-5, "rtol": 1e-4} if method == "equal" else {"atol": 3e-3, "rtol": 2e-2}
    for a, b in zip(plain.parameters(), balanced.parameters()):
        torch.testing.assert_close(a, b, **tol)
    assert scaler_b.get_scale() == scaler_p.get_scale()


def test_gramian_is_unscaled():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        method=GramianFixed([1.0] * 3),
        shared=model.trunk,
    )
    x, y = model.inputs()
    opt.backward(model.losses(x, y))
    reference = opt.last_gramian
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt.backward(model.losses(x, y), scaler=scaler)
    torch.testing.assert_close(opt.last_gramian, reference)


@pytest.mark.parametrize("method", ["equal", "gramian"])
def test_overflow_skips_the_step_and_leaves_method_state(method):
    model = MultiHeadNet("mlp")
    m = "equal" if method == "equal" else GramianFixed([1.0, 2.0, 3.0])
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method=m, shared=model.trunk)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1)
    before = snapshot(model)
    opt.zero_grad()
    huge = {k: v * 1e6 for k, v in amp_losses(model, 0).items()}  # overflows once scaled
    opt.backward(huge, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    params_after = snapshot(model)[0]
    assert all(torch.equal(params_after[n], before[0][n]) for n in params_after)
    assert scaler.get_scale() < 2.0**127
    assert opt.steps == 0
    if method == "gramian":
        assert int(opt.method.updates) == 0
    # the next step with a sane scale goes through and commits the method update
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.zero_grad()
    opt.backward(amp_losses(model, 1), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert not same_snapshot(before, snapshot(model))
    assert opt.steps == 1
    if method == "gramian":
        assert int(opt.method.updates) == 1
