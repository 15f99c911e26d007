"""Bad input raises a specific GradBalanceError before anything is modified."""

from __future__ import annotations

import copy

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import FEATURES, GRAMIAN, KPIS, Method, StepInputs
from tests.conftest import GramianFixed, MultiHeadNet, same_snapshot, snapshot


class NeedsKpis(Method):
    name = "test-needs-kpis"
    requires = frozenset({KPIS})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        return 1.0 - inputs.kpis


class NeedsFeatures(Method):
    name = "test-needs-features"
    requires = frozenset({GRAMIAN, FEATURES})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        return torch.ones(inputs.num_tasks, dtype=torch.float64)


class ReturnsNan(Method):
    name = "test-returns-nan"
    requires = frozenset({GRAMIAN})

    def weights(self, inputs: StepInputs) -> torch.Tensor:
        return torch.full((inputs.num_tasks,), float("nan"), dtype=torch.float64)


def make(method, **kw):
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=0.1), method=method, shared=model.trunk, **kw
    )
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    opt.backward(losses, features=z, kpis=[0.5, 0.5, 0.5])
    opt.step()
    # leave gradients in place, as during gradient accumulation
    losses, z = model.losses(x, y, features=True)
    opt.backward(losses, features=z, kpis=[0.5, 0.5, 0.5])
    return model, opt


def losses_of(model, seed=1):
    x, y = model.inputs(seed=seed)
    return model.losses(x, y, features=True)


def nan_grad_loss(model):
    losses, z = losses_of(model)
    p = model.trunk[0].weight
    losses["t1"] = losses["t1"] + (p - p.detach()).abs().pow(0.5).sum()
    return losses, z


CASES = {
    "too-few-losses": (
        lambda m: (list(losses_of(m)[0].values())[:2], None),
        {},
        gb.TaskMismatchError,
        "2 losses",
    ),
    "unknown-task": (
        lambda m: ({**losses_of(m)[0], "t9": losses_of(m)[0]["t0"]}, None),
        {},
        gb.TaskMismatchError,
        "t9",
    ),
    "missing-task": (
        lambda m: ({"t0": losses_of(m)[0]["t0"]}, None),
        {},
        gb.TaskMismatchError,
        "missing",
    ),
    "non-scalar": (
        lambda m: ({**losses_of(m)[0], "t1": torch.ones(3, requires_grad=True)}, None),
        {},
        gb.LossError,
        "'t1' has shape",
    ),
    "detached": (
        lambda m: ({**losses_of(m)[0], "t2": losses_of(m)[0]["t2"].detach()}, None),
        {},
        gb.LossError,
        "'t2' does not require grad",
    ),
    "python-float": (
        lambda m: ({**losses_of(m)[0], "t0": 1.0}, None),
        {},
        gb.LossError,
        "float, not a tensor",
    ),
    "single-tensor": (lambda m: (losses_of(m)[0]["t0"], None), {}, gb.LossError, "single tensor"),
    "nan-loss": (
        lambda m: ({**losses_of(m)[0], "t2": losses_of(m)[0]["t2"] * float("nan")}, None),
        {},
        gb.NonFiniteError,
        "'t2'",
    ),
    "inf-loss": (
        lambda m: ({**losses_of(m)[0], "t0": losses_of(m)[0]["t0"] + float("inf")}, None),
        {},
        gb.NonFiniteError,
        "'t0'",
    ),
    "nan-gradient": (nan_grad_loss, {}, gb.NonFiniteError, "t1"),
}


