"""MoCo: the paper's recursions (tracked gradients, projected-gradient λ on the simplex) on
hand-built Jacobians, purity of weights/combine, lazily created buffers in checkpoints, and the
balancer path."""

from __future__ import annotations

import copy
import io
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods import StepInputs
from gradbalance.methods.moco import MoCo
from tests.conftest import MultiHeadNet, clone
from tests.methods.resume import check_resume, method_state, train_step

SHAPES = ((2, 3), (4,))


def simplex_projection(v: np.ndarray) -> np.ndarray:
    """Duchi et al. (2008), written independently of gradbalance.solvers."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    rho = max(j for j in range(len(v)) if u[j] - (css[j] - 1) / (j + 1) > 0)
    theta = (css[rho] - 1) / (rho + 1)
    return np.maximum(v - theta, 0.0)


def split(jac: torch.Tensor) -> tuple[torch.Tensor, ...]:
    k = jac.shape[0]
    rows, start = [], 0
    for shape in SHAPES:
        n = int(np.prod(shape))
        rows.append(jac[:, start : start + n].reshape(k, *shape))
        start += n
    return tuple(rows)


def step_inputs(jac: torch.Tensor, losses=None, step: int = 0) -> StepInputs:
    k = jac.shape[0]
    losses = torch.ones(k, dtype=torch.float64) if losses is None else losses
    return StepInputs(
        tasks=tuple(f"t{i}" for i in range(k)),
        losses=losses,
        gramian=(jac.double() @ jac.double().T),
        step=step,
        jacobian=split(jac),
    )


def apply(m: MoCo, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    lam = m.weights(inputs)
    d = torch.cat([p.reshape(-1) for p in m.combine(inputs, lam)])
    m.update(inputs, lam)
    return lam, d


def reference_run(jacs, beta, beta_sigma, gamma, gamma_sigma, rho, scales=None):
    """The paper's recursions in numpy: y ← y − β_t(y − h), λ ← Π(λ − γ_t(YᵀY + ρI)λ), d = Yλ."""
    k = jacs[0].shape[0]
    y = np.zeros_like(jacs[0])
    lam = np.full(k, 1.0 / k)
    out = []
    for t, h in enumerate(jacs, start=1):
        if scales is not None:
            h = h * scales[t - 1][:, None]
        b = beta / t**beta_sigma
        g = gamma / t**gamma_sigma
        y = y - b * (y - h)
        lam = simplex_projection(lam - g * (y @ y.T + rho * np.eye(k)) @ lam)
        out.append((lam.copy(), y.T @ lam, y.copy()))
    return out


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    k=st.integers(2, 4),
    seed=st.integers(0, 2**31 - 1),
    beta=st.floats(0.05, 1.0),
    gamma=st.floats(0.01, 2.0),
    rho=st.sampled_from([0.0, 0.1]),
)
def test_tracked_gradients_and_lambda_follow_the_paper(k, seed, beta, gamma, rho):
    rng = np.random.default_rng(seed)
    jacs = [rng.standard_normal((k, 10)) for _ in range(4)]
    m = MoCo(beta=beta, beta_sigma=0.5, gamma=gamma, gamma_sigma=0.5, rho=rho)
    m.bind(tuple(f"t{i}" for i in range(k)))
    expected = reference_run(jacs, beta, 0.5, gamma, 0.5, rho)
    for t, (jac, (lam_ref, d_ref, y_ref)) in enumerate(zip(jacs, expected)):
        lam, d = apply(m, step_inputs(torch.from_numpy(jac), step=t))
        np.testing.assert_allclose(lam.numpy(), lam_ref, atol=1e-10)
        np.testing.assert_allclose(d.numpy(), d_ref, atol=1e-10)
        # λ stays on the simplex
        assert bool((lam >= 0).all()) and abs(float(lam.sum()) - 1.0) < 1e-12
        tracked = torch.cat([m.tracked(i).reshape(k, -1) for i in range(len(SHAPES))], dim=1)
        np.testing.assert_allclose(tracked.numpy(), y_ref, atol=1e-12)
    assert int(m.moco_steps) == 4


