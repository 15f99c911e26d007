"""Properties every registered method must have, and the ones each method's class claims.

The list of methods is taken from the registry at import time (after importing every module of
``gradbalance.methods``), so a method added later is covered without editing this file. Each
method is built with its ``example_options`` (defaults, except for the few that have required
arguments) and driven directly with hand-built `StepInputs` over a short run of steps
(``weights`` → ``combine`` for Jacobian methods → ``update``), as `GradBalancer` drives it:

* finite weights and update, also with degenerate gradients (a zero row, duplicated rows);
* the same state gives the same run (stochastic methods included: their randomness is seeded);
* permutation equivariance for deterministic methods: permuting the tasks permutes the weights
  and leaves the update unchanged;
* the uniform-scaling behaviour the class declares in ``scale_invariant``;
* non-negative inner products with every task gradient where ``non_conflicting`` is claimed;
* for stateful methods, a ``state_dict`` round trip (through ``torch.save`` and
  ``torch.load(weights_only=True)``) into a fresh, unbound object continues identically;
* one real step through `GradBalancer` (features or KPIs passed where the method needs them).
"""

from __future__ import annotations

import copy
import importlib
import io
import pkgutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
import gradbalance.methods as gbm
from gradbalance.methods import (
    FEATURES,
    JACOBIAN,
    KPIS,
    LAST_SHARED_GRAMIAN,
    Method,
    StepInputs,
)
from gradbalance.methods.registry import available, get_class
from tests.conftest import MultiHeadNet

for _module in pkgutil.iter_modules(gbm.__path__):
    importlib.import_module(f"gradbalance.methods.{_module.name}")

METHODS = available()


# Shapes of the shared tensors the hand-built Jacobians are split into (P = 10).
SHAPES = ((3, 2), (4,))
P = sum(int(np.prod(s)) for s in SHAPES)
STEPS = 3
SETTINGS = settings(max_examples=5, deadline=None, derandomize=True)


def build(name: str, tasks: tuple[str, ...]) -> Method:
    cls = get_class(name)
    kwargs = cls.example_options(tasks)
    try:
        method = cls(**kwargs)
    except TypeError as err:
        pytest.fail(
            f"method {name!r} cannot be built with its example_options ({err}); override "
            "Method.example_options in the method's class to give its required arguments"
        )
    method.bind(tasks)
    return method


def make_run(k: int, seed: int, kind: str = "random") -> list[dict[str, Any]]:
    """``STEPS`` steps of raw data: Jacobian ``(K, P)`` (float64), positive losses, KPIs."""
    rng = np.random.default_rng(seed)
    run = []
    for _ in range(STEPS):
        jac = rng.standard_normal((k, P)) * rng.uniform(0.5, 2.0, size=(k, 1))
        if kind == "zero-row":
            jac[0] = 0.0
        elif kind == "duplicate":
            jac[1] = jac[0]
        run.append(
            {
                "jacobian": torch.from_numpy(jac),
                "losses": torch.from_numpy(rng.uniform(0.2, 3.0, size=k)),
                "kpis": torch.from_numpy(rng.uniform(0.05, 0.95, size=k)),
            }
        )
    return run


def transform(run, *, scale: float = 1.0, perm: list[int] | None = None):
    out = []
    for step in run:
        idx = perm if perm is not None else list(range(step["losses"].numel()))
        out.append(
            {
                "jacobian": step["jacobian"][idx] * scale,
                "losses": step["losses"][idx] * scale,
                "kpis": step["kpis"][idx],
            }
        )
    return out


def inputs_for(method: Method, tasks: tuple[str, ...], step: dict[str, Any], t: int) -> StepInputs:
    jac = step["jacobian"]
    k = jac.shape[0]
    rows, start = [], 0
    for shape in SHAPES:
        n = int(np.prod(shape))
        rows.append(jac[:, start : start + n].reshape(k, *shape))
        start += n
    gram = jac @ jac.T
    last = rows[-1].reshape(k, -1)
    return StepInputs(
        tasks=tasks,
        losses=step["losses"].clone(),
        gramian=gram if method.is_gradient_method() else None,
        last_shared_gramian=last @ last.T if LAST_SHARED_GRAMIAN in method.requires else None,
        kpis=step["kpis"].clone() if KPIS in method.requires else None,
        step=t,
        jacobian=tuple(rows) if JACOBIAN in method.requires else None,
    )


