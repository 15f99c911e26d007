"""What is shared: per-step resolution under freezing, ``shared="auto"``, the default last shared
layer, losses that reach nothing, and errors that name the right task and parameter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.methods import LAST_SHARED_GRAMIAN
from tests.conftest import GramianFixed, MultiHeadNet, same_snapshot, snapshot


def batch(model, seed=0):
    x, y = model.inputs(seed=seed)
    return model.losses(x, y)


def run(opt, model, steps=2, seed=0):
    for s in range(steps):
        opt.zero_grad()
        opt.backward(batch(model, seed + s))
        opt.step()


# ---------------------------------------------------------------- item 1: freezing schedules
def test_shared_parameters_unfrozen_after_construction_are_balanced():
    model = MultiHeadNet("mlp")
    ref_model = copy.deepcopy(model)
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        GramianFixed([1.0, 0.0, 0.0]),
        shared=model.trunk,
    )
    ref = gb.GradBalancer(
        torch.optim.SGD(ref_model.parameters(), lr=0.1),
        GramianFixed([1.0, 0.0, 0.0]),
        shared=ref_model.trunk,
    )
    assert opt.shared_parameters == []  # frozen: nothing to balance yet
    for p in model.trunk.parameters():  # the usual fine-tuning schedule: unfreeze later
        p.requires_grad_(True)
    assert len(opt.shared_parameters) == 4
    for o, m in ((opt, model), (ref, ref_model)):
        o.zero_grad()
        o.backward(batch(m))
    for p, q in zip(model.trunk.parameters(), ref_model.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # with weights [1, 0, 0] the trunk gets task t0's gradient only, not the sum of all three
    losses = batch(model)
    g0 = torch.autograd.grad(losses["t0"], list(model.trunk.parameters()), retain_graph=True)
    for p, g in zip(model.trunk.parameters(), g0):
        torch.testing.assert_close(p.grad, g)


def test_freezing_a_shared_parameter_mid_run_drops_it_from_the_shared_set():
    model = MultiHeadNet("mlp")
    ref_model = copy.deepcopy(model)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared=model.trunk)
    run(opt, model, steps=1)
    first = model.trunk[0]
    for p in first.parameters():
        p.requires_grad_(False)
    ref_first = ref_model.trunk[0]
    for p in ref_first.parameters():
        p.requires_grad_(False)
    # the reference was built after freezing, on the remaining shared layer
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref_model.parameters()):
            q.copy_(p)
    ref = gb.GradBalancer(
        torch.optim.SGD(ref_model.parameters(), lr=0.1), "mgda", shared=ref_model.trunk[2]
    )
    for o, m in ((opt, model), (ref, ref_model)):
        o.zero_grad()
        o.backward(batch(m, 5))
    assert first.weight.grad is None
    assert len(opt.shared_parameters) == 2
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad)
    opt.step()


def test_frozen_shared_parameter_outside_the_optimizer_is_accepted_until_unfrozen():
    model = MultiHeadNet("mlp")
    model.trunk[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = gb.GradBalancer(torch.optim.SGD(trainable, lr=0.1), "mgda", shared=model.trunk)
    run(opt, model, steps=1)
    model.trunk[0].weight.requires_grad_(True)
    with pytest.raises(gb.OptionError, match="not in the inner optimizer"):
        opt.backward(batch(model))


# ---------------------------------------------------------------- item 2: shared="auto"
def test_shared_auto_finds_the_trunk_of_a_hard_sharing_model():
    model = MultiHeadNet("conv")
    ref_model = copy.deepcopy(model)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared="auto")
    ref = gb.GradBalancer(
        torch.optim.SGD(ref_model.parameters(), lr=0.1), "mgda", shared=ref_model.trunk
    )
    assert opt.shared_parameters == []  # resolved on the first backward
    run(opt, model, steps=2)
    run(ref, ref_model, steps=2)
    assert [id(p) for p in opt.shared_parameters] == [id(p) for p in model.trunk.parameters()]
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)


def test_shared_auto_follows_the_requires_grad_pattern():
    model = MultiHeadNet("mlp")
    for p in model.trunk[0].parameters():
        p.requires_grad_(False)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared="auto")
    run(opt, model, steps=1)
    assert [id(p) for p in opt.shared_parameters] == [id(p) for p in model.trunk[2].parameters()]
    for p in model.trunk[0].parameters():
        p.requires_grad_(True)
    run(opt, model, steps=1, seed=3)
    assert [id(p) for p in opt.shared_parameters] == [id(p) for p in model.trunk.parameters()]


class TwoColumns(nn.Module):
    """Two task columns mixed by one cross-stitch-like unit: every column reaches both tasks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a1, self.b1 = nn.Linear(4, 5), nn.Linear(4, 5)
        self.alpha = nn.Parameter(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
        self.a2, self.b2 = nn.Linear(5, 1), nn.Linear(5, 1)

    def forward(self, x):
        a, b = self.a1(x).tanh(), self.b1(x).tanh()
        ma = self.alpha[0, 0] * a + self.alpha[0, 1] * b
        mb = self.alpha[1, 0] * a + self.alpha[1, 1] * b
        return {"a": self.a2(ma).pow(2).mean(), "b": (self.b2(mb) - 1).pow(2).mean()}


def test_shared_auto_balances_soft_shared_columns():
    model = TwoColumns()
    x = torch.randn(8, 4)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), GramianFixed([1.0, 0.0]), shared="auto"
    )
    opt.zero_grad()
    losses = model(x)
    own = torch.autograd.grad(
        losses["a"], list(model.parameters()), retain_graph=True, allow_unused=True
    )
    opt.backward(losses)
    shared_ids = {id(p) for p in opt.shared_parameters}
    expected = [*model.a1.parameters(), *model.b1.parameters(), model.alpha]
    assert shared_ids == {id(p) for p in expected}
    # weights [1, 0]: column b's first layer gets task a's gradient only (not a's + b's)
    for p, g in zip(model.parameters(), own):
        if id(p) in shared_ids:
            torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(
        model.b2.weight.grad, torch.autograd.grad(model(x)["b"], model.b2.weight)[0]
    )


