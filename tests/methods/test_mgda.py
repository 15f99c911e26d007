"""MGDA and MGDA-UB end to end: the min-norm update, Pareto stationarity, and the upper bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.solvers import min_norm, min_norm_gap

D = torch.float64


def _jacobian(losses, params):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros_like(p).flatten() if g is None else g.flatten()
                    for p, g in zip(params, grads)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_shared_update_is_the_min_norm_point_of_the_normalised_gradients(normalization):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh()).double()
    heads = nn.ModuleList(nn.Linear(7, 1).double() for _ in range(3))
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    z = trunk(x)
    losses = [(h(z).squeeze(-1) - y[:, i]).pow(2).mean() + 0.1 for i, h in enumerate(heads)]
    shared = list(trunk.parameters())
    J = _jacobian(losses, shared)
    n = {
        "none": torch.ones(3, dtype=D),
        "l2": J.norm(dim=1),
        "loss": torch.stack(losses).detach(),
        "loss+": torch.stack(losses).detach() * J.norm(dim=1),
    }[normalization]
    Jn = J / n[:, None]
    alpha = min_norm(Jn @ Jn.T, tol=1e-15)
    expected = Jn.T @ alpha

    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalancer(
        torch.optim.SGD(params, lr=0.1), method="mgda", shared=trunk, normalization=normalization
    )
    w = opt.backward(losses)
    got = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)
    # the returned weights are in the default dtype (float32)
    torch.testing.assert_close((w.double() * n), alpha, atol=1e-6, rtol=1e-6)
    # each head gets its own task's unweighted gradient
    for i, h in enumerate(heads):
        (g,) = torch.autograd.grad(losses[i], h.weight, retain_graph=True)
        torch.testing.assert_close(h.weight.grad, g)


def test_unnormalised_direction_decreases_every_task():
    torch.manual_seed(1)
    J = torch.randn(4, 10, dtype=torch.float64)
    G = J @ J.T
    w = gb.methods.MGDA()
    w.bind(tuple("abcd"))
    alpha = w.weights(gb.methods.StepInputs(tuple("abcd"), torch.ones(4, dtype=D), gramian=G))
    d = J.T @ alpha
    assert torch.all(J @ d >= d.dot(d) - 1e-10)


def test_mgda_steps_reach_pareto_stationarity_on_a_two_objective_toy():
    # f1 = |x - a|², f2 = |x - b|²: the Pareto set is the segment [a, b]. MGDA's direction is
    # the min-norm point of {∇f1, ∇f2}'s hull; it vanishes exactly on the segment.
    a = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    b = torch.tensor([0.0, 1.0, 0.0], dtype=D)
    x = nn.Parameter(torch.tensor([2.0, 2.0, 1.5], dtype=D))
    opt = gb.GradBalancer(torch.optim.SGD([x], lr=0.1), method="mgda", shared=[x])
    for _ in range(300):
        opt.zero_grad()
        f1, f2 = (x - a).pow(2).sum(), (x - b).pow(2).sum()
        before = torch.stack([f1, f2]).detach()
        opt.backward({"f1": f1, "f2": f2})
        opt.step()
        after = torch.stack([(x - a).pow(2).sum(), (x - b).pow(2).sum()]).detach()
        # a common descent direction with a small step: no objective goes up
        assert torch.all(after <= before + 1e-12)
    # x lies on the segment [a, b]
    t = ((x.detach() - a) @ (b - a) / (b - a).dot(b - a)).clamp(0, 1)
    assert torch.linalg.vector_norm(x.detach() - (a + t * (b - a))) < 1e-6
    # and the min-norm element of the gradients' hull is (numerically) zero
    G = opt.last_gramian
    alpha = min_norm(G)
    assert alpha @ G @ alpha < 1e-10
    assert min_norm_gap(G, alpha) < 1e-10


@pytest.mark.parametrize("normalization", ["none", "l2", "loss+"])
def test_mgda_ub_equals_mgda_when_the_features_are_the_only_path(normalization):
    # z = Q θ with Q orthogonal: ∇_θ L = Qᵀ ∇_z L, so both Gramians, weights and updates agree.
    torch.manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    theta = nn.Parameter(torch.randn(6, dtype=torch.float64))
    heads = nn.ModuleList(nn.Linear(6, 1).double() for _ in range(3))
    x = torch.randn(12, 6, dtype=torch.float64)

    def losses_and_features():
        z = q @ theta
        out = {}
        for i, h in enumerate(heads):
            pred = h(x * z).squeeze(-1)
            out[f"t{i}"] = (pred - i).pow(2).mean()
        return out, z

    results = {}
    for method in ("mgda", "mgda-ub"):
        for p in [theta, *heads.parameters()]:
            p.grad = None
        opt = gb.GradBalancer(
            torch.optim.SGD([theta, *heads.parameters()], lr=0.1),
            method=method,
            shared=[theta],
            normalization=normalization,
        )
        losses, z = losses_and_features()
        w = opt.backward(losses, features=z if method == "mgda-ub" else None)
        results[method] = (w, theta.grad.clone(), [p.grad.clone() for p in heads.parameters()])
    (w1, g1, h1), (w2, g2, h2) = results["mgda"], results["mgda-ub"]
    torch.testing.assert_close(w1, w2, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-8)
    for a, b in zip(h1, h2):
        torch.testing.assert_close(a, b)


def test_mgda_ub_without_features_names_the_fix():
    theta = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = gb.GradBalancer(torch.optim.SGD([theta], lr=0.1), method="mgda-ub", shared=[theta])
    with pytest.raises(gb.MissingInputError, match="features"):
        opt.backward({"a": theta.sum(), "b": theta.pow(2).sum()})


@pytest.mark.parametrize("name, label", [("mgda", "MGDA"), ("mgda-ub", "MGDA-UB")])
def test_missing_gramian_is_a_missing_input_error(name, label):
    m = gb.methods.get(name)
    m.bind(("a", "b"))
    with pytest.raises(gb.MissingInputError, match=f"{label} needs the Gramian"):
        m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2)))


def test_bad_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization"):
        gb.methods.MGDA(normalization="max")


def test_gradient_norms_spread_over_sixteen_orders_of_magnitude():
    """Issue 12: norms 1e8 : 1 : 1e-8 (random directions). The min-norm point is at most as long
    as the shortest gradient; the solver used to stop at objective ~0.25 (relative to 1e16)."""
    gen = torch.Generator().manual_seed(0)
    j = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    norms = torch.tensor([1e8, 1.0, 1e-8], dtype=torch.float64)
    j = j / j.norm(dim=1, keepdim=True) * norms[:, None]
    g = j @ j.T
    m = gb.methods.MGDA()
    m.bind(("a", "b", "c"))
    w = m.weights(gb.methods.StepInputs(("a", "b", "c"), torch.ones(3), gramian=g))
    assert float(w @ g @ w) <= 1e-16 * (1 + 1e-9)
    assert float(w.sum()) == pytest.approx(1.0)