def test_normalize_rescales_each_gradient_to_its_loss():
    rng = np.random.default_rng(0)
    jacs = [rng.standard_normal((3, 10)) for _ in range(3)]
    losses = [rng.uniform(0.5, 2.0, size=3) for _ in range(3)]
    scales = [ell / (np.linalg.norm(j, axis=1) + 1e-8) for j, ell in zip(jacs, losses)]
    m = MoCo(normalize=True)
    m.bind(("t0", "t1", "t2"))
    expected = reference_run(jacs, 0.5, 0.5, 0.1, 0.5, 0.0, scales)
    for t, (jac, ell, (lam_ref, d_ref, _)) in enumerate(zip(jacs, losses, expected)):
        lam, d = apply(m, step_inputs(torch.from_numpy(jac), torch.from_numpy(ell), step=t))
        np.testing.assert_allclose(lam.numpy(), lam_ref, atol=1e-10)
        np.testing.assert_allclose(d.numpy(), d_ref, atol=1e-10)


def test_weights_and_combine_are_pure():
    m = MoCo()
    m.bind(("a", "b"))
    jac = torch.randn(2, 10, dtype=torch.float64)
    apply(m, step_inputs(jac))
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    inputs = step_inputs(torch.randn(2, 10, dtype=torch.float64), step=1)
    lam = m.weights(inputs)
    first = m.combine(inputs, lam)
    assert torch.equal(m.weights(inputs), lam)
    assert all(torch.equal(a, b) for a, b in zip(m.combine(inputs, lam), first))
    after = m.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_no_buffer_before_the_first_update_and_checkpoints_carry_them():
    m = MoCo()
    m.bind(("a", "b", "c"))
    early = copy.deepcopy(m.state_dict())  # state_dict() shares storage with the buffers
    assert not any(k.startswith("tracked_") for k in early)
    rng = np.random.default_rng(1)
    jacs = [torch.from_numpy(rng.standard_normal((3, 10))).float() for _ in range(4)]
    for t in range(2):
        apply(m, step_inputs(jacs[t], step=t))
    assert m.tracked(0).shape == (3, 2, 3) and m.tracked(0).dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    fresh = MoCo()  # unbound, no buffers: loading creates them
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for t in (2, 3):
        a = apply(m, step_inputs(jacs[t], step=t))
        b = apply(fresh, step_inputs(jacs[t], step=t))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # loading the early checkpoint drops the tracked gradients again
    fresh.load_state_dict(early)
    assert fresh.tracked(0) is None and int(fresh.moco_steps) == 0
    torch.testing.assert_close(fresh.lam, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_shape_change_and_invalid_options_raise():
    m = MoCo()
    m.bind(("a", "b"))
    apply(m, step_inputs(torch.randn(2, 10, dtype=torch.float64)))
    bad = StepInputs(("a", "b"), torch.ones(2), jacobian=(torch.randn(2, 3, 3), torch.randn(2, 4)))
    with pytest.raises(ValueError, match="keep their shapes"):
        m.weights(bad)
    with pytest.raises(ValueError, match="beta"):
        MoCo(beta=1.5)
    with pytest.raises(ValueError, match="gamma"):
        MoCo(gamma=0.0)
    with pytest.raises(ValueError, match="jacobian"):
        m.weights(StepInputs(("a", "b"), torch.ones(2)))


# ---------------------------------------------------------------------------- through GradBalancer
def make_opt(model, **kw):
    return gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.05), "moco", shared=model.trunk, **kw
    )


def test_balancer_moves_the_trunk_along_the_tracked_combination():
    model = MultiHeadNet("mlp")
    ref = clone(model)
    opt = make_opt(model, beta=1.0, gamma=0.3)
    x, y = model.inputs()
    opt.zero_grad()
    lam = opt.backward(model.losses(x, y))
    # β = 1: y_i = g_i, so d = Σ λ_i g_i and λ = Π(1/K − γ G 1/K)
    params = list(ref.trunk.parameters())
    losses = ref.losses(x, y)
    rows = [torch.autograd.grad(v, params, retain_graph=True) for v in losses.values()]
    flat = torch.stack([torch.cat([g.reshape(-1) for g in r]) for r in rows]).double()
    lam_ref = simplex_projection(
        (torch.full((3,), 1 / 3) - 0.3 * flat @ flat.T @ torch.full((3,), 1 / 3).double()).numpy()
    )
    np.testing.assert_allclose(lam.double().numpy(), lam_ref, atol=1e-6)
    for j, p in enumerate(model.trunk.parameters()):
        expected = sum(float(lam[i]) * rows[i][j] for i in range(3))
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)
    assert opt.method.tracked(0) is None  # committed only by step()
    opt.step()
    assert opt.method.tracked(0).shape == (3, *model.trunk[0].weight.shape)


