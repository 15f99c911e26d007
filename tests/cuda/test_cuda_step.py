"""CUDA checks of issue 14 (run on a GPU machine: ``python -m pytest -m cuda -q``).

* a step with ``nonfinite="skip"`` makes no host synchronisation
  (``torch.cuda.set_sync_debug_mode("error")`` around ``backward``/``step``) for the methods and
  the fused optimizer where docs/engines.md promises none; a skipped step changes nothing;
* the balancing part (Gramian, weights, ``Jᵀw``) is captured by ``torch.cuda.CUDAGraph`` and
  replayed with new gradients, matching eager;
* ``torch.compile(mode="reduce-overhead")`` of a whole step breaks the graph only at the
  autograd calls and the inner optimizer, never inside the balancing modules.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradbalance as gb
from tests.test_graphs import CAPTURABLE, balance, bound_method

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SYNC_FREE = ["equal", "uncertainty", "mgda", "mgda-ub", "upgrad", "dwa"]
#: the balancing part replays in a CUDA graph (IMTL-G's pinv checks eigh's flag on the host)
GRAPHED = [m for m in CAPTURABLE if m != "imtl-g"]


def _model(k: int = 3):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(16, 32), nn.Tanh()).cuda()
    heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(k)).cuda()
    return trunk, heads


def _step(opt, trunk, heads, seed: int, bad: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    z = trunk(torch.randn(8, 16, device="cuda", generator=gen))
    losses = [h(z).pow(2).mean() + 0.1 for h in heads]
    if bad:
        losses[1] = losses[1] * math.nan
    opt.zero_grad()
    w = opt.backward(losses, features=z if opt.method.name == "mgda-ub" else None)
    opt.step()
    return w


@pytest.mark.parametrize("k", [3, 12])
@pytest.mark.parametrize("method", SYNC_FREE)
def test_a_skip_step_makes_no_host_synchronisation(method, k):
    trunk, heads = _model(k)
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(
        torch.optim.Adam(params, lr=1e-3, fused=True),
        method=method,
        shared=trunk,
        nonfinite="skip",
    )
    for s in range(2):  # binding, the engine probe and Adam's state
        _step(opt, trunk, heads, s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(opt, trunk, heads, 2)
        _step(opt, trunk, heads, 3, bad=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == 1 and opt.steps == 3


@pytest.mark.parametrize("method", ["equal", "mgda", "upgrad"])
def test_a_raise_step_synchronises_once(method):
    trunk, heads = _model()
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(
        torch.optim.Adam(params, lr=1e-3, fused=True), method=method, shared=trunk
    )
    for s in range(2):
        _step(opt, trunk, heads, s)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(opt, trunk, heads, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    with pytest.raises(gb.NonFiniteError, match="task"):
        _step(opt, trunk, heads, 3, bad=True)


def test_imtl_g_reads_at_most_once():
    """IMTL-G's branches are masks off the CPU; ``torch.linalg.pinv(hermitian=True)`` runs
    ``eigh``, whose convergence check may read its flag on the host (no ``_ex`` variant)."""
    trunk, heads = _model()
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(
        torch.optim.Adam(params, lr=1e-3, fused=True),
        method="imtl-g",
        shared=trunk,
        nonfinite="skip",
    )
    for s in range(2):
        _step(opt, trunk, heads, s)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(opt, trunk, heads, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_a_skipped_step_changes_nothing_on_cuda():
    trunk, heads = _model()
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(
        torch.optim.Adam(params, lr=1e-3, fused=True),
        method="mgda",
        shared=trunk,
        nonfinite="skip",
    )
    _step(opt, trunk, heads, 0)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.optimizer.state[p].items()} for p in params]
    w = _step(opt, trunk, heads, 1, bad=True)
    assert torch.isnan(w).all()
    for i, p in enumerate(params):
        assert torch.equal(before[i], p)
        for key, value in state[i].items():
            assert torch.equal(value, opt.optimizer.state[p][key])


@pytest.mark.parametrize("name", GRAPHED)
def test_the_balancing_part_replays_in_a_cuda_graph(name):
    method = bound_method(name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    jac = torch.randn(3, 4096, device="cuda", generator=gen)
    losses = torch.rand(3, device="cuda", dtype=torch.float64, generator=gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as CUDA graphs require
            balance(method, jac, losses)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w_out, update_out = balance(method, jac, losses)
    for bad in (False, True, False):
        new = torch.randn(3, 4096, device="cuda", generator=gen)
        if bad:
            new[2, 7] = float("inf")
        jac.copy_(new)
        losses.copy_(torch.rand(3, device="cuda", dtype=torch.float64, generator=gen))
        graph.replay()
        w_ref, update_ref = balance(method, jac, losses)
        torch.testing.assert_close(w_out, w_ref, equal_nan=True)
        torch.testing.assert_close(update_out, update_ref)
        assert bool(torch.isnan(w_out).all()) == bad


BALANCING = (
    "gradbalance/_linalg",
    "gradbalance/methods/",
    "gradbalance/solvers/",
    "gradbalance/balancer/deferred",
)


@pytest.mark.parametrize("name", ["mgda", "upgrad"])
def test_a_compiled_step_breaks_only_outside_the_balancing_modules(name):
    trunk, heads = _model()
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(
        torch.optim.Adam(params, lr=1e-3, fused=True),
        method=name,
        shared=trunk,
        nonfinite="skip",
    )
    x = torch.randn(8, 16, device="cuda")

    def step(x):
        z = trunk(x)
        opt.zero_grad()
        return opt.backward([h(z).pow(2).mean() for h in heads])

    step(x)
    opt.step()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x)
    inside = []
    for reason in explained.break_reasons:
        frames = [f.filename for f in reason.user_stack]
        if frames and any(part in frames[-1] for part in BALANCING):
            inside.append((reason.reason.splitlines()[0], frames[-1]))
    assert inside == []
    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        compiled(x)
        opt.step()
    w = compiled(x).clone()  # the same parameters as the eager step below
    torch.testing.assert_close(w, step(x))
    torch._dynamo.reset()
