"""The engine contract: every engine of `gradbalance.engine.ENGINES` runs through one suite.

Like torch.optim's tests, which run every optimizer from one list, the engines here come from the
registry itself: a new engine is covered by adding it to ``ENGINES``. Each engine answers the same
small problems (a trunk producing features ``z`` and heads reading ``z`` only, ``K = 1, 2, 3``; a
problem where a task misses one shared tensor; float32 and float64), and its result is checked
against a reference computed by hand with one `torch.autograd.grad` per task:

* ``compute`` returns an immutable `TaskGradients`; its Gramian (float64, symmetric, PSD) is
  ``J Jᵀ`` of the reference Jacobian: on the shared parameters, or on the features ``z`` for the
  representation engine; ``others`` is the sum over tasks of each task-specific gradient;
* ``update(request, result, w)`` is ``Jᵀw`` on the shared *parameters* for every engine (for the
  representation engine because the heads read the trunk only through ``z``:
  ``(∂z/∂θ)ᵀ Σ_i w_i ∇_z L_i = Σ_i w_i ∇_θ L_i``); ``direction=`` replaces ``Jᵀw`` where the
  engine holds the Jacobian, and the memory-light engine refuses it;
* nothing writes ``.grad``; ``retain_graph`` decides whether the graph survives ``update``;
* a rows hook sees the parameter rows (the representation engine ignores it: feature gradients
  of different ranks belong to different samples, so averaging them over ranks means nothing).

The last section checks `EngineChoice`, the policy that picks among the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from gradbalance import engine as eng
from gradbalance.engine import (
    ENGINES,
    STRATEGIES,
    EngineChoice,
    MemoryEngine,
    NotApplicable,
    Request,
    TaskGradients,
)
from gradbalance.errors import UnreachedParameterError
from tests.conftest import MultiHeadNet

#: The engines under test: every registered one, from the registry.
ENGINE_NAMES = sorted(ENGINES)

#: Engine cases: each registered engine with its default constructor, plus the memory-light
#: engine with a budget of one Jacobian entry, so every shared tensor is a group of its own.
CASES: dict[str, Callable[[], object]] = {name: ENGINES[name] for name in ENGINE_NAMES}
CASES["memory-split"] = lambda: MemoryEngine(budget=1)

#: The engines whose rows are the Jacobian on the shared parameters (the rows hook applies).
PARAMETER_ROWS = ("loop", "batched", "chained", "memory")


def _kind(case: str) -> str:
    """The registry name of an engine case (``"memory-split"`` is the memory engine)."""
    return case.split("-")[0]


# ---------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """Tensors that stay (``shared`` parameters, task-specific ``others``) and a ``forward`` that
    builds a fresh graph each call: the ``K`` losses and the features the heads read."""

    forward: Callable[[], tuple[list[Tensor], list[Tensor]]]
    shared: list[Tensor]
    others: list[Tensor]

    @property
    def params(self) -> list[Tensor]:
        return [*self.shared, *self.others]

    def request(self, *, retain_graph: bool = False, rows_hook=None, features: bool = True):
        losses, z = self.forward()
        return Request(
            losses,
            self.shared,
            self.others,
            features=z if features else (),
            retain_graph=retain_graph,
            rows_hook=rows_hook,
        )


def _heads(k: int, dtype: torch.dtype) -> Problem:
    """`MultiHeadNet`'s MLP (trunk -> z, one head per task reading z only), plus a task-specific
    tensor that no task reaches."""
    model = MultiHeadNet("mlp", num_tasks=k).to(dtype)
    x, y = model.inputs(batch=5)
    x, y = x.to(dtype), y.to(dtype)
    spare = torch.zeros(2, dtype=dtype, requires_grad=True)

    def forward():
        losses, z = model.losses(x, y, features=True)
        return list(losses.values()), [z]

    return Problem(forward, list(model.trunk.parameters()), [*model.heads.parameters(), spare])


def _partial(dtype: torch.dtype) -> Problem:
    """Two tasks on two feature tensors ``za`` and ``zb``: task 0 reads ``za`` only, so it does
    not reach ``zb``'s trunk parameter ``wb``; the head tensor ``hs`` is read by both tasks and
    ``spare`` by none."""
    g = torch.Generator().manual_seed(1)

    def leaf(*shape: int) -> Tensor:
        return (torch.randn(shape, generator=g) * 0.5).to(dtype).requires_grad_()

    wa, ba, wb = leaf(3, 4), leaf(4), leaf(3, 2)
    h0, h1a, h1b, hs, spare = leaf(4), leaf(4), leaf(2), leaf(1), leaf(3)
    x = torch.randn(5, 3, generator=g).to(dtype)

    def forward():
        za = torch.tanh(x @ wa + ba)
        zb = torch.sin(x @ wb)
        l0 = (za @ h0 + hs).pow(2).mean()
        l1 = ((za @ h1a) * (zb @ h1b)).mean() + hs.pow(2).sum()
        return [l0, l1], [za, zb]

    return Problem(forward, [wa, ba, wb], [h0, h1a, h1b, hs, spare])


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "k1": lambda: _heads(1, torch.float32),
    "k2": lambda: _heads(2, torch.float32),
    "k3": lambda: _heads(3, torch.float32),
    "k3-f64": lambda: _heads(3, torch.float64),
    "partial": lambda: _partial(torch.float32),
    "partial-f64": lambda: _partial(torch.float64),
}


@pytest.fixture(params=list(CASES))
def case(request) -> str:
    return request.param


@pytest.fixture(params=list(PROBLEMS))
def problem(request) -> Problem:
    return PROBLEMS[request.param]()


# --------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """Per-task gradients by hand: one `torch.autograd.grad` per task."""

    per_task: list[list[Tensor | None]]  # [task][shared parameter]
    per_task_z: list[list[Tensor | None]]  # [task][feature]
    others: list[Tensor | None]  # summed over tasks

    @staticmethod
    def of(problem: Problem) -> Reference:
        losses, z = problem.forward()
        n, m = len(problem.shared), len(z)
        per_task: list[list[Tensor | None]] = []
        per_task_z: list[list[Tensor | None]] = []
        others: list[Tensor | None] = [None] * len(problem.others)
        for loss in losses:
            grads = torch.autograd.grad(
                loss, [*problem.shared, *z, *problem.others], retain_graph=True, allow_unused=True
            )
            per_task.append(list(grads[:n]))
            per_task_z.append(list(grads[n : n + m]))
            for j, g in enumerate(grads[n + m :]):
                acc = others[j]
                if g is not None:
                    others[j] = g.clone() if acc is None else acc + g
        return Reference(per_task, per_task_z, others)

    def jacobian(self, on_features: bool) -> Tensor:
        """``J`` (``K × P``, float64), zeros where a task misses a tensor another task reaches
        (a tensor no task reaches has no columns)."""
        per_task = self.per_task_z if on_features else self.per_task
        columns = [col for col in zip(*per_task) if any(g is not None for g in col)]
        like = [next(g for g in col if g is not None) for col in columns]
        rows = []
        for task in zip(*columns):
            parts = [torch.zeros_like(f) if g is None else g for g, f in zip(task, like)]
            rows.append(torch.cat([p.reshape(-1) for p in parts]).double())
        return torch.stack(rows)

    def reached(self, on_features: bool) -> list[bool]:
        per_task = self.per_task_z if on_features else self.per_task
        return [any(g is not None for g in col) for col in zip(*per_task)]

    def task_reached(self, on_features: bool) -> list[bool]:
        per_task = self.per_task_z if on_features else self.per_task
        return [any(g is not None for g in row) for row in per_task]

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``Jᵀw`` on the shared parameters (``None`` where no task reaches a tensor)."""
        out: list[Tensor | None] = []
        for col in zip(*self.per_task):
            present = [(w, g) for w, g in zip(weights.tolist(), col) if g is not None]
            out.append(sum(w * g for w, g in present) if present else None)
        return out


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    """`torch.testing.assert_close` with a tolerance for a model of ``dtype``."""
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _assert_tensors_close(actual, expected, dtype) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None), (a, e)
        if e is not None:
            assert a.shape == e.shape and a.dtype == e.dtype
            _close(a, e, dtype)


