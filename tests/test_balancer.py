"""Conformance of GradBalancer with torch.optim: equal == plain optimizer, schedulers, hooks,
checkpoints, zero_grad, closures."""

from __future__ import annotations

import io

import pytest
import torch

import gradbalance as gb
from tests.conftest import GramianFixed, GramianOnes, MultiHeadNet, clone

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
}


def run_plain(model, make_opt, steps, sched=None):
    opt = make_opt(model.parameters())
    s = sched(opt) if sched else None
    for t in range(steps):
        x, y = model.inputs(seed=t)
        opt.zero_grad()
        sum(model.losses(x, y).values()).backward()
        opt.step()
        if s:
            s.step()
    return opt


def run_balanced(model, make_opt, steps, method="equal", sched=None, **kw):
    opt = gb.GradBalancer(
        make_opt(model.parameters()), method=method, shared=model.trunk.parameters(), **kw
    )
    s = sched(opt) if sched else None
    for t in range(steps):
        x, y = model.inputs(seed=t)
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        opt.step()
        if s:
            s.step()
    return opt


def assert_same_params(a, b, atol=1e-6):
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=na)


def test_is_a_real_optimizer():
    model = MultiHeadNet()
    inner = torch.optim.Adam(model.parameters())
    opt = gb.GradBalancer(inner, shared=model.trunk)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["mlp", "convbn"])
def test_equal_matches_plain_optimizer(name, kind):
    base = MultiHeadNet(kind)
    plain, balanced = clone(base), clone(base)
    run_plain(plain, OPTIMIZERS[name], 6)
    run_balanced(balanced, OPTIMIZERS[name], 6)
    assert_same_params(plain, balanced)


@pytest.mark.parametrize("engine", ["loop", "batched", "auto"])
@pytest.mark.parametrize("kind", ["mlp", "conv", "convbn"])
def test_gradient_path_with_unit_weights_matches_plain(engine, kind):
    base = MultiHeadNet(kind)
    plain, balanced = clone(base), clone(base)
    run_plain(plain, OPTIMIZERS["adam"], 4)
    run_balanced(balanced, OPTIMIZERS["adam"], 4, method=GramianOnes(), engine=engine)
    assert_same_params(plain, balanced, atol=1e-5)


def test_task_specific_parameters_get_their_own_unweighted_gradient():
    model = MultiHeadNet("mlp", num_tasks=2)
    ref = clone(model)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method=GramianFixed([0.3, 0.7]),
        shared=model.trunk,
    )
    x, y = model.inputs()
    opt.zero_grad()
    w = opt.backward(model.losses(x, y))
    assert w.tolist() == pytest.approx([0.3, 0.7])
    losses = ref.losses(x, y)
    g0 = torch.autograd.grad(
        losses["t0"], list(ref.parameters()), retain_graph=True, allow_unused=True
    )
    g1 = torch.autograd.grad(losses["t1"], list(ref.parameters()), allow_unused=True)
    n_trunk = len(list(ref.trunk.parameters()))
    for i, p in enumerate(model.parameters()):
        a = torch.zeros_like(p) if g0[i] is None else g0[i]
        b = torch.zeros_like(p) if g1[i] is None else g1[i]
        expected = 0.3 * a + 0.7 * b if i < n_trunk else a + b
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)


def test_weights_follow_the_dict_order_of_the_call():
    model = MultiHeadNet("mlp", num_tasks=2)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="fixed",
        weights={"t0": 1.0, "t1": 2.0},
        shared=model.trunk,
    )
    x, y = model.inputs()
    losses = model.losses(x, y)
    assert opt.backward(losses).tolist() == [1.0, 2.0]
    opt.zero_grad()
    losses = model.losses(x, y)
    assert opt.backward({"t1": losses["t1"], "t0": losses["t0"]}).tolist() == [2.0, 1.0]
    assert opt.tasks == ["t0", "t1"]


def test_schedulers_change_the_inner_lr():
    model = MultiHeadNet()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = gb.GradBalancer(inner, shared=model.trunk)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    lrs = []
    for t in range(5):
        x, y = model.inputs(seed=t)
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        opt.step()
        sched.step()
        lrs.append(inner.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_scheduled_training_matches_plain():
    base = MultiHeadNet()
    plain, balanced = clone(base), clone(base)
    sched = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)  # noqa: E731
    run_plain(plain, OPTIMIZERS["sgd-momentum"], 5, sched)
    run_balanced(balanced, OPTIMIZERS["sgd-momentum"], 5, sched=sched)
    assert_same_params(plain, balanced)


def test_gradient_clipping_between_backward_and_step():
    base = MultiHeadNet()
    plain, balanced = clone(base), clone(base)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.5)
    opt_b = gb.GradBalancer(torch.optim.SGD(balanced.parameters(), lr=0.5), shared=balanced.trunk)
    x, y = base.inputs()
    opt_p.zero_grad()
    sum(plain.losses(x, y).values()).backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
    opt_p.step()
    opt_b.zero_grad()
    opt_b.backward(balanced.losses(x, y))
    torch.nn.utils.clip_grad_norm_(balanced.parameters(), 0.1)
    opt_b.step()
    assert_same_params(plain, balanced)


