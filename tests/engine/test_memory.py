"""The memory-light Gramian (``engine="memory"``) agrees with the loop and batched engines.

Run as a script (``python -m tests.engine.test_memory``) to print the peak-memory table of
docs/engines.md.
"""

from __future__ import annotations

import copy
import itertools
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradbalance as gb
from gradbalance import engine
from gradbalance.methods import Method
from tests.conftest import GramianFixed, JacobianOnes, MultiHeadNet


def make_method(name: str) -> Method:
    if name == "mgda":
        return gb.methods.get("mgda")
    return GramianFixed([0.2, 1.5, 0.7])


def one_backward(model, method, engine_name, scaler=None, threshold=None, seed=0):
    kwargs = {} if threshold is None else {"memory_threshold": threshold}
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method,
        shared=model.trunk,
        engine=engine_name,
        **kwargs,
    )
    x, y = model.inputs(seed=seed)
    opt.zero_grad()
    w = opt.backward(model.losses(x.double(), y.double()), scaler=scaler)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return opt, w, grads


def trunk_numel(model) -> int:
    return sum(p.numel() for p in model.trunk.parameters())


@pytest.mark.parametrize("kind", ["mlp", "conv", "convbn"])
@pytest.mark.parametrize("method", ["mgda", "fixed"])
@pytest.mark.parametrize("use_scaler", [False, True])
def test_memory_path_matches_loop_and_batched(kind, method, use_scaler):
    base = MultiHeadNet(kind).double()
    # a budget of about a third of K x P: several groups, some holding a single tensor
    budget = 3 * trunk_numel(base) // 3
    results = {}
    for name in ["loop", "batched", "memory"]:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        model = copy.deepcopy(base)
        opt, w, grads = one_backward(model, make_method(method), name, scaler, threshold=budget)
        assert opt.engine == name
        results[name] = (opt.last_gramian, w, grads)
    g_ref, w_ref, grads_ref = results["loop"]
    for name in ["batched", "memory"]:
        g, w, grads = results[name]
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w, w_ref, rtol=1e-8, atol=1e-10)
        assert grads.keys() == grads_ref.keys()
        for n in grads:  # task-specific heads included
            torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_memory_path_splits_into_groups_within_budget():
    model = MultiHeadNet("conv").double()
    x, y = model.inputs()
    losses = list(model.losses(x.double(), y.double()).values())
    shared = list(model.trunk.parameters())
    heads = list(model.heads.parameters())
    k = len(losses)
    biggest = max(p.numel() for p in [*shared, *heads])
    budget = k * biggest
    mg = engine.memory_gramian(losses, shared, heads, budget=budget)
    assert mg.peak_rows_numel <= budget < engine.jacobian_numel(shared, k)
    tg = engine.task_gradients(losses, shared, heads, strategy="loop", retain_graph=True)
    torch.testing.assert_close(mg.gramian, engine.gramian(tg.rows, k), rtol=1e-12, atol=0)
    for a, b in zip(mg.others, tg.others):
        torch.testing.assert_close(a, b)
    assert all(mg.reached) and all(mg.task_reached)
    w = torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)
    for a, b in zip(engine.weighted_gradients(losses, w, shared), engine.combine(tg.rows, w)):
        torch.testing.assert_close(a, b)


def test_loop_strategy_of_the_memory_path():
    model = MultiHeadNet("mlp").double()
    x, y = model.inputs()
    losses = list(model.losses(x.double(), y.double()).values())
    shared = list(model.trunk.parameters())
    mg = engine.memory_gramian(losses, shared, budget=60, strategy="loop")
    assert mg.strategy == "loop"
    tg = engine.task_gradients(losses, shared, strategy="batched", retain_graph=True)
    torch.testing.assert_close(mg.gramian, engine.gramian(tg.rows, 3))
    with pytest.raises(ValueError, match="strategy"):
        engine.memory_gramian(losses, shared, strategy="representation")


@given(
    numels=st.lists(st.integers(1, 50), min_size=0, max_size=12),
    k=st.integers(1, 6),
    budget=st.integers(1, 400),
)
def test_plan_groups_covers_in_order_within_budget(numels, k, budget):
    groups = engine.plan_groups(numels, k, budget)
    assert [i for g in groups for i in g] == list(range(len(numels)))
    for g in groups:
        assert len(g) == 1 or k * sum(numels[i] for i in g) <= budget
    # greedy: a group could not take the next tensor without exceeding the budget
    for g, nxt in itertools.pairwise(groups):
        assert k * (sum(numels[i] for i in g) + numels[nxt[0]]) > budget


def test_plan_groups_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="budget"):
        engine.plan_groups([1, 2], 2, 0)


def test_auto_takes_the_memory_path_above_the_threshold():
    base = MultiHeadNet("mlp").double()
    kp = 3 * trunk_numel(base)
    opt, w_mem, g_mem = one_backward(
        copy.deepcopy(base), gb.methods.get("mgda"), "auto", None, kp - 1
    )
    assert opt.engine == "memory"
    opt, w_full, g_full = one_backward(
        copy.deepcopy(base), gb.methods.get("mgda"), "auto", None, kp
    )
    assert opt.engine in ("loop", "batched")
    torch.testing.assert_close(w_mem, w_full)
    for n in g_full:
        torch.testing.assert_close(g_mem[n], g_full[n])


