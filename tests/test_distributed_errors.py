"""An input error on one rank only is raised on every rank, at the same step, and the ranks
stay in step when the training loop catches it and continues (two gloo processes on CPU).

The ranks run under a deadline (and gloo under a collective timeout), so a rank that blocks
makes the test fail instead of hanging.
"""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.errors import GradBalanceError
from tests.conftest import MultiHeadNet
from tests.ddp_harness import run_ranks

WORLD = 2
DEADLINE_S = 120


def _step(opt, model, seed, rank, bad=None, **kw):
    """One step on this rank's shard; ``bad(losses, kw)`` spoils the inputs of this rank."""
    x, y = model.inputs(batch=8, seed=seed)
    x, y = x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]
    losses = model.losses(x, y)
    if bad is not None:
        bad(losses, kw)
    opt.zero_grad()
    try:
        opt.backward(losses, **kw)
    except GradBalanceError as exc:
        return f"{type(exc).__name__}: {exc}"
    opt.step()
    return None


def _constant(losses, kw):
    losses["t1"] = torch.tensor(0.5)  # does not require grad


def _nan_kpi(losses, kw):
    kw["kpis"] = {"t0": float("nan"), "t1": 0.5}


def _scenarios(rank: int, world: int) -> dict:
    out = {}
    # past the first step: rank 1 passes a constant loss at step 1
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared=model.trunk)
    errors = [
        _step(opt, model, s, rank, bad=_constant if (s == 1 and rank == 1) else None)
        for s in range(3)
    ]
    out["later"] = {"errors": errors, "steps": opt.steps, "params": _params(model)}
    # the first step: rank 1 passes a constant loss; nothing is bound on either rank
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "uncertainty")
    first = _step(opt, model, 0, rank, bad=_constant if rank == 1 else None)
    out["first"] = {"error": first, "tasks": opt.tasks, "groups": len(opt.param_groups)}
    out["first"]["next"] = _step(opt, model, 1, rank)
    out["first"]["params"] = _params(model)
    # a NaN KPI on rank 0 (DTP reads KPIs), past the first step
    model = MultiHeadNet(num_tasks=2)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), "dtp")
    kpis = {"t0": 0.5, "t1": 0.5}
    errors = [
        _step(opt, model, s, rank, bad=_nan_kpi if (s == 1 and rank == 0) else None, kpis=kpis)
        for s in range(3)
    ]
    out["kpi"] = {"errors": errors, "steps": opt.steps, "params": _params(model)}
    return out


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(
        _scenarios,
        WORLD,
        preload=["torch", "tests.test_distributed_errors"],
        deadline_s=DEADLINE_S,
        collective_timeout_s=60,
    )


def _assert_same_params(ranks, key):
    for a, b in zip(ranks[0][key]["params"], ranks[1][key]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_error_on_one_rank_is_raised_on_every_rank(ranks):
    r0, r1 = ranks[0]["later"], ranks[1]["later"]
    assert r1["errors"][1].startswith("LossError") and "'t1'" in r1["errors"][1]
    assert r0["errors"][1].startswith("GradBalanceError") and "rank(s) [1]" in r0["errors"][1]
    assert r0["errors"][0] is None and r0["errors"][2] is None and r1["errors"][2] is None
    assert r0["steps"] == r1["steps"] == 2
    _assert_same_params(ranks, "later")  # still in step after catching and continuing


def test_an_error_at_the_first_step_binds_nothing_on_any_rank(ranks):
    r0, r1 = ranks[0]["first"], ranks[1]["first"]
    assert r1["error"].startswith("LossError")
    assert "rank(s) [1]" in r0["error"]
    for r in (r0, r1):
        assert r["tasks"] is None and r["groups"] == 1
        assert r["next"] is None
    _assert_same_params(ranks, "first")


def test_a_nan_kpi_on_one_rank_is_raised_on_every_rank(ranks):
    r0, r1 = ranks[0]["kpi"], ranks[1]["kpi"]
    assert r0["errors"][1].startswith("MissingInputError") and "KPI" in r0["errors"][1]
    assert "rank(s) [0]" in r1["errors"][1]
    assert r0["steps"] == r1["steps"] == 2
    _assert_same_params(ranks, "kpi")
