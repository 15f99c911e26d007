"""RLW: the weights are a distribution drawn from the documented law, reproducible from the seed
and the step, and carried through checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods import StepInputs
from gradbalance.methods.rlw import RLW
from tests.conftest import MultiHeadNet
from tests.methods.jacobians import make_balancer
from tests.methods.resume import check_resume


def make(k: int = 3, **kw) -> RLW:
    m = RLW(**kw)
    m.bind(tuple(f"t{i}" for i in range(k)))
    return m


def weights(m: RLW, step: int, k: int = 3) -> torch.Tensor:
    return m.weights(StepInputs(tuple(f"t{i}" for i in range(k)), torch.ones(k), step=step))


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
@settings(max_examples=15, deadline=None, derandomize=True)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**40), step=st.integers(0, 10**6))
def test_weights_are_a_reproducible_distribution(distribution, k, seed, step):
    m = make(k, distribution=distribution, seed=seed)
    w = weights(m, step, k)
    assert w.dtype == torch.float64 and w.shape == (k,)
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1.0) < 1e-12
    assert torch.equal(w, weights(make(k, distribution=distribution, seed=seed), step, k))
    if k > 1:
        assert not torch.equal(w, weights(m, step + 1, k))
        assert not torch.equal(
            w, weights(make(k, distribution=distribution, seed=seed + 1), step, k)
        )


def test_normal_and_uniform_laws():
    # two tasks: log(w0 / w1) = x0 − x1, with variance 2 (normal) or 1/6 (uniform) and mean 0
    n = 4000
    for distribution, variance in (("normal", 2.0), ("uniform", 1 / 6)):
        m = make(2, distribution=distribution, seed=1)
        logs = np.array(
            [float(torch.log(w[0] / w[1])) for w in (weights(m, t, 2) for t in range(n))]
        )
        assert abs(logs.mean()) < 4 * np.sqrt(variance / n)
        assert abs(logs.var() / variance - 1) < 0.1
        if distribution == "uniform":
            assert np.abs(logs).max() < 1.0


def test_dirichlet_law():
    # Dir(α·1), K = 3: mean 1/3, variance (α(3α − α)) / ((3α)²(3α + 1))
    n = 4000
    for alpha in (1.0, 0.3):
        m = make(3, distribution="dirichlet", concentration=alpha, seed=2)
        w = torch.stack([weights(m, t) for t in range(n)]).numpy()
        expected = (alpha * 2 * alpha) / ((3 * alpha) ** 2 * (3 * alpha + 1))
        np.testing.assert_allclose(w.mean(0), 1 / 3, atol=4 * np.sqrt(expected / n))
        np.testing.assert_allclose(w.var(0) / expected, 1.0, atol=0.12)


def test_seed_none_follows_torch_manual_seed_and_checkpoint_restores_it():
    torch.manual_seed(3)
    a = make()
    torch.manual_seed(3)
    assert RLW().seed == a.seed
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    fresh = RLW()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.seed == a.seed and fresh.tasks == a.tasks
    for t in range(5):
        assert torch.equal(weights(a, t), weights(fresh, t))


def test_invalid_options():
    with pytest.raises(ValueError, match="distribution"):
        RLW(distribution="bernoulli")
    with pytest.raises(ValueError, match="concentration"):
        RLW(distribution="dirichlet", concentration=0.0)
    with pytest.raises(ValueError, match="seed"):
        RLW(seed=1.5)


def test_balancer_steps_with_the_weights_of_its_step_count():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), "rlw", seed=7, nonfinite="skip"
    )
    ref = make(3, seed=7)
    for t in range(3):
        x, y = model.inputs(seed=t)
        opt.zero_grad()
        w = opt.backward(model.losses(x, y))
        torch.testing.assert_close(w.double(), weights(ref, t), atol=1e-7, rtol=0)
        opt.step()
    # a skipped step is retried with the same weights (the step count did not move)
    x, y = model.inputs(seed=9)
    losses = model.losses(x, y)
    losses["t0"] = losses["t0"] * float("nan")
    opt.zero_grad()
    opt.backward(losses)
    opt.step()
    assert opt.steps == 3 and opt.skipped_steps == 1
    opt.zero_grad()
    w = opt.backward(model.losses(x, y))
    torch.testing.assert_close(w.double(), weights(ref, 3), atol=1e-7, rtol=0)


def test_checkpoint_resumes_identically():
    check_resume(lambda model, seed: make_balancer(model, RLW(seed=seed)))
