"""Finiteness checked on the device (gradbalance/balancer/deferred.py), on the CPU.

Off the CPU a host read of a tensor value is a host synchronisation. These tests force the
device path on the CPU (``opt._pipeline.device_checks = True``) and count host reads with
`benchmarks.hostreads.HostReads` during ``opt.backward(...); opt.step()``: the balancer, the
engines and the methods listed make none (the solvers' own reads on the CPU, NumPy's verified
path and the early exits, are charged to ``solvers/`` and not counted here: on CUDA those paths
are not taken). A skipped step leaves the parameters, ``.grad``'s values and the inner
optimizer's state as they were; a finite step matches the host-checked path.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from torch import nn

import gradbalance as gb
from benchmarks.hostreads import HostReads

#: methods whose step reads nothing on the host outside the solvers (with a fused optimizer)
SYNC_FREE = [
    "equal",
    "uncertainty",
    "mean",
    "imtl-l",
    "rlw",
    "mgda",
    "mgda-ub",
    "upgrad",
    "imtl-g",
    "dwa",
]

imtl_g = importlib.import_module("gradbalance.methods.imtl_g")


@pytest.fixture
def device_branches(monkeypatch):
    """IMTL-G takes its branches on the host on the CPU: take them as on a device."""
    monkeypatch.setattr(imtl_g, "host_checks", lambda g: False)


#: methods that commit host-side state in `update`: one read, in the balancer's step
ONE_READ_IN_STEP = ["pcgrad", "gradnorm"]
#: tests/methods/test_imtl_g.py's Jacobian whose paper normalisation ascends every loss
FLIPPED = [[-1.0, 0.0, 0.0], [-2.0, 0.0, 1.0], [0.0, 1.0, -2.0]]


def _model(k: int = 3, seed: int = 0) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))
    return trunk, heads


def _balancer(
    method: str,
    trunk: nn.Module,
    heads: nn.ModuleList,
    *,
    device_skip: bool,
    inner: str = "adam",
    policy: str = "skip",
    **options,
) -> gb.GradBalancer:
    params = [*trunk.parameters(), *heads.parameters()]
    if inner == "adam":
        opt = torch.optim.Adam(params, lr=0.01, fused=True)
    elif inner == "sgd-fused":
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True)
    else:
        opt = torch.optim.SGD(params, lr=0.01)
    balancer = gb.GradBalancer(opt, method=method, shared=trunk, nonfinite=policy, **options)
    balancer._pipeline.device_checks = device_skip
    return balancer


def _step(opt: gb.GradBalancer, trunk, heads, seed: int, bad: str | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=gen)
    z = trunk(x)
    losses = [h(z).pow(2).mean() + 0.1 for h in heads]
    if bad == "loss":
        losses[1] = losses[1] * math.nan
    elif bad == "head":  # a finite loss whose task-specific gradient is NaN (d√|x| at 0)
        b = heads[2].bias
        losses[2] = losses[2] + (b - b.detach()).abs().sqrt().sum()
    opt.zero_grad()
    features = z if opt.method.name == "mgda-ub" else None
    w = opt.backward(losses, features=features)
    opt.step()
    return w


@pytest.mark.parametrize("method", SYNC_FREE)
def test_no_host_read_outside_the_solvers(method, device_branches):
    trunk, heads = _model()
    opt = _balancer(method, trunk, heads, device_skip=True)
    _step(opt, trunk, heads, 0)  # the first step binds the tasks
    with HostReads() as reads:
        for seed in (1, 2):
            _step(opt, trunk, heads, seed)
        _step(opt, trunk, heads, 3, bad="loss")
    assert reads.outside("solvers/") == {}


@pytest.mark.parametrize("method", ONE_READ_IN_STEP)
def test_methods_with_host_state_read_once_in_step(method):
    trunk, heads = _model()
    opt = _balancer(method, trunk, heads, device_skip=True)
    _step(opt, trunk, heads, 0)
    with HostReads() as reads:
        _step(opt, trunk, heads, 1)
    in_balancer = {k: v for k, v in reads.hits.items() if k[1].startswith("balancer/")}
    assert sum(in_balancer.values()) == 1, in_balancer
    assert all(site.startswith("balancer/deferred.py") for _, site in in_balancer)


#: DWA's run below: (bad step?, end the epoch after it?); epochs close at the ``|``s
DWA_RUN = [(False, False), (False, True)]  # | epoch 0
DWA_RUN += [(False, False), (True, False), (False, True)]  # | epoch 1, one step skipped
DWA_RUN += [(True, True)]  # | every step skipped: not an epoch
DWA_RUN += [(False, False), (False, False), (False, True), (False, False), (True, False)]


def _dwa_run(device_skip: bool, window: int | None) -> tuple[list, gb.GradBalancer, dict, int]:
    trunk, heads = _model()
    opt = _balancer("dwa", trunk, heads, device_skip=device_skip, window=window)
    reads: dict = {}
    weights = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed, (bad, end) in enumerate(DWA_RUN):
            with HostReads() as counted:
                weights.append(_step(opt, trunk, heads, seed, bad="loss" if bad else None))
                if end and window is None:
                    opt.end_epoch()
            if seed:  # the first step binds the tasks
                for site, n in counted.outside("solvers/").items():
                    reads[site] = reads.get(site, 0) + n
    empty = sum("no step was applied" in str(w.message) for w in caught)
    return weights, opt, reads, empty


@pytest.mark.parametrize("window", [None, 2])
def test_dwa_commits_its_epochs_on_the_device_and_matches_the_host(window):
    """DWA's statistics take the flag unread (`Method.update_masked`): a skipped step adds
    nothing, a window closes where the device's count reaches it, and an epoch whose every
    step was skipped is not counted, as on the host-checked path, bit for bit."""
    (w0, host, _, empty0), (w1, device, reads, empty1) = (
        _dwa_run(False, window),
        _dwa_run(True, window),
    )
    assert reads == {}
    # the host path warns of the empty epoch; the device path would need a read to tell
    assert (empty0, empty1) == ((1, 0) if window is None else (0, 0))
    assert int(device.method.epochs) == int(host.method.epochs) == (3 if window is None else 4)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    assert not torch.equal(w1[-2], torch.ones(3, dtype=w1[-2].dtype))  # the weights moved
    s0, s1 = host.method.state_dict(), device.method.state_dict()
    for key, value in s0.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, s1[key], rtol=0, atol=0)
    # a checkpoint of the device path resumes with the counts of its buffers
    trunk, heads = _model()
    again = _balancer("dwa", trunk, heads, device_skip=True, window=window)
    again.load_state_dict(device.state_dict())
    assert (again.method._steps_seen, again.method._epochs_seen) == (
        int(device.method.epoch_steps),
        int(device.method.epochs),
    )


def test_an_optimizer_without_found_inf_costs_one_read():
    trunk, heads = _model()
    opt = _balancer("equal", trunk, heads, device_skip=True, inner="sgd")
    _step(opt, trunk, heads, 0)
    with HostReads() as reads:
        _step(opt, trunk, heads, 1)
    assert reads.total == 1 and next(iter(reads.hits))[1].startswith("balancer/deferred.py")


def _snapshot(opt: gb.GradBalancer, params) -> tuple[list, dict]:
    state = {
        i: {k: v.clone() for k, v in opt.optimizer.state[p].items()}
        for i, p in enumerate(params)
        if p in opt.optimizer.state
    }
    return [p.detach().clone() for p in params], state


@pytest.mark.parametrize("bad", ["loss", "head"])
@pytest.mark.parametrize("method", ["mgda", "equal", "uncertainty"])
def test_a_skipped_step_changes_nothing(method, bad):
    trunk, heads = _model()
    opt = _balancer(method, trunk, heads, device_skip=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    _step(opt, trunk, heads, 0)
    before, state = _snapshot(opt, params)
    w = _step(opt, trunk, heads, 1, bad=bad)
    assert torch.isnan(w).all()
    after, state_after = _snapshot(opt, params)
    for p0, p1 in zip(before, after):
        assert torch.equal(p0, p1)
    assert state.keys() == state_after.keys()
    for i in state:
        for key, value in state[i].items():
            assert torch.equal(value, state_after[i][key]), (i, key)
    assert all(p.grad is not None and not p.grad.any() for p in params)  # masked: zeros
    assert opt.skipped_steps == 1 and opt.steps == 1
    assert torch.isnan(opt.last_weights).all()


@pytest.mark.parametrize("method", ["mgda", "equal", "uncertainty", "upgrad"])
def test_finite_steps_match_the_host_checked_path(method):
    runs = []
    for device_skip in (False, True):
        trunk, heads = _model()
        opt = _balancer(method, trunk, heads, device_skip=device_skip)
        weights = [_step(opt, trunk, heads, s, bad="loss" if s == 2 else None) for s in range(5)]
        params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        state = opt.state_dict()
        runs.append((weights, params, state, opt.steps, opt.skipped_steps))
    (w0, p0, s0, n0, k0), (w1, p1, s1, n1, k1) = runs
    assert (n0, k0) == (n1, k1) == (4, 1)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for i, st in s0["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(value, s1["state"][i][key], rtol=0, atol=0)
    assert s0["gradbalance"]["balancer"] == s1["gradbalance"]["balancer"]


def test_fused_sgd_momentum_first_step_is_decided_on_the_host():
    """Fused SGD allocates its momentum buffers uninitialised on its first step: a skipped
    first step must not reach its kernel."""
    trunk, heads = _model()
    opt = _balancer("equal", trunk, heads, device_skip=True, inner="sgd-fused")
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    _step(opt, trunk, heads, 0, bad="loss")
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert not opt.optimizer.state
    _step(opt, trunk, heads, 1)
    assert all("momentum_buffer" in opt.optimizer.state[p] for p in params)
    with HostReads() as reads:
        _step(opt, trunk, heads, 2, bad="loss")  # the buffers exist: found_inf, no read
    assert reads.total == 0


def test_the_cpu_keeps_the_host_checks_by_default(caplog):
    trunk, heads = _model()
    opt = gb.GradBalancer(
        torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1),
        method="mgda",
        shared=trunk,
        nonfinite="skip",
    )
    with caplog.at_level("WARNING", logger="gradbalance.balancer"):
        _step(opt, trunk, heads, 0, bad="loss")
    assert "skipping the step" in caplog.text
    assert all(p.grad is None for p in trunk.parameters())


def _gram(rows: list[list[float]]) -> torch.Tensor:
    j = torch.tensor(rows, dtype=torch.float64)
    return j @ j.T


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]],  # generic
        [[0.0, 0.0], [0.0, 0.0]],  # every gradient zero: d = 0
        [[1.0, 0.0], [-1.0, 0.0]],  # opposite: n not in the range of G, d = 0
        [[3.0, 1.0], [1.0, 2.0], [2.0, -1.0], [0.5, 0.5]],  # rank-deficient
    ],
)
def test_imtl_g_device_branches_match_the_host_ones(rows):
    g = _gram(rows)
    inputs = gb.methods.StepInputs(
        tasks=tuple(f"t{i}" for i in range(len(rows))),
        losses=torch.ones(len(rows), dtype=torch.float64),
        gramian=g,
    )
    method = gb.methods.get("imtl-g")
    host = method.weights(inputs)
    with HostReads() as reads:
        device = imtl_g._device_weights(g)
    assert reads.total == 0
    torch.testing.assert_close(device, host, rtol=0, atol=0)


def test_imtl_g_device_branches_give_nan_where_the_host_raises():
    # as in tests/methods/test_imtl_g.py: rescale g_1 so that 1ᵀv = 0 (to rounding)
    j = torch.tensor(FLIPPED, dtype=torch.float64)
    g = j @ j.T
    v = torch.linalg.solve(g, g.diagonal().sqrt())
    j[0] *= float(-v[0] / (v[1] + v[2]))
    g = j @ j.T
    inputs = gb.methods.StepInputs(
        tasks=("a", "b", "c"), losses=torch.ones(3, dtype=torch.float64), gramian=g
    )
    with pytest.raises(gb.SolverError, match="summing to 0"):
        gb.methods.get("imtl-g").weights(inputs)
    assert torch.isnan(imtl_g._device_weights(g)).all()


def test_accumulated_backwards_skip_the_step_together():
    trunk, heads = _model()
    opt = _balancer("mgda", trunk, heads, device_skip=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    _step(opt, trunk, heads, 0)
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    for seed, bad in ((1, None), (2, "loss")):
        z = trunk(torch.randn(8, 5, generator=torch.Generator().manual_seed(seed)))
        losses = [h(z).pow(2).mean() + 0.1 for h in heads]
        if bad:
            losses[0] = losses[0] * math.inf
        opt.backward(losses)
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert opt.skipped_steps == 1 and opt.steps == 1


def test_a_closure_step_reads_the_flag_once():
    trunk, heads = _model()
    opt = _balancer("equal", trunk, heads, device_skip=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    x = torch.randn(8, 5)

    def closure(bad: bool):
        def run():
            opt.zero_grad()
            z = trunk(x)
            losses = [h(z).pow(2).mean() for h in heads]
            if bad:
                losses[1] = losses[1] * math.nan
            opt.backward(losses)
            return sum(loss.detach() for loss in losses)

        return run

    assert torch.isfinite(opt.step(closure(False)))
    before = [p.detach().clone() for p in params]
    with HostReads() as reads:
        opt.step(closure(True))
    assert reads.total == 1
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert (opt.steps, opt.skipped_steps) == (1, 1)


def test_state_dict_folds_the_device_counts_and_loads():
    trunk, heads = _model()
    opt = _balancer("mgda", trunk, heads, device_skip=True)
    for seed, bad in ((0, None), (1, "loss"), (2, None), (3, "head")):
        _step(opt, trunk, heads, seed, bad=bad)
    sd = opt.state_dict()
    assert (
        sd["gradbalance"]["balancer"]["steps"],
        sd["gradbalance"]["balancer"]["skipped_steps"],
    ) == (2, 2)
    assert (opt.steps, opt.skipped_steps) == (2, 2)
    trunk2, heads2 = _model()
    other = _balancer("mgda", trunk2, heads2, device_skip=True)
    other.load_state_dict(sd)
    assert (other.steps, other.skipped_steps) == (2, 2)
    _step(other, trunk2, heads2, 4, bad="loss")
    assert (other.steps, other.skipped_steps) == (2, 3)


def test_sparse_task_gradients_are_masked_too():
    torch.manual_seed(0)
    trunk = nn.Linear(4, 4)
    table = nn.Embedding(10, 4, sparse=True)
    head = nn.Linear(4, 1)
    opt = gb.GradBalancer(
        torch.optim.SGD([*trunk.parameters(), *table.parameters(), *head.parameters()], lr=0.1),
        method="equal",
        shared=trunk,
        nonfinite="skip",
    )
    opt._pipeline.device_checks = True
    idx = torch.tensor([1, 3, 3])
    for bad in (False, True):
        opt.zero_grad()
        z = trunk(torch.randn(3, 4))
        a = head(z).pow(2).mean()
        b = (table(idx) * z).sum() * (math.nan if bad else 1.0)
        w = opt.backward([a, b])
        assert bool(torch.isnan(w).all()) == bad
        grad = table.weight.grad
        assert grad is not None and grad.layout == torch.sparse_coo
        assert bool(torch.isfinite(grad.coalesce().values()).all())
        assert bool(grad.coalesce().values().any()) != bad
        opt.step()


@pytest.mark.parametrize("method", ["equal", "mgda", "upgrad"])
def test_raise_reads_once_and_matches_the_host_path(method, device_branches):
    runs = []
    for device in (False, True):
        trunk, heads = _model()
        opt = _balancer(method, trunk, heads, device_skip=device, policy="raise")
        _step(opt, trunk, heads, 0)
        with HostReads() as reads:
            w = _step(opt, trunk, heads, 1)
        outside = {k: v for k, v in reads.outside("solvers/").items()}
        runs.append((w, [p.detach().clone() for p in trunk.parameters()], outside))
    (w0, p0, reads0), (w1, p1, reads1) = runs
    torch.testing.assert_close(w0, w1, rtol=0, atol=0)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sum(reads0.values()) >= 3
    assert sum(reads1.values()) == 1 and next(iter(reads1))[1].startswith("balancer/deferred.py")


@pytest.mark.parametrize("bad", ["loss", "head"])
@pytest.mark.parametrize("method", ["equal", "mgda"])
def test_raise_names_the_same_task_and_writes_nothing(method, bad):
    messages = []
    for device in (False, True):
        trunk, heads = _model()
        opt = _balancer(method, trunk, heads, device_skip=device, policy="raise")
        _step(opt, trunk, heads, 0)
        params = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        with pytest.raises(gb.NonFiniteError) as err:
            _step(opt, trunk, heads, 1, bad=bad)
        assert all(p.grad is None for p in params)
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert opt.steps == 1 and opt.skipped_steps == 0
        messages.append(str(err.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("mixed_dtypes", [False, True])
def test_weights_on_the_cpu_meet_losses_on_another_device(mixed_dtypes):
    """Equal, mean, fixed and RLW return their weights on the CPU: on CUDA the weighted loss
    multiplied a CUDA vector by a CPU one and raised (no device here: the meta device stands in
    for it, with the same rule)."""
    from gradbalance.balancer.inputs import stack_losses, weighted_sum

    dtypes = (torch.float32, torch.float64) if mixed_dtypes else (torch.float32, torch.float32)
    losses = [torch.ones((), device="meta", dtype=d, requires_grad=True) for d in dtypes]
    stacked, _ = stack_losses(losses, differentiable=True)
    assert (stacked is None) == mixed_dtypes
    out = weighted_sum(torch.tensor([0.25, 0.75], dtype=torch.float64), losses, stacked)
    assert out.device.type == "meta" and out.requires_grad


@pytest.mark.parametrize("method", ["uncertainty", "imtl-l"])
def test_learnable_method_parameters_follow_a_model_off_the_cpu(method):
    # on CUDA, log-variances left on the CPU would send their gradient to the host every step
    # (a synchronisation) and make the weights there; the meta device stands in for CUDA
    trunk = torch.nn.Linear(3, 4, device="meta")
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1, device="meta") for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(torch.optim.SGD(params, lr=0.1), method, shared=trunk, tasks=["a", "b"])
    own = [p for p in opt.method.parameters() if p.requires_grad]
    assert own and all(p.device.type == "meta" for p in own)
    group = opt.param_groups[-1]["params"]  # the group the optimizer steps is the moved one
    assert all(any(p is q for q in group) for p in own)
    assert all(b.device.type == "meta" for b in opt.method.buffers())


def test_method_parameters_stay_where_they_are_for_a_cpu_model():
    model = torch.nn.Linear(3, 2)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), "uncertainty", shared=model, tasks=["a", "b"]
    )
    assert opt.method.log_vars.device.type == "cpu"