def _weights(k: int) -> list[Tensor]:
    mixed = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)[:k]
    return [torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), mixed]


# ---------------------------------------------------------------------------------- registry
def test_the_suite_covers_every_registered_engine():
    assert ENGINE_NAMES == sorted(ENGINES)
    assert {_kind(c) for c in CASES} == set(ENGINES)
    assert set(STRATEGIES) == {"auto", *ENGINES}
    for name, cls in ENGINES.items():
        built = cls()
        assert built.name == name
        assert callable(built.compute) and callable(built.update)


# ---------------------------------------------------------------------------------- compute
def test_compute_matches_the_reference(case, problem):
    kind = _kind(case)
    on_features = kind == "representation"
    ref = Reference.of(problem)
    dtype = problem.shared[0].dtype
    request = problem.request(retain_graph=True)
    k = len(request.losses)
    result = CASES[case]().compute(request)

    assert isinstance(result, TaskGradients)
    assert result.has_jacobian == (kind != "memory")
    with pytest.raises(AttributeError):
        result.others = []
    with pytest.raises(AttributeError):
        result.flat = None

    g = result.gramian(k)
    assert g.dtype == torch.float64 and g.shape == (k, k)
    torch.testing.assert_close(g, g.T, rtol=1e-12, atol=1e-14)
    assert torch.linalg.eigvalsh(g).min() >= -1e-9 * max(1.0, g.diagonal().max().item())
    j = ref.jacobian(on_features)
    _close(g, j @ j.T, dtype)

    _assert_tensors_close(result.others, ref.others, dtype)
    assert result.others[-1] is None  # the spare tensor: no task reaches it
    assert result.reached == ref.reached(on_features)
    assert result.task_reached == ref.task_reached(on_features)
    if result.has_jacobian:
        rows = result.rows
        assert len(rows) == len(ref.per_task_z[0] if on_features else problem.shared)
        flat = torch.cat([r.reshape(k, -1) for r in rows if r is not None], dim=1)
        _close(flat.double(), j, dtype)