def drive(method: Method, tasks: tuple[str, ...], run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the method over ``run``; return (weights, flat update of the shared tensors)."""
    out = []
    for t, step in enumerate(run):
        inputs = inputs_for(method, tasks, step, t)
        w = method.weights(inputs).detach()
        assert w.shape == (len(tasks),), f"{method.name}: weights of shape {tuple(w.shape)}"
        if JACOBIAN in method.requires:
            parts = method.combine(inputs, w)
            assert len(parts) == len(SHAPES)
            for part, shape in zip(parts, SHAPES):
                assert part is not None and tuple(part.shape) == shape
            update = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in parts])
        else:
            update = step["jacobian"].T @ w.to(torch.float64)
        method.update(inputs, w)
        out.append((w.to(torch.float64), update))
    return out


def tasks_of(k: int) -> tuple[str, ...]:
    return tuple(f"task{i}" for i in range(k))


def close(a: torch.Tensor, b: torch.Tensor, what: str, name: str, rtol: float = 1e-6) -> None:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    torch.testing.assert_close(
        a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {what} differ\n{m}"
    )


# ---------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(k=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_weights_and_update_are_finite(name, k, seed):
    tasks = tasks_of(k)
    for w, update in drive(build(name, tasks), tasks, make_run(k, seed)):
        assert bool(torch.isfinite(w).all()), f"{name}: non-finite weights {w}"
        assert bool(torch.isfinite(update).all()), f"{name}: non-finite update"


@pytest.mark.parametrize("kind", ["zero-row", "duplicate"])
@pytest.mark.parametrize("name", METHODS)
def test_finite_with_degenerate_gradients(name, kind):
    """Finite, or a `GradBalanceError` that says why (never NaN weights)."""
    k = 3
    tasks = tasks_of(k)
    for seed in range(2):
        try:
            results = drive(build(name, tasks), tasks, make_run(k, seed, kind))
        except gb.GradBalanceError as err:
            assert str(err), f"{name} ({kind}) raised {type(err).__name__} without a message"
            continue
        for w, update in results:
            assert bool(torch.isfinite(w).all()), f"{name} ({kind}): non-finite weights {w}"
            assert bool(torch.isfinite(update).all()), f"{name} ({kind}): non-finite update"


@pytest.mark.parametrize("name", METHODS)
def test_same_state_gives_the_same_run(name):
    k = 3
    tasks = tasks_of(k)
    first = build(name, tasks)
    second = copy.deepcopy(first)
    run = make_run(k, 7)
    for (w1, u1), (w2, u2) in zip(drive(first, tasks, run), drive(second, tasks, run)):
        assert torch.equal(w1, w2), f"{name}: same state, different weights"
        assert torch.equal(u1, u2), f"{name}: same state, different update"


@pytest.mark.parametrize("name", [n for n in METHODS if not get_class(n).stochastic])
@SETTINGS
@given(k=st.integers(2, 4), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_permutation_equivariance(name, k, seed, data):
    perm = data.draw(st.permutations(list(range(k))))
    tasks = tasks_of(k)
    permuted_tasks = tuple(tasks[i] for i in perm)
    run = make_run(k, seed)
    plain = drive(build(name, tasks), tasks, run)
    permuted = drive(build(name, permuted_tasks), permuted_tasks, transform(run, perm=perm))
    for t, ((w1, u1), (w2, u2)) in enumerate(zip(plain, permuted)):
        close(w2, w1[perm], f"weights at step {t}", name)
        close(u2, u1, f"update at step {t}", name)


SCALE_CLAIMS = [n for n in METHODS if get_class(n).scale_invariant is not None]


@pytest.mark.parametrize("name", SCALE_CLAIMS)
@SETTINGS
@given(
    k=st.integers(2, 4),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 0.37, 8.0, 1e3]),
)
def test_uniform_scaling_behaves_as_declared(name, k, seed, scale):
    tasks = tasks_of(k)
    method = build(name, tasks)
    twin = copy.deepcopy(method)  # the same seed for stochastic methods
    run = make_run(k, seed)
    plain = drive(method, tasks, run)
    scaled = drive(twin, tasks, transform(run, scale=scale))
    claim = get_class(name).scale_invariant
    for t, ((w1, u1), (w2, u2)) in enumerate(zip(plain, scaled)):
        if claim == "weights":
            close(w2, w1, f"weights at step {t} (scale {scale})", name, rtol=1e-5)
            close(u2, u1 * scale, f"update at step {t} (scale {scale})", name, rtol=1e-5)
        else:
            close(u2, u1, f"update at step {t} (scale {scale})", name, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in METHODS if get_class(n).non_conflicting])
@SETTINGS
@given(k=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_non_conflicting_update(name, k, seed):
    tasks = tasks_of(k)
    run = make_run(k, seed)
    for t, (step, (_, update)) in enumerate(zip(run, drive(build(name, tasks), tasks, run))):
        products = step["jacobian"] @ update
        bound = 1e-7 * float(update.norm()) * step["jacobian"].norm(dim=1)
        assert bool((products >= -bound).all()), (
            f"{name} claims non_conflicting, but at step {t} the update has inner products "
            f"{products.tolist()} with the task gradients"
        )


STATEFUL = [n for n in METHODS if get_class(n).stateful]


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip_continues_identically(name):
    k = 3
    tasks = tasks_of(k)
    run = make_run(k, 11)
    method = build(name, tasks)
    drive(method, tasks, run[:2])
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    cls = get_class(name)
    fresh = cls(**cls.example_options(tasks))
    fresh.load_state_dict(state)
    assert fresh.tasks == tasks
    inputs_a = inputs_for(method, tasks, run[2], 2)
    inputs_b = inputs_for(fresh, tasks, run[2], 2)
    (w1, u1), (w2, u2) = drive_step(method, inputs_a, run[2]), drive_step(fresh, inputs_b, run[2])
    assert torch.equal(w1, w2), f"{name}: weights differ after the round trip"
    assert torch.equal(u1, u2), f"{name}: update differs after the round trip"
    after_a, after_b = method.state_dict(), fresh.state_dict()
    assert after_a.keys() == after_b.keys()
    for key in after_a:
        if isinstance(after_a[key], torch.Tensor):
            assert torch.equal(after_a[key], after_b[key]), f"{name}: {key} differs"


@pytest.mark.parametrize("name", STATEFUL)
def test_every_stateful_method_runs_the_shared_resume_check(name):
    """Each stateful method's test file resumes a balancer through `check_resume`."""
    module = get_class(name).__module__.rsplit(".", 1)[-1]
    source = (Path(__file__).parent / f"test_{module}.py").read_text(encoding="utf-8")
    assert "check_resume(" in source, f"tests/methods/test_{module}.py does not run check_resume"


def drive_step(method: Method, inputs: StepInputs, step) -> tuple[torch.Tensor, torch.Tensor]:
    w = method.weights(inputs).detach()
    if JACOBIAN in method.requires:
        parts = method.combine(inputs, w)
        update = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in parts])
    else:
        update = step["jacobian"].T @ w.to(torch.float64)
    method.update(inputs, w)
    return w.to(torch.float64), update


