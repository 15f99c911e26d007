"""The chained engine: K head backwards to the features, one vmapped backward through the trunk.

It must give the loop engine's Jacobian exactly (up to rounding), fall back where the heads reach
shared parameters other than through the features, and be what ``engine="auto"`` picks when
features are passed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance import engine
from tests.conftest import GramianFixed, MultiHeadNet


def _rows_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "conv", "convbn"])
@pytest.mark.parametrize("batched", [True, False])
def test_chained_matches_loop(kind, batched):
    model = MultiHeadNet(kind)
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    losses = list(losses.values())
    shared, heads = list(model.trunk.parameters()), list(model.heads.parameters())
    ref = engine.task_gradients(losses, shared, heads, strategy="loop", retain_graph=True)
    tg = engine.chained_gradients(losses, [z], shared, heads, retain_graph=True, batched=batched)
    assert tg is not None
    _rows_close(tg.rows, ref.rows)
    _rows_close(tg.others, ref.others)
    assert tg.task_reached == [True, True, True]
    torch.testing.assert_close(
        engine.gramian(tg.rows, 3), engine.gramian(ref.rows, 3), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("batched", [True, False])
def test_chained_matches_loop_with_many_shared_tensors(batched):
    # 24 shared tensors: the rows are held as one (K, P) matrix (engine.result.FLAT_MIN_TENSORS)
    torch.manual_seed(0)
    trunk = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(12)])
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(3))
    x = torch.randn(5, 4)
    z = trunk(x)
    losses = [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]
    shared, others = list(trunk.parameters()), list(heads.parameters())
    assert len(shared) >= engine.result.FLAT_MIN_TENSORS
    ref = engine.task_gradients(losses, shared, others, strategy="loop", retain_graph=True)
    tg = engine.chained_gradients(losses, [z], shared, others, retain_graph=True, batched=batched)
    assert tg is not None and tg.flat is not None
    _rows_close(tg.rows, ref.rows)
    _rows_close(tg.others, ref.others)
    torch.testing.assert_close(tg.gramian(3), ref.gramian(3), rtol=1e-6, atol=1e-10)
    w = torch.tensor([0.3, 0.5, 0.2])
    _rows_close(tg.combine(w), engine.combine(ref.rows, w))


def test_chained_refuses_heads_that_read_shared_parameters_directly():
    model = MultiHeadNet("mlp")
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    first = model.trunk[0].weight
    tied = [losses["t0"] + first.pow(2).sum(), losses["t1"], losses["t2"]]
    shared = list(model.trunk.parameters())
    assert not engine.heads_reach_shared_only_through(tied, [z], shared)
    assert engine.chained_gradients(tied, [z], shared) is None
    assert engine.heads_reach_shared_only_through(list(losses.values()), [z], shared)


def test_chained_other_parameters_upstream_of_the_features():
    # the first trunk layer is left out of shared=: its gradient flows only through z, and
    # task 0 also reads it directly
    model = MultiHeadNet("mlp")
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    first = list(model.trunk[0].parameters())
    losses = [losses["t0"] + 0.1 * first[0].sum(), losses["t1"], losses["t2"]]
    shared = list(model.trunk[2].parameters())
    others = [*first, *model.heads.parameters()]
    ref = engine.task_gradients(losses, shared, others, strategy="loop", retain_graph=True)
    tg = engine.chained_gradients(losses, [z], shared, others, retain_graph=True)
    assert tg is not None
    _rows_close(tg.rows, ref.rows)
    _rows_close(tg.others, ref.others)


def _run(model, engine_name, steps=3, features=True, method=None):
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        method=method or gb.methods.get("mgda"),
        shared=model.trunk,
        engine=engine_name,
    )
    for step in range(steps):
        x, y = model.inputs(seed=step)
        losses, z = model.losses(x, y, features=True)
        opt.zero_grad()
        opt.backward(losses, features=z if features else None)
        opt.step()
    return opt


@pytest.mark.parametrize("kind", ["mlp", "convbn"])
def test_balancer_chained_matches_loop(kind):
    base = MultiHeadNet(kind)
    loop, chained, auto = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    opt_loop = _run(loop, "loop")
    opt_chained = _run(chained, "chained")
    opt_auto = _run(auto, "auto")
    assert opt_loop.engine == "loop"
    assert opt_chained.engine == "chained"
    assert opt_auto.engine == "chained"
    torch.testing.assert_close(
        opt_chained.last_gramian, opt_loop.last_gramian, rtol=1e-5, atol=1e-8
    )
    for a, b, c in zip(loop.parameters(), chained.parameters(), auto.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def test_auto_without_features_uses_the_loop_on_cpu():
    opt = _run(MultiHeadNet("mlp"), "auto", steps=1, features=False)
    assert opt.engine == "loop"


def test_chained_falls_back_to_the_loop_when_heads_read_the_trunk(caplog):
    class Tied(MultiHeadNet):
        def losses(self, x, y, features=False):
            out, z = super().losses(x, y, features=True)
            out["t1"] = out["t1"] + 0.01 * self.trunk[0].weight.pow(2).sum()
            return (out, z) if features else out

    base = Tied("mlp")
    loop, chained = copy.deepcopy(base), copy.deepcopy(base)
    _run(loop, "loop")
    with caplog.at_level("WARNING", logger="gradbalance.engine"):
        opt = _run(chained, "chained")
    assert opt.engine == "loop"
    assert "chained" in caplog.text
    for a, b in zip(loop.parameters(), chained.parameters()):
        torch.testing.assert_close(b, a)


def test_chained_engine_needs_features_and_a_gradient_method():
    model = MultiHeadNet("mlp")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss weighting"):
        gb.GradBalancer(sgd, "equal", shared=model.trunk, engine="chained")
    opt = gb.GradBalancer(sgd, GramianFixed([1.0, 1.0, 1.0]), shared=model.trunk, engine="chained")
    x, y = model.inputs()
    with pytest.raises(gb.MissingInputError, match="features"):
        opt.backward(model.losses(x, y))


def test_auto_ignores_unusable_features():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared=model.trunk, engine="auto"
    )
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    opt.backward(losses, features=z.detach())
    assert opt.engine == "loop"


def test_chained_with_two_feature_tensors():
    torch.manual_seed(0)
    trunk = nn.Linear(4, 6)
    heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    x = torch.randn(5, 4)
    z = trunk(x)
    za, zb = z[:, :3].tanh(), z[:, 3:].sigmoid()
    losses = [heads[0](za).pow(2).mean(), (heads[1](zb) + heads[1](za)).abs().mean()]
    shared = list(trunk.parameters())
    ref = engine.task_gradients(
        losses, shared, list(heads.parameters()), strategy="loop", retain_graph=True
    )
    tg = engine.chained_gradients(losses, [za, zb], shared, list(heads.parameters()))
    assert tg is not None
    _rows_close(tg.rows, ref.rows)
    _rows_close(tg.others, ref.others)


def test_chained_with_heads_sharing_a_node_above_the_features():
    torch.manual_seed(0)
    w = torch.randn(3, 3, requires_grad=True)
    h = torch.randn(3, requires_grad=True)
    x = torch.randn(4, 3)

    def losses():
        z = (x @ w).tanh()
        common = (z * h).sin()  # read by both losses: its buffers must survive the first
        return [common.pow(2).sum(), common.exp().sum()], z

    ls, z = losses()
    tg = engine.chained_gradients(ls, [z], [w], [h])
    assert tg is not None
    ls, _ = losses()
    ref = engine.task_gradients(ls, [w], [h], strategy="loop")
    _rows_close(tg.rows, ref.rows)
    _rows_close(tg.others, ref.others)


def test_state_dict_keeps_the_timed_trunk_choice():
    model = MultiHeadNet("mlp")
    opt = _run(model, "auto", steps=4)
    assert opt.engine == "chained"
    saved = opt.state_dict()["gradbalance"]["balancer"]
    assert saved["chained_trunk"] in ("vmapped", "looped")
    clone = copy.deepcopy(model)
    fresh = gb.GradBalancer(
        torch.optim.SGD(clone.parameters(), lr=0.05),
        method=gb.methods.get("mgda"),
        shared=clone.trunk,
    )
    fresh.load_state_dict(opt.state_dict())
    assert fresh.engine == "chained"
    assert fresh.state_dict()["gradbalance"]["balancer"]["chained_trunk"] == saved["chained_trunk"]


def test_deterministic_mode_skips_the_timing_and_keeps_the_vmapped_trunk():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.01), method="mgda", shared=model.trunk
    )
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for seed in range(4):
            x, y = model.inputs(seed=seed)
            losses, z = model.losses(x, y, features=True)
            opt.zero_grad()
            opt.backward(losses, features=z)
            opt.step()
    finally:
        torch.use_deterministic_algorithms(before)
    assert opt.engine == "chained"
    assert opt._engines.chained_batched is True
    assert opt._engines.chained_timing is None