def test_shared_auto_with_one_task_shares_everything_it_reaches():
    model = MultiHeadNet("mlp", num_tasks=1)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared="auto")
    run(opt, model, steps=1)
    assert len(opt.shared_parameters) == len(list(model.parameters()))


def test_shared_rejects_other_strings():
    model = MultiHeadNet("mlp")
    with pytest.raises(ValueError, match="'auto'"):
        gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared="trunk")


def test_shared_model_uses_the_models_partition_and_last_layer():
    model = gb.models.create("split", {"segmentation": 3, "depth": 1}, width=1 / 16)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.01), "gradnorm", shared=model)
    assert {id(p) for p in opt.shared_parameters} == {id(p) for p in model.shared_parameters()}
    assert [id(p) for p in opt.last_shared_parameters] == [
        id(p) for p in model.last_shared_parameters()
    ]


# ---------------------------------------------------------------- item 3: default last layer
def test_default_last_shared_layer_follows_execution_order_not_parameter_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            # registered last but applied first, then a BatchNorm (1-D) registered after
            self.late = nn.Linear(8, 8)
            self.early = nn.Linear(4, 8)
            self.norm = nn.BatchNorm1d(8)
            self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

        def forward(self, x):
            z = self.norm(self.late(torch.tanh(self.early(x))))
            return {f"t{i}": h(z).pow(2).mean() for i, h in enumerate(self.heads)}

    model = Reordered()
    trunk = [*model.late.parameters(), *model.early.parameters(), *model.norm.parameters()]
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "gradnorm", shared=trunk)
    opt.zero_grad()
    opt.backward(model(torch.randn(6, 4)))
    assert [id(p) for p in opt.last_shared_parameters] == [id(p) for p in model.late.parameters()]


# ---------------------------------------------------------------- item 4: losses reaching nothing
def _dangling_losses(model):
    losses = batch(model)
    losses["t1"] = torch.zeros((), requires_grad=True) * 1.0
    return losses


