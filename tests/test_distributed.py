"""GradBalancer under DistributedDataParallel: two gloo processes on CPU train exactly like one
process on the concatenated batch.

One module-scoped fixture spawns the two ranks once and runs every scenario in them; the tests
then compare what the ranks saved with single-process runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradbalance as gb
from gradbalance import engine
from gradbalance.methods import Method, StepInputs
from tests.conftest import GramianFixed, JacobianOnes
from tests.ddp_harness import run_ranks

WORLD = 2
BATCH = 6  # per rank; the global batch has WORLD * BATCH samples
STEPS = 4
K = 3


class Net(nn.Module):
    """An MLP trunk and K heads; ``forward`` returns the predictions and the shared features."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(K))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return torch.cat([h(z) for h in self.heads], dim=1), z


def losses_of(pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "a": (pred[:, 0] - y[:, 0]).pow(2).mean(),
        "b": (pred[:, 1] - y[:, 1]).abs().mean() + 0.1 * pred[:, 1].pow(2).mean(),
        "c": 3.0 * (pred[:, 2] - y[:, 2]).pow(2).mean(),
    }


def global_batch(step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    n = WORLD * BATCH
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randn(n, K, generator=g, dtype=torch.float64)
    return x, y


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if world == 1:
        return t
    return t[rank * BATCH : (rank + 1) * BATCH]


def make_method(name: str) -> Method:
    if name == "gradnorm":
        return gb.methods.get("gradnorm", alpha=1.0, lr=0.05)
    if name == "dwa":
        return gb.methods.get("dwa", window=1)
    if name == "fixed-gramian":
        return GramianFixed([0.5, 1.0, 2.0])
    if name == "jacobian":
        return JacobianOnes()
    return gb.methods.get(name)


#: name -> (method, engine, micro-batches per step)
SCENARIOS = {
    "mgda": ("mgda", "loop", 1),
    "mgda-batched": ("mgda", "batched", 1),
    "mgda-memory": ("mgda", "memory", 1),
    "mgda-ub": ("mgda-ub", "representation", 1),
    "gradnorm": ("gradnorm", "auto", 1),
    "dwa": ("dwa", "auto", 1),
    "uncertainty": ("uncertainty", "auto", 1),
    "jacobian": ("jacobian", "loop", 1),
    "mgda-accumulate": ("mgda", "loop", 2),
    "uncertainty-accumulate": ("uncertainty", "auto", 2),
}


def train(
    method_name: str,
    engine_name: str,
    micro: int,
    rank: int = 0,
    world: int = 1,
    distributed: str = "off",
    steps: int = STEPS,
) -> dict:
    """Train ``steps`` steps; under ``world > 1`` the model is wrapped in DDP."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the method's own parameters too
    try:
        return _train(method_name, engine_name, micro, rank, world, distributed, steps)
    finally:
        torch.set_default_dtype(previous)


def _train(
    method_name: str,
    engine_name: str,
    micro: int,
    rank: int,
    world: int,
    distributed: str,
    steps: int,
) -> dict:
    net = Net().double()
    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net)
    method = make_method(method_name)
    opt = gb.GradBalancer(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5),
        method,
        shared=net.trunk,
        engine=engine_name,
        distributed=distributed,
        memory_threshold=40,  # several groups on the memory path
    )
    weights = []
    for t in range(steps):
        opt.zero_grad()
        for m in range(micro):
            x, y = global_batch(t, m)
            pred, z = model(shard(x, rank, world))
            losses = losses_of(pred, shard(y, rank, world))
            kwargs = {"features": z} if engine_name == "representation" else {}
            if m < micro - 1:
                with opt.no_sync():
                    w = opt.backward(losses, **kwargs)
            else:
                w = opt.backward(losses, **kwargs)
            weights.append(w.clone())
        opt.step()
    sync = opt.synchronizer
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "method": {n: t.clone() for n, t in opt.method.state_dict().items() if torch.is_tensor(t)},
        "weights": torch.stack(weights),
        "mode": opt.distributed,
        "elements": None if sync is None else sync.elements,
        "calls": None if sync is None else sync.calls,
    }


def local_mode_first_step(rank: int, world: int) -> dict:
    out = train("mgda", "loop", 1, rank, world, distributed="local", steps=1)
    out["more"] = train("mgda", "loop", 1, rank, world, distributed="local", steps=3)["params"]
    return out


def error_checks(rank: int, world: int) -> dict:
    found = {}
    net = Net().double()
    opt = gb.GradBalancer(
        torch.optim.SGD(net.parameters(), lr=0.1), JacobianOnes(), shared=net.trunk,
        distributed="local",
    )  # fmt: skip
    x, y = global_batch(0)
    try:
        opt.backward(losses_of(net(shard(x, rank, world))[0], shard(y, rank, world)))
    except ValueError as exc:
        found["jacobian-local"] = str(exc)
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), "equal", shared=net.trunk)
    with opt.no_sync():
        opt.backward(losses_of(net(shard(x, rank, world))[0], shard(y, rank, world)))
    try:
        opt.step()
    except RuntimeError as exc:
        found["step-unsynced"] = str(exc)
    # a non-finite loss on rank 1 only: every rank skips the step (nobody hangs)
    opt = gb.GradBalancer(
        torch.optim.SGD(net.parameters(), lr=0.1), "mgda", shared=net.trunk, nonfinite="skip"
    )
    losses = losses_of(net(shard(x, rank, world))[0], shard(y, rank, world))
    if rank == 1:
        losses["b"] = losses["b"] * float("nan")
    w = opt.backward(losses)
    found["nan-skipped"] = bool(torch.isnan(w).all()) and opt.skipped_steps == 1
    return found


def _scenarios(rank: int, world: int) -> dict:
    results = {
        name: train(m, e, micro, rank, world, distributed="auto")
        for name, (m, e, micro) in SCENARIOS.items()
    }
    results["local"] = local_mode_first_step(rank, world)
    results["errors"] = error_checks(rank, world)
    return results


@pytest.fixture(scope="module")
def ranks():
    # the fork server imports torch once (with the optimizers' lazy imports) and forks the ranks
    preload = ["torch", "torch._dynamo", "tests.test_distributed"]
    return run_ranks(_scenarios, WORLD, preload=preload)


def assert_params_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_train_like_one_process_on_the_global_batch(ranks, name):
    method_name, engine_name, micro = SCENARIOS[name]
    ref = train(method_name, engine_name, micro)
    for r, result in enumerate(ranks):
        assert result[name]["mode"] == "global"
        torch.testing.assert_close(result[name]["weights"], ref["weights"], rtol=0, atol=1e-9)
        assert_params_close(result[name]["params"], ref["params"])
        for key, value in ref["method"].items():
            torch.testing.assert_close(result[name]["method"][key], value, rtol=0, atol=1e-9)
        if r:
            # every rank holds the same weights and parameters
            for n, p in result[name]["params"].items():
                torch.testing.assert_close(p, ranks[0][name]["params"][n], rtol=0, atol=1e-12)
    if method_name != "jacobian":
        # the references are not trivial: the weights moved away from their start
        assert not torch.allclose(ref["weights"][0], ref["weights"][-1])


def test_what_each_rank_sends_per_step(ranks):
    net = Net()
    p_shared = sum(p.numel() for p in net.trunk.parameters())
    p_heads = sum(p.numel() for p in net.heads.parameters())
    n_shared = len(list(net.trunk.parameters()))
    n_heads = len(list(net.heads.parameters()))
    # every step also carries one input-error flag per rank (with the losses, past step 1)
    per_step = {
        # losses; Jacobian rows (+ one presence flag per tensor); task-specific gradients
        "mgda": K + WORLD + (K * p_shared + n_shared) + (p_heads + n_heads),
        # losses; the K x K feature Gramian; the whole update
        "mgda-ub": K + WORLD + K * K + (p_shared + n_shared + p_heads + n_heads),
        # losses; rows of the last shared layer; the gradient of every parameter
        "gradnorm": K + WORLD + (K * (6 * 8 + 6) + 2) + (p_shared + p_heads + n_shared + n_heads),
        # losses; every parameter's gradient, the log-variances included
        "uncertainty": K + WORLD + (p_shared + p_heads + K + n_shared + n_heads + 1),
    }
    for name, elements in per_step.items():
        assert ranks[0][name]["elements"] == STEPS * elements, name
    # the local mode: the K x K Gramian instead of the K x P rows
    local = K + WORLD + K * K + (p_shared + p_heads + n_shared + n_heads)
    assert ranks[0]["local"]["elements"] == local


def test_local_mode_weights_come_from_the_mean_of_the_rank_gramians(ranks):
    net = Net().double()
    shared = list(net.trunk.parameters())
    x, y = global_batch(0)
    grams = []
    for r in range(WORLD):
        losses = losses_of(net(shard(x, r, WORLD))[0], shard(y, r, WORLD))
        tg = engine.task_gradients(list(losses.values()), shared, strategy="loop")
        grams.append(engine.gramian(tg.rows, K))
    mean_gram = sum(grams) / WORLD
    mgda = gb.methods.get("mgda")
    mgda.bind(("a", "b", "c"))
    expected = mgda.weights(StepInputs(("a", "b", "c"), torch.ones(K), gramian=mean_gram))
    for result in ranks:
        assert result["local"]["mode"] == "local"
        w = result["local"]["weights"][0]
        torch.testing.assert_close(w, expected.to(w.dtype), rtol=0, atol=1e-9)
    # it is not the global-batch weight (that one comes from the Gramian of the mean Jacobian)
    assert not torch.allclose(ranks[0]["local"]["weights"][0], ranks[0]["mgda"]["weights"][0])
    # the update is J̄ᵀw with the global batch's J̄: one process with those fixed weights
    ref = Net().double()
    opt = gb.GradBalancer(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5),
        GramianFixed(expected.tolist()),
        shared=ref.trunk,
    )
    opt.zero_grad()
    opt.backward(losses_of(ref(x)[0], y))
    opt.step()
    expected_params = {n: p.detach() for n, p in ref.named_parameters()}
    for result in ranks:
        assert_params_close(result["local"]["params"], expected_params)
        # and the replicas stay identical over several steps
        assert_params_close(result["local"]["more"], ranks[0]["local"]["more"], atol=1e-12)


def test_errors_are_raised_on_every_rank_alike(ranks):
    for result in ranks:
        errors = result["errors"]
        assert "distributed='global'" in errors["jacobian-local"]
        assert "no_sync()" in errors["step-unsynced"]
        assert errors["nan-skipped"] is True


# ---------------------------------------------------------------------- no process group
def test_auto_is_off_without_a_process_group():
    net = Net().double()
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), "mgda", shared=net.trunk)
    assert opt.distributed == "auto"
    x, y = global_batch(0)
    opt.backward(losses_of(net(x)[0], y))
    assert opt.distributed == "off" and opt.synchronizer is None
    with opt.no_sync():  # nothing to defer: a no-op
        opt.backward(losses_of(net(x)[0], y))
    opt.step()


@pytest.mark.parametrize("mode", ["global", "local"])
def test_explicit_modes_need_a_process_group(mode):
    net = Net().double()
    opt = gb.GradBalancer(
        torch.optim.SGD(net.parameters(), lr=0.1), "mgda", shared=net.trunk, distributed=mode
    )
    x, y = global_batch(0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        opt.backward(losses_of(net(x)[0], y))
    assert all(p.grad is None for p in net.parameters())


def test_unknown_mode_is_rejected():
    net = Net()
    with pytest.raises(ValueError, match="distributed must be one of"):
        gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), distributed="ddp")


def test_synchronizer_of_a_single_rank_group_changes_nothing(tmp_path):
    from gradbalance.distributed import Synchronizer, resolve

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert resolve("auto") is None  # one rank: nothing to synchronise
        sync = resolve("global")
        assert isinstance(sync, Synchronizer) and sync.world_size == 1
        a, b = torch.arange(3.0), torch.ones(2, 2, dtype=torch.float64)
        out = sync.mean([a, None, b], [a, torch.zeros(4), b])
        assert out[1] is None and torch.equal(out[0], torch.arange(3.0))
        assert sync.calls == 2  # one bucket per dtype
        ref = Net().double()
        net = copy.deepcopy(ref)
        x, y = global_batch(0)
        for model, mode in ((net, "global"), (ref, "off")):
            opt = gb.GradBalancer(
                torch.optim.SGD(model.parameters(), lr=0.1),
                "mgda",
                shared=model.trunk,
                distributed=mode,
            )
            opt.backward(losses_of(model(x)[0], y))
            opt.step()
        assert_params_close(dict(net.named_parameters()), dict(ref.named_parameters()), atol=1e-15)
    finally:
        dist.destroy_process_group()