# ---------------------------------------------------------------------------- hooks
HOOKED = {"end_epoch": {"dwa"}, "observe": {"famo"}}


@pytest.mark.parametrize("hook", sorted(HOOKED))
def test_only_the_methods_that_need_them_override_the_epoch_and_observe_hooks(hook):
    overriding = {n for n in METHODS if getattr(get_class(n), hook) is not getattr(Method, hook)}
    assert overriding == HOOKED[hook]


@pytest.mark.parametrize("name", [n for n in METHODS if n not in {"dwa", "famo"}])
def test_the_default_hooks_change_nothing(name):
    k = 3
    tasks = tasks_of(k)
    run = make_run(k, 5)
    method = build(name, tasks)
    drive(method, tasks, run[:1])
    before = copy.deepcopy(method.state_dict())
    assert method.end_epoch() is None
    assert method.observe(torch.ones(k)) is False
    after = method.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), f"{name}: {key} changed"


# ---------------------------------------------------------------------------- one real step
@pytest.mark.parametrize("name", METHODS)
def test_two_steps_through_the_balancer(name):
    model = MultiHeadNet("mlp")
    tasks = ("t0", "t1", "t2")
    cls = get_class(name)
    kwargs = get_class(name).example_options(tasks)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        name,
        shared=model.trunk,
        tasks=list(tasks),
        **kwargs,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in range(2):
        x, y = model.inputs(seed=seed)
        extra: dict[str, Any] = {}
        if FEATURES in cls.requires:
            losses, z = model.losses(x, y, features=True)
            extra["features"] = z
        else:
            losses = model.losses(x, y)
        if KPIS in cls.requires:
            extra["kpis"] = {t: 0.2 + 0.3 * i for i, t in enumerate(tasks)}
        opt.zero_grad()
        w = opt.backward(losses, **extra)
        assert bool(torch.isfinite(w).all()), f"{name}: weights {w}"
        for n, p in model.named_parameters():
            assert p.grad is not None, f"{name}: no gradient on {n}"
            assert bool(torch.isfinite(p.grad).all()), f"{name}: non-finite gradient on {n}"
        opt.step()
    assert opt.steps == 2
    trunk = model.trunk.named_parameters(prefix="trunk")
    assert any(not torch.equal(before[n], p) for n, p in trunk), f"{name}: the trunk did not move"