@pytest.mark.parametrize("method", gb.methods.available())
def test_a_loss_that_reaches_no_parameter_is_refused_by_every_method(method):
    model = MultiHeadNet("mlp")
    kw = {"weights": [1.0, 1.0, 1.0]} if method == "fixed" else {}
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method,
        shared=model.trunk,
        last_shared=model.trunk[2],
        **kw,
    )
    assert LAST_SHARED_GRAMIAN not in opt.method.requires or method == "gradnorm"
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    losses["t1"] = torch.zeros((), requires_grad=True) * 1.0
    before = snapshot(model)
    with pytest.raises(gb.LossError, match=r"'t1'.*reaches no parameter"):
        opt.backward(losses, features=z, kpis=[0.5, 0.5, 0.5])
    assert same_snapshot(before, snapshot(model))
    assert opt.steps == 0


def test_a_leaf_loss_is_refused():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "equal")
    losses = batch(model)
    losses["t2"] = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(gb.LossError, match="'t2'"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())


def test_a_loss_reaching_nothing_on_a_later_step_is_refused():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared=model.trunk)
    run(opt, model, steps=2)
    with pytest.raises(gb.LossError, match="'t1'"):
        opt.backward(_dangling_losses(model))


# ---------------------------------------------------------------- item 5: naming
def test_nonfinite_gradient_of_one_task_names_only_that_task():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared=model.trunk)
    x, y = model.inputs()
    z = model.trunk(x)
    losses = {}
    for i, head in enumerate(model.heads):
        pred = head(z).squeeze(-1)
        if i == 1:  # finite loss, NaN gradient: sqrt at 0
            pred = torch.sqrt(pred * 0.0)
        losses[f"t{i}"] = (pred - y[:, i]).pow(2).mean()
    assert all(math.isfinite(v.item()) for v in losses.values())
    with pytest.raises(gb.NonFiniteError, match=r"task\(s\) \['t1'\]"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())


def _nan_head_losses(model):
    x, _ = model.inputs()
    z = model.trunk(x).detach()  # the trunk's gradient stays finite
    losses = batch(model)
    # t2's head gets a NaN gradient, its loss stays finite
    bad = torch.sqrt(model.heads[2](z).squeeze(-1) * 0.0).mean()
    losses["t2"] = losses["t2"] + bad
    return losses


def test_nonfinite_head_gradient_names_the_parameter_by_name():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.named_parameters(), lr=0.1), "mgda", shared=model.trunk
    )
    with pytest.raises(gb.NonFiniteError, match=r"'heads\.2\.weight'") as info:
        opt.backward(_nan_head_losses(model))
    assert "#" not in str(info.value)


def test_nonfinite_head_gradient_without_names_names_the_task():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared=model.trunk)
    with pytest.raises(gb.NonFiniteError, match=r"task 't2'.*shape \(1, 12\)") as info:
        opt.backward(_nan_head_losses(model))
    assert "#" not in str(info.value)


def test_unreached_shared_parameter_is_named_when_the_shared_module_names_it():
    model = MultiHeadNet("mlp")
    shared = nn.ModuleDict({"body": model.trunk, "dangling": nn.Linear(2, 2)})
    params = [*model.parameters(), *shared.dangling.parameters()]
    opt = gb.GradBalancer(torch.optim.SGD(params, lr=0.1), "mgda", shared=shared)
    with pytest.raises(gb.UnreachedParameterError, match=r"'dangling\.weight'"):
        opt.backward(batch(model))


@pytest.mark.parametrize("method", ["equal", "mgda"])
def test_losses_on_different_devices_are_refused_naming_the_task(method):
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method, shared=model.trunk)
    losses = batch(model)
    losses["t1"] = losses["t1"].to("meta")
    with pytest.raises(gb.LossError, match=r"'t1'.*meta") as info:
        opt.backward(losses)
    assert "cpu" in str(info.value)
    assert all(p.grad is None for p in model.parameters())
