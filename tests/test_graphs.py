"""The balancing part of a step (Gramian, weights, combine, under the device-side skip) is one
graph: ``torch.compile(fullgraph=True)`` traces it without a break for the methods listed, on
the CPU with the eager backend (no C++ compiler needed; tests/cuda/ captures and replays it
with ``torch.cuda.CUDAGraph`` and compiles it with ``mode="reduce-overhead"``)."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.balancer.deferred import DeviceSkip
from gradbalance.methods import Method, StepInputs

#: methods whose weights trace as one graph (docs/engines.md lists the others and why)
CAPTURABLE = ["equal", "mgda", "upgrad", "imtl-g"]
TASKS = ("a", "b", "c")


def bound_method(name: str) -> Method:
    """A method bound to three tasks, as a balancer binds it."""
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    return gb.GradBalancer(opt, method=name, shared=[p], tasks=list(TASKS)).method


def balance(method: Method, jac: torch.Tensor, losses: torch.Tensor):
    """Gramian, weights and ``Jᵀw`` of one step, skipped on the device when not finite."""
    mask = DeviceSkip(jac.device)
    safe = mask.losses(losses)
    j64 = jac.to(torch.float64)
    gram = mask.gramian(j64 @ j64.T)
    w = method.weights(StepInputs(tasks=TASKS, losses=safe, gramian=gram, step=0)).detach()
    mask.weights(w)
    zero = torch.zeros((), dtype=jac.dtype, device=jac.device)
    update = torch.where(mask.found, zero, w.to(jac.dtype) @ jac)
    return torch.where(mask.found, torch.full_like(w, float("nan")), w), update


@pytest.mark.parametrize("name", CAPTURABLE)
def test_the_balancing_part_traces_as_one_graph(name):
    method = bound_method(name)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda j, loss: balance(method, j, loss), fullgraph=True, backend="eager", dynamic=False
    )
    gen = torch.Generator().manual_seed(0)
    for bad in (False, True, False):
        jac = torch.randn(3, 40, generator=gen)
        losses = torch.rand(3, generator=gen, dtype=torch.float64)
        if bad:
            jac[1, 3] = float("nan")
        w, update = compiled(jac, losses)
        w_ref, update_ref = balance(method, jac, losses)
        torch.testing.assert_close(w, w_ref, equal_nan=True)
        torch.testing.assert_close(update, update_ref)
        assert bool(torch.isnan(w).all()) == bad
    torch._dynamo.reset()


#: where a graph break would mean the balancing part itself is not one graph
BALANCING = (
    "gradbalance/_linalg",
    "gradbalance/methods/",
    "gradbalance/solvers/",
    "gradbalance/balancer/deferred",
)


def test_a_whole_step_breaks_only_outside_the_balancing_modules(name: str = "mgda"):
    """Dynamo breaks the graph of a whole step at the engine's autograd calls and at the inner
    optimizer's ``zero_grad`` (docs/engines.md), never inside the balancing modules."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh())
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in TASKS)
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(
        torch.optim.Adam(params, lr=1e-3, fused=True), method=name, shared=trunk, nonfinite="skip"
    )
    opt._pipeline.device_checks = True  # the path taken off the CPU
    x = torch.randn(8, 5)

    def step(x):
        z = trunk(x)
        opt.zero_grad()
        return opt.backward([h(z).pow(2).mean() for h in heads])

    step(x)
    opt.step()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x)
    torch._dynamo.reset()
    inside = [
        (reason.reason.splitlines()[0], reason.user_stack[-1].filename)
        for reason in explained.break_reasons
        if reason.user_stack and any(p in reason.user_stack[-1].filename for p in BALANCING)
    ]
    assert inside == []
    assert explained.graph_break_count >= 1  # the autograd calls: Dynamo does not trace them