def test_balancer_checkpoint_resumes_identically_and_skipped_steps_change_nothing():
    run = check_resume(
        lambda model, seed: make_opt(model),
        steps=4,
        split=2,
        make_model=lambda seed: MultiHeadNet("mlp", seed=seed),
        step=partial(train_step, batch=8),
    )
    model, opt = run.reference_model, run.reference
    # a backward that is not followed by step() leaves MoCo's state untouched
    state = method_state(opt.method)
    x, y = model.inputs(seed=9)
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    opt.zero_grad()
    for key, value in state.items():
        assert torch.equal(opt.method.state_dict()[key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    jacs = [torch.from_numpy(rng.standard_normal((3, 10))) for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        m = MoCo(normalize=True)
        m.bind(("a", "b", "c"))
        losses = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, device=device)
        results.append(
            [apply(m, step_inputs(j.to(device), losses, step=t)) for t, j in enumerate(jacs)]
        )
    for (lam_a, d_a), (lam_b, d_b) in zip(*results):
        torch.testing.assert_close(lam_b.cpu(), lam_a)
        torch.testing.assert_close(d_b.cpu(), d_a)


# ---------------------------------------------------------------------------- scale (issue 12)
def exact_projection(v: list[Fraction]) -> list[Fraction]:
    u = sorted(v, reverse=True)
    total, rho, theta = Fraction(0), 0, Fraction(0)
    for j, x in enumerate(u, start=1):
        total += x
        if x - (total - 1) / j > 0:
            rho, theta = j, (total - 1) / j
    assert rho > 0
    return [max(x - theta, Fraction(0)) for x in v]


def exact_run(jacs, beta, gamma):
    """MoCo's recursions (σ_β = σ_γ = 0, ρ = 0) in exact rational arithmetic."""
    k, n = jacs[0].shape
    y = [[Fraction(0)] * n for _ in range(k)]
    lam = [Fraction(1, k)] * k
    b, g = Fraction(beta), Fraction(gamma)
    out = []
    for jac in jacs:
        h = [[Fraction(float(x)) for x in row] for row in jac]
        y = [[(1 - b) * yi + b * hi for yi, hi in zip(yr, hr)] for yr, hr in zip(y, h)]
        gram = [[sum(a * c for a, c in zip(y[i], y[j])) for j in range(k)] for i in range(k)]
        step = [sum(gram[i][j] * lam[j] for j in range(k)) for i in range(k)]
        lam = exact_projection([lam[i] - g * step[i] for i in range(k)])
        d = [sum(lam[i] * y[i][c] for i in range(k)) for c in range(n)]
        out.append(([float(x) for x in lam], [float(x) for x in d]))
    return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(k=st.integers(2, 4), seed=st.integers(0, 2**31 - 1), log_scale=st.integers(-9, 12))
def test_lambda_is_right_at_any_gradient_scale(k, seed, log_scale):
    """Gradient norms from 1e-9 to 1e12: λ stays on the simplex and equals the recursions in
    exact arithmetic (it used to collapse to λ = 0 and a zero update from norms of ~1e9 on,
    because λ − γ_t(YᵀY)λ ~ −1e17 swallowed the simplex's unit sum)."""
    rng = np.random.default_rng(seed)
    scale = 10.0**log_scale
    jacs = [rng.standard_normal((k, 5)) * scale for _ in range(3)]
    m = MoCo(beta=0.5, beta_sigma=0.0, gamma=0.1, gamma_sigma=0.0)
    m.bind(tuple(f"t{i}" for i in range(k)))
    for jac, (lam_ref, d_ref) in zip(jacs, exact_run(jacs, 0.5, 0.1)):
        lam = m.weights(
            StepInputs(tuple(m.tasks), torch.ones(k), jacobian=(torch.from_numpy(jac),))
        )
        assert bool((lam >= 0).all()) and abs(float(lam.sum()) - 1.0) < 1e-12
        np.testing.assert_allclose(lam.numpy(), lam_ref, atol=1e-9)
        d = m.combine(
            StepInputs(tuple(m.tasks), torch.ones(k), jacobian=(torch.from_numpy(jac),)), lam
        )[0]
        np.testing.assert_allclose(d.numpy(), d_ref, rtol=1e-9, atol=1e-9 * scale)
        assert float(d.norm()) > 0
        m.update(StepInputs(tuple(m.tasks), torch.ones(k), jacobian=(torch.from_numpy(jac),)), lam)