@pytest.mark.parametrize("method", ["equal", "gramian"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_and_changes_nothing(case, method):
    build, kwargs, error, match = CASES[case]
    m = "equal" if method == "equal" else GramianFixed([1.0, 2.0, 3.0])
    model, opt = make(m)
    before = snapshot(model)
    inner_state = copy.deepcopy(opt.optimizer.state_dict())
    method_state = copy.deepcopy(opt.method.state_dict())
    losses, _ = build(model)
    if method == "equal" and case == "nan-gradient":
        match = "not finite"
    with pytest.raises(error, match=match):
        opt.backward(losses, **kwargs)
    assert same_snapshot(before, snapshot(model))
    after_state = opt.optimizer.state_dict()
    for k, v in inner_state["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(after_state["state"][k][name]))
    for k, v in method_state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, opt.method.state_dict()[k])


def test_unreached_shared_parameter():
    model = MultiHeadNet("mlp")
    dangling = torch.nn.Linear(2, 2)
    params = [*model.parameters(), *dangling.parameters()]
    opt = gb.GradBalancer(
        torch.optim.SGD(params, lr=0.1),
        method=GramianFixed([1.0] * 3),
        shared=[*model.trunk.parameters(), *dangling.parameters()],
    )
    before = snapshot(model)
    with pytest.raises(gb.UnreachedParameterError, match=r"shared parameter #4 \(shape \(2, 2\)\)"):
        opt.backward(losses_of(model)[0])
    assert same_snapshot(before, snapshot(model))


def test_missing_kpis_and_bad_kpis():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method=NeedsKpis())
    with pytest.raises(gb.MissingInputError, match="kpis="):
        opt.backward(losses_of(model)[0])
    with pytest.raises(gb.MissingInputError, match=r"\['t2'\]"):
        opt.backward(losses_of(model)[0], kpis={"t0": 0.1, "t1": 0.2})
    with pytest.raises(ValueError, match=r"'t1' is 1\.5"):
        opt.backward(losses_of(model)[0], kpis=[0.1, 1.5, 0.3])
    assert all(p.grad is None for p in model.parameters())
    w = opt.backward(losses_of(model)[0], kpis=[0.1, 0.5, 0.9])
    torch.testing.assert_close(w, torch.tensor([0.9, 0.5, 0.1]))


def test_missing_and_detached_features():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), method=NeedsFeatures(), shared=model.trunk
    )
    assert opt.engine == "representation"
    losses, z = losses_of(model)
    with pytest.raises(gb.MissingInputError, match="features="):
        opt.backward(losses)
    with pytest.raises(gb.LossError, match="detached"):
        opt.backward(losses, features=z.detach())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="representation"):
        gb.GradBalancer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            method=NeedsFeatures(),
            shared=model.trunk,
            engine="loop",
        )


def test_method_returning_nan_raises_solver_error():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), method=ReturnsNan(), shared=model.trunk
    )
    with pytest.raises(gb.SolverError, match="non-finite weights"):
        opt.backward(losses_of(model)[0])
    assert all(p.grad is None for p in model.parameters())


def test_constructor_validation():
    model = MultiHeadNet("mlp")
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        gb.GradBalancer(model)
    with pytest.raises(ValueError, match="engine"):
        gb.GradBalancer(inner, engine="fast")
    with pytest.raises(ValueError, match="nonfinite"):
        gb.GradBalancer(inner, nonfinite="zero")
    with pytest.raises(ValueError, match="shared="):
        gb.GradBalancer(inner, method=GramianFixed([1.0]))
    outside = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not in the inner optimizer"):
        gb.GradBalancer(inner, shared=[outside])
    with pytest.raises(ValueError, match="unique"):
        gb.GradBalancer(inner, tasks=["a", "a"])
    with pytest.raises(ValueError, match="unknown method"):
        gb.GradBalancer(inner, method="magic")
    with pytest.raises(TypeError, match="together with a Method"):
        gb.GradBalancer(inner, method=gb.methods.Equal(), weights=[1.0])


@pytest.mark.parametrize("method", ["equal", "gramian"])
def test_nonfinite_skip(method):
    m = "equal" if method == "equal" else GramianFixed([1.0, 2.0, 3.0])
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=0.1), method=m, shared=model.trunk, nonfinite="skip"
    )
    losses, _ = losses_of(model)
    opt.zero_grad()
    opt.backward(losses)
    opt.step()
    before = snapshot(model)
    inner_steps = opt.optimizer.state[model.trunk[0].weight]["step"].clone()
    opt.zero_grad()
    before = snapshot(model)
    losses, _ = losses_of(model, seed=3)
    losses["t1"] = losses["t1"] * float("nan")
    w = opt.backward(losses)
    assert torch.isnan(w).all()
    opt.step()
    assert same_snapshot(before, snapshot(model))
    assert torch.equal(opt.optimizer.state[model.trunk[0].weight]["step"], inner_steps)
    assert opt.skipped_steps == 1 and opt.steps == 1
    if method == "gramian":
        assert int(opt.method.updates) == 1
    opt.zero_grad()
    opt.backward(losses_of(model, seed=4)[0])
    opt.step()
    assert opt.steps == 2


def test_empty_shared_is_told_apart_from_missing_shared():
    import torch.nn as nn

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"pass shared=model\.shared_parameters"):
        gb.GradBalancer(opt, method="mgda")
    with pytest.raises(ValueError, match="holds no parameter"):
        gb.GradBalancer(opt, method="mgda", shared=nn.Sequential())
    with pytest.raises(ValueError, match="holds no parameter"):
        gb.GradBalancer(opt, method="gradnorm", shared=iter([]))