@pytest.mark.parametrize("method", ["equal", "gramian"])
def test_save_and_load_into_fresh_objects_continues_identically(method):
    base = MultiHeadNet("convbn")

    def make(model):
        m = "equal" if method == "equal" else GramianFixed([0.5, 1.0, 2.0])
        opt = gb.GradBalancer(
            torch.optim.AdamW(model.parameters(), lr=1e-2), method=m, shared=model.trunk
        )
        return opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)

    def train(model, opt, sched, steps, start):
        for t in range(start, start + steps):
            x, y = model.inputs(seed=t)
            opt.zero_grad()
            opt.backward(model.losses(x, y))
            opt.step()
            sched.step()

    straight = clone(base)
    opt, sched = make(straight)
    train(straight, opt, sched, 6, 0)

    first = clone(base)
    opt1, sched1 = make(first)
    train(first, opt1, sched1, 3, 0)
    buf = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = MultiHeadNet("convbn", seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.steps == 3
    train(resumed, opt2, sched2, 3, 3)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    if method == "gramian":
        assert int(opt2.method.updates) == 6


def test_state_shared_after_load_state_dict():
    model = MultiHeadNet()
    opt = gb.GradBalancer(torch.optim.Adam(model.parameters()), shared=model.trunk)
    x, y = model.inputs()
    opt.backward(model.losses(x, y))
    opt.step()
    sd = opt.state_dict()
    fresh = gb.GradBalancer(torch.optim.Adam(model.parameters()), shared=model.trunk)
    fresh.load_state_dict(sd)
    assert fresh.state is fresh.optimizer.state
    assert fresh.param_groups is fresh.optimizer.param_groups
    assert len(fresh.state) == len(list(model.parameters()))
    assert fresh.tasks == ["t0", "t1", "t2"]


def test_load_rejects_a_different_method():
    model = MultiHeadNet()
    opt = gb.GradBalancer(torch.optim.Adam(model.parameters()), shared=model.trunk)
    other = gb.GradBalancer(torch.optim.Adam(model.parameters()), method="mean", shared=model.trunk)
    with pytest.raises(ValueError, match="equal"):
        other.load_state_dict(opt.state_dict())


def test_step_hooks_fire_and_add_param_group_delegates():
    model = MultiHeadNet()
    extra = torch.nn.Parameter(torch.zeros(3))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = gb.GradBalancer(inner, shared=model.trunk)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    inner.register_step_post_hook(lambda o, a, k: calls.append("inner-post"))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["params"][0] is extra
    x, y = model.inputs()
    opt.backward(model.losses(x, y))
    opt.step()
    assert calls == ["pre", "inner-post", "post"]


def test_zero_grad_and_unused_parameters_stay_none():
    model = MultiHeadNet()
    unused = torch.nn.Linear(3, 3)
    params = [*model.parameters(), *unused.parameters()]
    opt = gb.GradBalancer(torch.optim.SGD(params, lr=0.1), method=GramianOnes(), shared=model.trunk)
    x, y = model.inputs()
    opt.backward(model.losses(x, y))
    assert all(p.grad is None for p in unused.parameters())
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.backward(model.losses(x, y))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_backward_accumulates_like_tensor_backward():
    base = MultiHeadNet()
    a, b = clone(base), clone(base)
    opt = gb.GradBalancer(torch.optim.SGD(b.parameters(), lr=0.1), shared=b.trunk)
    x, y = base.inputs()
    for _ in range(2):
        sum(a.losses(x, y).values()).backward()
        opt.backward(b.losses(x, y))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_closure():
    model = MultiHeadNet()
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), shared=model.trunk)
    x, y = model.inputs()

    def closure():
        opt.zero_grad()
        losses = model.losses(x, y)
        opt.backward(losses)
        return sum(losses.values())

    before = closure().item()
    for _ in range(5):
        opt.step(closure)
    assert closure().item() < before


def test_methods_registry():
    names = gb.methods.available()
    assert {"equal", "mean", "fixed"} <= set(names)
    assert isinstance(gb.methods.get("EQUAL"), gb.methods.Equal)
    with pytest.raises(ValueError, match="available methods"):
        gb.methods.get("nope")


def test_mean_and_fixed_weights():
    base = MultiHeadNet()
    a, b = clone(base), clone(base)
    x, y = base.inputs()
    opt_a = gb.GradBalancer(torch.optim.SGD(a.parameters(), lr=0.1), method="mean")
    opt_b = gb.GradBalancer(
        torch.optim.SGD(b.parameters(), lr=0.1), method="fixed", weights=[1 / 3] * 3
    )
    assert opt_a.backward(a.losses(x, y)).tolist() == pytest.approx([1 / 3] * 3)
    opt_b.backward(b.losses(x, y))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    with pytest.raises(ValueError, match="2 entries"):
        gb.GradBalancer(
            torch.optim.SGD(a.parameters(), lr=0.1),
            method="fixed",
            weights=[1.0, 2.0],
            tasks=["a", "b", "c"],
        )
