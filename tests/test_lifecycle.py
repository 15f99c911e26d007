"""The balancer's life cycle: repeated backwards, schedulers built early, closures (LBFGS),
atomic checkpoint loading, failed first steps, steps without a backward, sparse gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.errors import GradBalanceError, NonFiniteError, UnreachedParameterError
from tests.conftest import MultiHeadNet

TASKS = ["t0", "t1"]


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_grads_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ga, gb_ in zip(a, b):
        assert (ga is None) == (gb_ is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb_, rtol=0, atol=0)


# ---------------------------------------------------------------------- item 1: double backward
BACKWARD_SETUPS = [
    ("equal", "auto", False),
    ("mgda", "auto", False),
    ("mgda", "loop", False),
    ("mgda", "batched", False),
    ("mgda", "memory", False),
    ("mgda", "auto", True),  # the chained engine (features=)
    ("mgda-ub", "representation", True),
    ("pcgrad", "auto", False),
    ("uncertainty", "auto", False),
    ("gradnorm", "auto", False),
]


@pytest.mark.parametrize("method,engine,features", BACKWARD_SETUPS)
def test_a_second_backward_over_a_consumed_graph_raises_at_every_step(method, engine, features):
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.01), method, shared=model.trunk, engine=engine
    )
    for step in range(3):
        x, y = model.inputs(seed=step)
        opt.zero_grad()
        if features:
            losses, z = model.losses(x, y, features=True)
            kw = {"features": z}
        else:
            losses, kw = model.losses(x, y), {}
        opt.backward(losses, **kw)
        before = grads_of(model)
        with pytest.raises(GradBalanceError, match="retain_graph=True") as info:
            opt.backward(losses, **kw)
        assert isinstance(info.value, RuntimeError)
        assert_grads_equal(grads_of(model), before)
        opt.step()
    assert opt.steps == 3


def test_retain_graph_true_allows_a_second_backward():
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.01), "mgda", shared=model.trunk)
    x, y = model.inputs()
    losses = model.losses(x, y)
    opt.backward(losses, retain_graph=True)
    once = grads_of(model)
    opt.backward(losses)
    for g1, g2 in zip(once, grads_of(model)):
        if g1 is not None:
            torch.testing.assert_close(g2, 2 * g1)


# ---------------------------------------------------------------------- item 2: schedulers
SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=8),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2),
}


@pytest.mark.parametrize("method", ["uncertainty", "imtl-l"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("how", ["tasks", "bound"])
def test_schedulers_built_before_the_first_backward(method, sched, how):
    model = MultiHeadNet(num_tasks=2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    if how == "tasks":
        opt = gb.GradBalancer(inner, method, tasks=TASKS)
    else:
        m = gb.methods.get(method)
        m.bind(tuple(TASKS))
        opt = gb.GradBalancer(inner, m)
    assert len(opt.param_groups) == 2  # the learnable scales' group exists already
    scheduler = SCHEDULERS[sched](opt)
    for step in range(4):
        x, y = model.inputs(seed=step)
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        opt.step()
        scheduler.step()
    assert len(opt.param_groups) == 2
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(lrs[1])


@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_scheduler_without_tasks_gets_a_clear_error_and_nothing_changes(sched):
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "uncertainty")
    SCHEDULERS[sched](opt)
    x, y = model.inputs()
    with pytest.raises(GradBalanceError, match=r"tasks=\['t0', 't1'\]"):
        opt.backward(model.losses(x, y))
    assert opt.tasks is None and not opt.method.is_bound
    assert len(opt.param_groups) == 1
    assert all(p.grad is None for p in model.parameters())


def test_loss_weighting_without_parameters_ignores_schedulers():
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "dwa")
    scheduler = SCHEDULERS["lambda"](opt)
    x, y = model.inputs()
    opt.backward(model.losses(x, y))
    opt.step()
    scheduler.step()
    assert opt.tasks == TASKS


# ---------------------------------------------------------------------- item 3: LBFGS
def balanced_closure(opt, model, x, y, calls: list[int]):
    """A closure as torch.optim expects it, through the balancer; appends to ``calls`` per run."""

    def closure():
        opt.zero_grad()
        losses = model.losses(x, y)
        opt.backward(losses)
        calls.append(1)
        return sum(losses.values())

    return closure


@pytest.mark.parametrize("method", ["equal", "mgda"])
def test_lbfgs_trains_through_the_closure(method):
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), method, shared=model.trunk
    )
    x, y = model.inputs(batch=16)
    calls: list[int] = []
    closure = balanced_closure(opt, model, x, y, calls)

    with torch.no_grad():
        start = sum(model.losses(x, y).values()).item()
    for _ in range(3):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
    with torch.no_grad():
        end = sum(model.losses(x, y).values()).item()
    assert end < 0.7 * start
    assert len(calls) > 3  # LBFGS re-evaluated the closure
    assert opt.steps == 3


def test_a_closure_runs_once_for_first_order_optimizers():
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.Adam(model.parameters(), lr=0.01), shared=model.trunk)
    x, y = model.inputs()
    calls: list[int] = []
    closure = balanced_closure(opt, model, x, y, calls)

    result = opt.step(closure)
    assert len(calls) == 1 and opt.steps == 1
    assert isinstance(result, torch.Tensor)


def test_lbfgs_refuses_methods_with_learnable_parameters():
    model = MultiHeadNet(num_tasks=2)
    with pytest.raises(GradBalanceError, match="LBFGS"):
        gb.GradBalancer(torch.optim.LBFGS(model.parameters()), "uncertainty", tasks=TASKS)


# ---------------------------------------------------------------------- item 4: atomic loading
def _trained(num_tasks: int, method: str = "uncertainty", **kw):
    model = MultiHeadNet(num_tasks=num_tasks)
    opt = gb.GradBalancer(torch.optim.Adam(model.parameters(), lr=0.01), method, **kw)
    x, y = model.inputs()
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    opt.step()
    return model, opt


def _snapshot(opt):
    return (
        opt.tasks,
        opt.method.is_bound,
        copy.deepcopy(opt.optimizer.state_dict()),
        {k: v.clone() for k, v in opt.method.state_dict().items() if torch.is_tensor(v)},
        opt.steps,
        len(opt.param_groups),
    )


def _assert_unchanged(opt, snap):
    tasks, bound, optim, method, steps, groups = snap
    assert opt.tasks == tasks and opt.method.is_bound == bound
    assert opt.steps == steps and len(opt.param_groups) == groups
    now = opt.optimizer.state_dict()
    assert now["param_groups"] == optim["param_groups"]
    assert now["state"].keys() == optim["state"].keys()
    for i, s in optim["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(now["state"][i][key], value, rtol=0, atol=0)
    state = {k: v for k, v in opt.method.state_dict().items() if torch.is_tensor(v)}
    assert state.keys() == method.keys()
    for key, value in method.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_a_three_task_checkpoint_into_an_unbound_two_task_balancer_changes_nothing():
    _, three = _trained(3)
    model = MultiHeadNet(num_tasks=2)
    fresh = gb.GradBalancer(torch.optim.Adam(model.parameters(), lr=0.01), "uncertainty")
    snap = _snapshot(fresh)
    with pytest.raises(ValueError):
        fresh.load_state_dict(three.state_dict())
    _assert_unchanged(fresh, snap)
    assert not hasattr(fresh.method, "log_vars")


def _bad_checkpoints(sd: dict) -> dict[str, dict]:
    bad = {}
    c = copy.deepcopy(sd)
    c["gradbalance"]["balancer"]["tasks"] = ["t0", "t1", "t2"]
    bad["other-tasks"] = c
    c = copy.deepcopy(sd)
    c["gradbalance"]["method"]["log_vars"] = torch.zeros(3)
    bad["method-shape"] = c
    c = copy.deepcopy(sd)
    c["gradbalance"]["method"]["surprise"] = torch.zeros(1)
    bad["method-extra-key"] = c
    c = copy.deepcopy(sd)
    del c["gradbalance"]["method"]["log_vars"]
    bad["method-missing-key"] = c
    c = copy.deepcopy(sd)
    c["param_groups"] = c["param_groups"][:1]
    bad["optimizer-groups"] = c
    c = copy.deepcopy(sd)
    c["param_groups"][0]["params"] = c["param_groups"][0]["params"][:-1]
    bad["optimizer-group-size"] = c
    c = copy.deepcopy(sd)
    c["gradbalance"]["balancer"]["steps"] = "many"
    bad["steps"] = c
    c = copy.deepcopy(sd)
    c["gradbalance"]["balancer"]["method"] = "mgda"
    bad["method-name"] = c
    return bad


@pytest.mark.parametrize("bound", [False, True])
@pytest.mark.parametrize(
    "which",
    [
        "other-tasks",
        "method-shape",
        "method-extra-key",
        "method-missing-key",
        "optimizer-groups",
        "optimizer-group-size",
        "steps",
        "method-name",
    ],
)
def test_bad_checkpoints_change_nothing(which, bound):
    _, saved = _trained(2)
    saved.step()  # more than one step of Adam state
    checkpoint = _bad_checkpoints(saved.state_dict())[which]
    if bound:
        _, target = _trained(2)
    else:
        model = MultiHeadNet(num_tasks=2)
        target = gb.GradBalancer(torch.optim.Adam(model.parameters(), lr=0.01), "uncertainty")
    snap = _snapshot(target)
    with pytest.raises((ValueError, TypeError, KeyError, RuntimeError)):
        target.load_state_dict(checkpoint)
    _assert_unchanged(target, snap)


def test_a_good_checkpoint_still_loads_into_an_unbound_balancer():
    _, saved = _trained(2)
    model = MultiHeadNet(num_tasks=2)
    target = gb.GradBalancer(torch.optim.Adam(model.parameters(), lr=0.01), "uncertainty")
    target.load_state_dict(saved.state_dict())
    assert target.tasks == TASKS and target.steps == 1 and len(target.param_groups) == 2
    torch.testing.assert_close(target.method.log_vars, saved.method.log_vars)


# ---------------------------------------------------------------------- item 5: failed first step
@pytest.mark.parametrize("method", ["uncertainty", "imtl-l", "dwa", "nash-mtl", "mgda", "rlw"])
def test_a_failing_first_backward_leaves_no_trace(method):
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method, shared=model.trunk)
    method_state = opt.method.state_dict()
    x, y = model.inputs()
    losses = model.losses(x, y)
    losses["t1"] = losses["t1"] * math.nan
    with pytest.raises(NonFiniteError):
        opt.backward(losses)
    assert opt.tasks is None and not opt.method.is_bound
    assert len(opt.param_groups) == 1
    assert opt.method.state_dict().keys() == method_state.keys()
    assert all(p.grad is None for p in model.parameters())
    # the balancer binds afresh, to other names
    out = model.losses(x, y)
    opt.backward({"a": out["t0"], "b": out["t1"]})
    assert opt.tasks == ["a", "b"]


def test_a_first_backward_failing_after_the_gramian_leaves_no_trace():
    model = MultiHeadNet(num_tasks=2)
    unused = nn.Parameter(torch.ones(3))
    opt = gb.GradBalancer(
        torch.optim.SGD([*model.parameters(), unused], lr=0.1),
        "nash-mtl",
        shared=[*model.trunk.parameters(), unused],
    )
    x, y = model.inputs()
    with pytest.raises(UnreachedParameterError):
        opt.backward(model.losses(x, y))
    assert opt.tasks is None and not opt.method.is_bound
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["rlw", "graddrop", "equal"])
def test_step_without_backward_does_not_count(method):
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method, shared=model.trunk)
    opt.step()
    assert opt.steps == 0
    x, y = model.inputs()
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    opt.step()
    opt.step()  # no backward in between
    assert opt.steps == 1


def test_step_without_backward_still_steps_the_inner_optimizer():
    # gradients written by a plain backward are applied, as torch would (but not counted)
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), shared=model.trunk)
    x, y = model.inputs()
    sum(model.losses(x, y).values()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.steps == 0


def test_rlw_schedule_does_not_shift_on_empty_steps():
    def run(empty_steps: bool) -> torch.Tensor:
        model = MultiHeadNet(num_tasks=2)
        opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.0), "rlw", seed=3)
        out = []
        for step in range(3):
            if empty_steps:
                opt.step()
            x, y = model.inputs(seed=step)
            opt.zero_grad()
            out.append(opt.backward(model.losses(x, y)))
            opt.step()
        return torch.stack(out)

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)


# ---------------------------------------------------------------------- item 7: sparse gradients
class SparseNet(nn.Module):
    """A dense trunk over an embedding, and a task-specific sparse embedding per head."""

    def __init__(self, shared_sparse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=shared_sparse)
        self.trunk = nn.Linear(4, 4)
        self.head_emb = nn.ModuleList(nn.Embedding(10, 4, sparse=True) for _ in range(2))
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))

    def shared(self) -> list[nn.Parameter]:
        return [self.emb.weight, *self.trunk.parameters()]

    def losses(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.tanh(self.trunk(self.emb(idx)))
        return {
            f"t{i}": (h(z + e(idx)) - 1.0).pow(2).mean()
            for i, (h, e) in enumerate(zip(self.heads, self.head_emb))
        }


@pytest.mark.parametrize(
    "method,engine",
    [
        ("equal", "auto"),
        ("uncertainty", "auto"),
        ("gradnorm", "auto"),
        ("mgda", "auto"),
        ("mgda", "loop"),
        ("mgda", "memory"),
        ("pcgrad", "auto"),
    ],
)
def test_task_specific_sparse_embeddings_train(method, engine):
    net = SparseNet()
    opt = gb.GradBalancer(
        torch.optim.SGD(net.parameters(), lr=0.1), method, shared=net.shared(), engine=engine
    )
    idx = torch.arange(8)
    with torch.no_grad():
        start = sum(net.losses(idx).values()).item()
    for _ in range(5):
        opt.zero_grad()
        opt.backward(net.losses(idx))
        opt.step()
    assert net.head_emb[0].weight.grad.is_sparse
    with torch.no_grad():
        assert sum(net.losses(idx).values()).item() < start
    # accumulation into an existing sparse .grad
    opt.zero_grad()
    opt.backward(net.losses(idx))
    once = net.head_emb[0].weight.grad.to_dense().clone()
    opt.backward(net.losses(idx))
    torch.testing.assert_close(net.head_emb[0].weight.grad.to_dense(), 2 * once)


@pytest.mark.parametrize("method", ["equal", "uncertainty"])
def test_shared_sparse_embeddings_under_loss_weightings(method):
    net = SparseNet(shared_sparse=True)
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), method, shared=net.shared())
    opt.backward(net.losses(torch.arange(8)))
    assert net.emb.weight.grad.is_sparse
    opt.step()


def test_a_nonfinite_sparse_gradient_is_caught():
    net = SparseNet()
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), "equal")
    with torch.no_grad():
        net.head_emb[1].weight[3, 0] = math.inf
    with pytest.raises(NonFiniteError):
        opt.backward(net.losses(torch.arange(8)))
    assert all(p.grad is None for p in net.parameters())


def test_a_shared_sparse_parameter_under_a_gradient_method_is_named():
    net = SparseNet(shared_sparse=True)
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), "mgda", shared=net.shared())
    with pytest.raises(GradBalanceError, match=r"shared parameter #0 \(shape \(10, 4\)\).*sparse"):
        opt.backward(net.losses(torch.arange(8)))
    assert all(p.grad is None for p in net.parameters())


def test_task_specific_sparse_parameters_under_the_batched_engine_are_named():
    net = SparseNet()
    named = [(n, p) for n, p in net.named_parameters()]
    opt = gb.GradBalancer(
        torch.optim.SGD(named, lr=0.1), "mgda", shared=net.shared(), engine="batched"
    )
    with pytest.raises(GradBalanceError, match=r"'head_emb\.0\.weight'.*engine='batched'"):
        opt.backward(net.losses(torch.arange(8)))
    assert all(p.grad is None for p in net.parameters())