def test_a_shared_tensor_no_task_reaches(case):
    problem = PROBLEMS["k2"]()
    unused = torch.ones(3, requires_grad=True)
    problem.shared.append(unused)
    kind = _kind(case)
    built = CASES[case]()
    request = problem.request(retain_graph=True)
    result = built.compute(request)
    w = torch.tensor([0.5, -2.0], dtype=torch.float64)
    if kind == "representation":
        # its rows are on the features; the update names the shared tensor the trunk misses
        assert result.reached == [True]
        with pytest.raises(UnreachedParameterError, match=r"shape \(3,\)"):
            built.update(request, result, w)
        return
    ref = Reference.of(problem)
    assert result.reached == [True] * (len(problem.shared) - 1) + [False]
    if result.has_jacobian:
        assert result.rows[-1] is None
    j = ref.jacobian(False)
    _close(result.gramian(2), j @ j.T, torch.float32)
    _assert_tensors_close(built.update(request, result, w), ref.combine(w), torch.float32)


# ---------------------------------------------------------------------------------- update
def test_update_is_the_weighted_sum_of_the_task_gradients(case, problem):
    ref = Reference.of(problem)
    dtype = problem.shared[0].dtype
    built = CASES[case]()
    request = problem.request(retain_graph=True)
    result = built.compute(request)
    for w in _weights(len(request.losses)):
        _assert_tensors_close(built.update(request, result, w), ref.combine(w), dtype)


