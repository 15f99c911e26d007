"""The three engine strategies compute the same per-task gradients and Gramian."""

from __future__ import annotations

import pytest
import torch

from gradbalance import engine
from tests.conftest import MultiHeadNet


def reference_jacobian(model, losses):
    rows = []
    shared = list(model.trunk.parameters())
    for loss in losses.values():
        grads = torch.autograd.grad(loss, shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["mlp", "conv", "convbn"])
@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_parameter_gramian_matches_reference(kind, strategy):
    model = MultiHeadNet(kind)
    x, y = model.inputs()
    losses = model.losses(x, y)
    j = reference_jacobian(model, losses)
    heads = list(model.heads.parameters())
    tg = engine.task_gradients(
        list(losses.values()),
        list(model.trunk.parameters()),
        heads,
        strategy=strategy,
        retain_graph=True,
    )
    g = engine.gramian(tg.rows, 3)
    torch.testing.assert_close(g, j @ j.T, rtol=1e-5, atol=1e-8)
    assert all(tg.task_reached)
    # task-specific parameters get the sum of their tasks' gradients (each head: one task)
    total = sum(losses.values())
    expected = torch.autograd.grad(total, heads)
    for a, b in zip(tg.others, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["mlp", "conv", "convbn"])
def test_representation_gramian_matches_feature_jacobian(kind):
    model = MultiHeadNet(kind)
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    rows = [
        torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1).double()
        for loss in losses.values()
    ]
    j = torch.stack(rows)
    tg = engine.task_gradients(
        list(losses.values()),
        [z],
        list(model.heads.parameters()),
        strategy="loop",
        retain_graph=True,
    )
    torch.testing.assert_close(engine.gramian(tg.rows, 3), j @ j.T)
    # backprop of the combined feature gradient equals the weighted parameter gradient
    w = torch.tensor([0.2, 0.3, 0.5])
    shared = list(model.trunk.parameters())
    grads = engine.backprop_features([z], shared, engine.combine(tg.rows, w), retain_graph=True)
    weighted = sum(wi * li for wi, li in zip(w, losses.values()))
    expected = torch.autograd.grad(weighted, shared)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "convbn"])
def test_engines_agree_through_the_balancer(kind):
    import gradbalance as gb
    from tests.conftest import GramianFixed

    grams = {}
    for strategy in ["loop", "batched", "representation"]:
        model = MultiHeadNet(kind)
        opt = gb.GradBalancer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            method=GramianFixed([1.0, 1.0, 1.0]),
            shared=model.trunk,
            engine=strategy,
        )
        x, y = model.inputs()
        losses, z = model.losses(x, y, features=True)
        opt.backward(losses, features=z)
        grams[strategy] = opt.last_gramian
        grads = [p.grad.clone() for p in model.parameters()]
        if strategy == "loop":
            ref = grads
        else:
            for a, b in zip(ref, grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grams["loop"], grams["batched"])


def test_combine_and_gramian_small_example():
    rows = [torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[0.5], [2.0]])]
    g = engine.gramian(rows, 2)
    j = torch.tensor([[1.0, 2.0, 0.5], [3.0, -1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(g, j @ j.T)
    out = engine.combine(rows, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(out[0], torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(out[1], torch.tensor([3.0]))


def test_gramian_is_accumulated_in_float64():
    a = torch.tensor([[1.0, 1e-4]], dtype=torch.float32).repeat(2, 1)
    a[1, 1] = -1e-4
    g = engine.gramian([a], 2)
    assert g.dtype == torch.float64
    assert g[0, 0] - g[0, 1] == pytest.approx(2e-8, rel=1e-3)


def test_probe_falls_back_to_loop_when_vmap_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("vmap: no batching rule")

    monkeypatch.setattr(engine.batched, "batched_gradients", broken)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = [w.sum(), (w**2).sum()]
    tg, strategy = engine.probe_batched(losses, [w], [], retain_graph=False)
    assert strategy == "loop"
    torch.testing.assert_close(tg.rows[0], torch.tensor([[1.0, 1.0], [2.0, 4.0]]))


def test_probe_keeps_batched_when_it_works():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = [w.sum(), (w**2).sum()]
    tg, strategy = engine.probe_batched(losses, [w], [], retain_graph=False)
    assert strategy == "batched"
    torch.testing.assert_close(tg.rows[0], torch.tensor([[1.0, 1.0], [2.0, 4.0]]))


def _partial_problem():
    """Three tasks on four shared tensors: one reached by task 0 only, one by no task."""
    torch.manual_seed(0)
    a = torch.randn(3, 2, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    only0 = torch.randn(2, 2, requires_grad=True)
    unused = torch.randn(5, requires_grad=True)
    x = torch.randn(6, 3)
    h = torch.tanh(x @ a)
    losses = [
        (h @ only0).pow(2).mean() + b.sum(),
        h.sin().mean() + (b * b).sum(),
        h.pow(3).mean() - b.mean(),
    ]
    return losses, [a, b, only0, unused]


def test_loop_flat_jacobian_matches_per_tensor_rows():
    losses, shared = _partial_problem()
    tg = engine.task_gradients(losses, shared, strategy="loop", retain_graph=True)
    assert tg.flat is not None and tg.flat.shape == (3, 6 + 4 + 4)
    assert tg.reached == [True, True, True, False]
    expected = []
    for t in shared:
        cols = [
            torch.autograd.grad(loss, t, retain_graph=True, allow_unused=True)[0] for loss in losses
        ]
        expected.append(
            None
            if all(c is None for c in cols)
            else torch.stack([torch.zeros_like(t) if c is None else c for c in cols])
        )
    rows = tg.rows  # built from flat on first read
    assert rows[3] is None
    for r, e in zip(rows[:3], expected[:3]):
        torch.testing.assert_close(r, e)
    torch.testing.assert_close(tg.gramian(3), engine.gramian(expected, 3))
    w = torch.tensor([0.5, -1.0, 2.0])
    for c, e in zip(tg.combine(w), engine.combine(expected, w)):
        assert (c is None) == (e is None)
        if c is not None:
            assert c.shape == e.shape
            torch.testing.assert_close(c, e)
    # results are immutable: new rows (as the distributed path averages them) make a new
    # result, without the flat matrix
    with pytest.raises(AttributeError, match="immutable"):
        tg.rows = rows  # type: ignore[misc]
    doubled = tg.with_rows([None if r is None else 2 * r for r in rows])
    assert doubled.flat is None and tg.flat is not None
    torch.testing.assert_close(doubled.gramian(3), 4 * engine.gramian(expected, 3))


def test_loop_falls_back_to_stacks_for_mixed_dtypes():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    losses = [a.sum() + b.sum(), (a * a).sum() + (b * b).sum()]
    tg = engine.task_gradients(losses, [a, b], strategy="loop", retain_graph=True)
    assert tg.flat is None
    assert tg.rows[1].dtype == torch.float64
    torch.testing.assert_close(tg.rows[0], torch.stack([torch.ones(3), 2 * a.detach()]))