def test_jacobian_methods_refuse_the_memory_engine_and_auto_keeps_the_full_path():
    model = MultiHeadNet("mlp").double()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="JACOBIAN"):
        gb.GradBalancer(sgd, JacobianOnes(), shared=model.trunk, engine="memory")
    opt, _, _ = one_backward(model, JacobianOnes(), "auto", None, threshold=1)
    assert opt.engine in ("loop", "batched")


def test_loss_weightings_refuse_the_memory_engine():
    model = MultiHeadNet("mlp")
    with pytest.raises(ValueError, match="loss weighting"):
        gb.GradBalancer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            "equal",
            shared=model.trunk,
            engine="memory",
        )


@pytest.mark.parametrize("bad", [0, -5])
def test_memory_threshold_is_validated(bad):
    model = MultiHeadNet("mlp")
    with pytest.raises(ValueError, match="memory_threshold"):
        gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), memory_threshold=bad)
    with pytest.raises(TypeError, match="memory_threshold"):
        gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), memory_threshold=1.5)


def test_memory_path_reports_an_unreached_shared_parameter():
    model = MultiHeadNet("mlp").double()
    orphan = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    params = [*model.parameters(), orphan]
    opt = gb.GradBalancer(
        torch.optim.SGD(params, lr=0.1),
        "mgda",
        shared=[*model.trunk.parameters(), orphan],
        engine="memory",
        memory_threshold=50,
    )
    x, y = model.inputs()
    with pytest.raises(gb.UnreachedParameterError, match="shared parameter #4"):
        opt.backward(model.losses(x.double(), y.double()))
    assert all(p.grad is None for p in params)


def test_memory_path_overflow_under_grad_scaler_skips_the_step():
    model = MultiHeadNet("mlp")
    before = copy.deepcopy(model.state_dict())
    method = GramianFixed([1.0, 1.0, 1.0])
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method,
        shared=model.trunk,
        engine="memory",
        memory_threshold=100,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    x, y = model.inputs()
    opt.zero_grad()
    # float32 losses of ~1e10 times 2**100 overflow
    w = opt.backward({t: 1e10 * v for t, v in model.losses(x, y).items()}, scaler=scaler)
    assert torch.isnan(w).all()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**100
    assert int(method.updates) == 0
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])


def test_memory_path_honours_retain_graph():
    model = MultiHeadNet("mlp").double()
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        "mgda",
        shared=model.trunk,
        engine="memory",
        memory_threshold=100,
    )
    x, y = model.inputs()
    losses = model.losses(x.double(), y.double())
    opt.backward(losses, retain_graph=True)
    opt.backward(losses)  # the graph is still there
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        opt.backward(losses)


# ---------------------------------------------------------------------- peak memory (script)
def peak_cpu_bytes(fn) -> int:
    """Peak of the CPU bytes allocated while ``fn`` runs, from torch's memory profiler.

    Every event's self allocation, in start order; allocations made before ``fn`` (the model,
    its graph) are not counted.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _memory_table() -> None:  # pragma: no cover - run by hand for docs/engines.md
    torch.manual_seed(0)
    k = 8

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
            )  # fmt: skip
            self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(k))

        def losses(self):
            z = self.trunk(torch.randn(64, 512))
            return [h(z).pow(2).mean() for h in self.heads]

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
                nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )  # fmt: skip
            self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(k))

        def losses(self):
            z = self.trunk(torch.randn(16, 3, 32, 32))
            return [h(z).pow(2).mean() for h in self.heads]

    for model in (MLP(), Conv()):
        shared = list(model.trunk.parameters())
        heads = list(model.heads.parameters())
        p = sum(t.numel() for t in shared)
        print(f"{type(model).__name__}: K={k}, P={p:,}, K*P*4 bytes = {k * p * 4 / 2**20:.1f} MiB")

        def full(strategy: str, model=model, shared=shared, heads=heads) -> None:
            losses = model.losses()
            tg = engine.task_gradients(losses, shared, heads, strategy=strategy)
            engine.gramian(tg.rows, k)
            engine.combine(tg.rows, torch.ones(k))

        def light(budget: int, model=model, shared=shared, heads=heads) -> None:
            losses = model.losses()
            mg = engine.memory_gramian(losses, shared, heads, budget=budget)
            engine.weighted_gradients(losses, torch.ones(k), shared)
            light.peak_rows = mg.peak_rows_numel

        def plain(model=model) -> None:
            sum(model.losses()).backward()
            model.zero_grad(set_to_none=True)

        def ms(fn) -> float:
            times = []
            for _ in range(5):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return 1e3 * sorted(times)[2]

        mib = peak_cpu_bytes(plain) / 2**20
        print(f"  plain summed-loss step: peak {mib:7.1f} MiB  {ms(plain):6.1f} ms")
        for strategy in ("loop", "batched"):
            mib = peak_cpu_bytes(lambda s=strategy: full(s)) / 2**20
            t = ms(lambda s=strategy: full(s))
            rows = k * p * 4 / 2**20
            print(f"  {strategy:12s} rows {rows:7.1f} MiB  peak {mib:7.1f} MiB  {t:6.1f} ms")
        for budget in (k * p // 2, k * p // 4, k * p // 8):
            mib = peak_cpu_bytes(lambda b=budget: light(b)) / 2**20
            t = ms(lambda b=budget: light(b))
            rows = light.peak_rows * 4 / 2**20
            name = f"memory K*P/{k * p // budget}"
            print(f"  {name:12s} rows {rows:7.1f} MiB  peak {mib:7.1f} MiB  {t:6.1f} ms")


if __name__ == "__main__":  # pragma: no cover
    _memory_table()