def test_direction_replaces_the_weighted_sum(case, problem):
    kind = _kind(case)
    built = CASES[case]()
    request = problem.request(retain_graph=True)
    result = built.compute(request)
    w = torch.ones(len(request.losses), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    if kind == "memory":
        direction = [torch.randn(p.shape, generator=g).to(p.dtype) for p in problem.shared]
        with pytest.raises(ValueError, match="Jacobian"):
            built.update(request, result, w, direction=direction)
        return
    if kind == "representation":
        # a direction on the features, backpropagated through the trunk
        direction = [torch.randn(z.shape, generator=g).to(z.dtype) for z in request.features]
        expected = torch.autograd.grad(
            list(request.features), problem.shared, grad_outputs=direction, retain_graph=True
        )
        out = built.update(request, result, w, direction=direction)
        _assert_tensors_close(out, list(expected), problem.shared[0].dtype)
        return
    direction = [torch.randn(p.shape, generator=g).to(p.dtype) for p in problem.shared]
    out = built.update(request, result, w, direction=direction)
    assert len(out) == len(direction)
    for a, d in zip(out, direction):
        assert torch.equal(a, d)


# ------------------------------------------------------------------------ side effects, graph
def test_nothing_writes_grad(case, problem):
    built = CASES[case]()
    request = problem.request()
    result = built.compute(request)
    assert all(p.grad is None for p in problem.params)
    built.update(request, result, torch.ones(len(request.losses), dtype=torch.float64))
    assert all(p.grad is None for p in problem.params)


@pytest.mark.parametrize("retain", [False, True], ids=["free", "retain"])
def test_retain_graph_decides_whether_the_graph_survives_update(case, problem, retain):
    built = CASES[case]()
    request = problem.request(retain_graph=retain)
    result = built.compute(request)
    built.update(request, result, torch.ones(len(request.losses), dtype=torch.float64))
    total = torch.stack([loss.reshape(()) for loss in request.losses]).sum()
    if retain:
        torch.autograd.grad(total, problem.shared, allow_unused=True)
    else:
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            torch.autograd.grad(total, problem.shared, allow_unused=True)


def test_rows_hook_applies_to_the_parameter_rows(case, problem):
    kind = _kind(case)
    seen: list[Tensor] = []

    def double(rows, tensors):
        assert len(rows) == len(tensors)
        seen.extend(tensors)
        return [None if r is None else 2 * r for r in rows]

    plain = CASES[case]().compute(problem.request())
    hooked = CASES[case]().compute(problem.request(rows_hook=double))
    k = len(plain.task_reached)
    if kind in PARAMETER_ROWS:
        # the hook sees every shared parameter once (the memory engine: group by group)
        assert [id(t) for t in seen] == [id(p) for p in problem.shared]
        torch.testing.assert_close(hooked.gramian(k), 4 * plain.gramian(k))
    else:
        # representation: rows on the features, which are per-sample and not averaged
        assert kind == "representation" and not seen
        torch.testing.assert_close(hooked.gramian(k), plain.gramian(k))


# ---------------------------------------------------------------------------------- chained
def _tied(dtype: torch.dtype = torch.float32) -> Problem:
    """`_heads` with task 0 reading the trunk's first weight directly, not only through z."""
    base = _heads(3, dtype)
    first = base.shared[0]

    def forward():
        losses, z = base.forward()
        return [losses[0] + 0.1 * first.pow(2).sum(), *losses[1:]], z

    return Problem(forward, base.shared, base.others)


def test_heads_reading_shared_parameters_directly(case):
    problem = _tied()
    kind = _kind(case)
    built = CASES[case]()
    request = problem.request()
    if kind == "chained":
        with pytest.raises(NotApplicable):
            built.compute(request)
        # nothing computed, nothing freed: the graph is whole despite retain_graph=False
        total = torch.stack(list(request.losses)).sum()
        torch.autograd.grad(total, problem.shared)
        return
    ref = Reference.of(problem)
    result = built.compute(request)
    # representation: the Jacobian on the features by definition (MGDA-UB's upper bound), which
    # the direct read does not change; the others: the exact parameter Jacobian
    j = ref.jacobian(kind == "representation")
    if kind == "representation":
        _close(result.gramian(3), j @ j.T, torch.float32)
        return
    _close(result.gramian(3), j @ j.T, torch.float32)
    w = _weights(3)[-1]
    _assert_tensors_close(built.update(request, result, w), ref.combine(w), torch.float32)


def test_chained_needs_features():
    problem = PROBLEMS["k2"]()
    request = problem.request(features=False)
    with pytest.raises(NotApplicable, match="features"):
        ENGINES["chained"]().compute(request)
    torch.autograd.grad(torch.stack(list(request.losses)).sum(), problem.shared)  # untouched


# ------------------------------------------------------------------------------ EngineChoice
def _choice(engine: str = "auto", **kwargs) -> EngineChoice:
    kwargs.setdefault("gradient_method", True)
    return EngineChoice(engine, method_name="test-method", **kwargs)


@pytest.mark.parametrize(
    ("features", "expected"), [(False, "loop"), (True, "chained")], ids=["plain", "features"]
)
def test_auto_resolves_on_the_first_compute(features, expected):
    problem = PROBLEMS["k3"]()
    choice = _choice()
    assert choice.name == "auto"
    used, result = choice.compute(problem.request(features=features))
    assert choice.name == expected and used.name == expected
    ref = Reference.of(problem)
    j = ref.jacobian(False)
    _close(result.gramian(3), j @ j.T, torch.float32)
    fresh = _choice()
    fresh.load_state_dict(choice.state_dict())
    assert fresh.name == expected


def test_memory_threshold_switches_auto_to_memory_unless_the_jacobian_is_needed():
    problem = PROBLEMS["k2"]()
    choice = _choice(memory_threshold=1)
    used, result = choice.compute(problem.request())
    assert choice.name == "memory" and used.name == "memory" and not result.has_jacobian
    choice = _choice(memory_threshold=1, needs_jacobian=True)
    used, result = choice.compute(problem.request(features=False))
    assert choice.name == "loop" and used.name == "loop" and result.has_jacobian


@pytest.mark.parametrize(
    ("engine", "kwargs"),
    [
        ("memory", {"needs_jacobian": True}),
        ("chained", {"gradient_method": False}),
        ("representation", {"gradient_method": False}),
        ("no-such-engine", {}),
    ],
)
def test_engine_choice_refuses_what_cannot_serve(engine, kwargs):
    with pytest.raises(ValueError, match=engine):
        _choice(engine, **kwargs)


def test_package_re_exports():
    # the engine classes are reachable from the package, as the registry names them
    for name, cls in ENGINES.items():
        assert getattr(eng, cls.__name__) is cls, name
