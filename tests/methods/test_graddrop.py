"""GradDrop: Algorithm 1 of Chen et al. (2020) on hand-built Jacobians, its randomness, and the
balancer paths (shared parameters and shared features)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradbalance as gb
from gradbalance.methods import StepInputs
from gradbalance.methods._common import step_torch_seed
from gradbalance.methods.graddrop import GradDrop
from tests.conftest import MultiHeadNet, clone
from tests.methods.jacobians import make_balancer
from tests.methods.resume import check_resume


def make(k: int = 2, **kw) -> GradDrop:
    m = GradDrop(**kw)
    m.bind(tuple(f"t{i}" for i in range(k)))
    return m


def inputs(*rows: torch.Tensor, step: int = 0) -> StepInputs:
    k = rows[0].shape[0]
    return StepInputs(
        tasks=tuple(f"t{i}" for i in range(k)),
        losses=torch.ones(k, dtype=torch.float64),
        step=step,
        jacobian=tuple(rows),
    )


def combine(m: GradDrop, step_inputs: StepInputs) -> list[torch.Tensor]:
    return m.combine(step_inputs, m.weights(step_inputs))


def reference(rows, seed, step, leak=None):
    """Algorithm 1 written out: P, one U per coordinate (the method's stream), masks, sum."""
    gen = torch.Generator().manual_seed(step_torch_seed(seed, step))
    out = []
    for g in rows:
        k = g.shape[0]
        p = 0.5 * (1 + g.sum(0) / g.abs().sum(0))
        u = torch.rand(p.shape, generator=gen, dtype=p.dtype)
        total = torch.zeros_like(g[0])
        for i in range(k):
            m = ((u < p) & (g[i] > 0)) | ((u >= p) & (g[i] < 0))
            ell = 0.0 if leak is None else leak[i]
            total += (ell + (1 - ell) * m.to(g.dtype)) * g[i]
        out.append(total)
    return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(k=st.integers(2, 5), seed=st.integers(0, 2**31 - 1), step=st.integers(0, 1000))
def test_gradients_of_one_sign_are_summed(k, seed, step):
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(7, generator=g) < 0.5, -1.0, 1.0)
    rows = torch.rand(k, 7, generator=g).add(0.01) * sign  # every task has the same sign
    (d,) = combine(make(k, seed=seed), inputs(rows, step=step))
    torch.testing.assert_close(d, rows.sum(0))


def test_masks_follow_the_sign_purity_probability():
    # One conflict, repeated on 40 000 coordinates: g_1 = 3, g_2 = -1, so
    # P = ½(1 + (3 - 1)/(3 + 1)) = 0.75: the positive part survives with probability 0.75.
    n = 40_000
    rows = torch.stack([torch.full((n,), 3.0), torch.full((n,), -1.0)])
    (d,) = combine(make(seed=123), inputs(rows, step=4))
    assert set(d.unique().tolist()) == {3.0, -1.0}
    kept_positive = float((d == 3.0).double().mean())
    assert abs(kept_positive - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5
    # ... and with P = ½(1 + (1 - 3)/4) = 0.25 the other way round
    (d,) = combine(make(seed=123), inputs(-rows, step=4))
    assert abs(float((d == 1.0).double().mean()) - 0.25) < 4 * (0.75 * 0.25 / n) ** 0.5


@settings(max_examples=20, deadline=None, derandomize=True)
@given(k=st.integers(2, 4), seed=st.integers(0, 2**31 - 1), step=st.integers(0, 50))
def test_update_is_algorithm_1_with_the_seeded_uniforms(k, seed, step):
    g = torch.Generator().manual_seed(seed + 1)
    rows = [torch.randn(k, 3, 4, generator=g), torch.randn(k, 5, generator=g)]
    got = combine(make(k, seed=seed), inputs(*rows, step=step))
    for a, b in zip(got, reference(rows, seed, step)):
        torch.testing.assert_close(a, b)


def test_leak_mixes_the_masked_and_the_plain_gradient():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 50, generator=g)
    (full,) = combine(make(3, leak=1.0, seed=5), inputs(rows))
    torch.testing.assert_close(full, rows.sum(0))
    leak = [1.0, 0.0, 0.5]
    (mixed,) = combine(make(3, leak=leak, seed=5), inputs(rows))
    torch.testing.assert_close(mixed, reference([rows], 5, 0, leak)[0])
    # task 0 has leak 1: its gradient passes whole, whatever the masks
    (without_0,) = combine(make(2, seed=5), inputs(rows[1:]))
    assert not torch.allclose(mixed - rows[0], without_0)  # the masks see task 0 too


def test_sum_batch_computes_purity_on_the_batch_sum_and_shares_the_mask():
    # (K, B, F) feature gradients: task 0 sums to +1 over the batch, task 1 to -3
    rows = torch.tensor([[[2.0, -1.0]], [[-1.0, -2.0]]]).transpose(1, 2)  # (2, B=2, F=1)
    m = make(2, sum_batch=True, seed=9)
    (mask_0, mask_1) = m.masks(inputs(rows))[0]
    assert mask_0.shape == (1, 1) and mask_1.shape == (1, 1)
    assert bool(mask_0.item()) != bool(mask_1.item())  # one sign survives for the whole batch
    (d,) = combine(m, inputs(rows))
    expected = rows[0] if bool(mask_0.item()) else rows[1]
    torch.testing.assert_close(d, expected)
    # P = ½(1 + (1 - 3)/(1 + 3)) = 0.25 over many seeds
    kept = [bool(make(2, sum_batch=True, seed=s).masks(inputs(rows))[0][0]) for s in range(400)]
    assert abs(sum(kept) / 400 - 0.25) < 0.08


def test_combine_is_pure_and_the_stream_depends_on_the_step():
    rows = torch.randn(2, 1000, generator=torch.Generator().manual_seed(1))
    m = make(seed=3)
    a = combine(m, inputs(rows, step=7))[0]
    b = combine(m, inputs(rows, step=7))[0]
    c = combine(m, inputs(rows, step=8))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert m.state_dict()["_extra_state"]["seed"] == 3


def test_seed_none_follows_torch_manual_seed_and_state_dict_restores_it():
    torch.manual_seed(0)
    a = GradDrop()
    torch.manual_seed(0)
    b = GradDrop()
    assert a.seed == b.seed
    a.bind(("t0", "t1"))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    fresh = GradDrop(seed=a.seed + 1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.seed == a.seed and fresh.tasks == ("t0", "t1")
    rows = torch.randn(2, 64)
    assert torch.equal(combine(a, inputs(rows, step=3))[0], combine(fresh, inputs(rows, step=3))[0])


def test_invalid_options():
    with pytest.raises(ValueError, match="leak"):
        GradDrop(leak=1.5)
    with pytest.raises(ValueError, match="seed"):
        GradDrop(seed=-1)
    with pytest.raises(ValueError, match="leak has 3 entries"):
        make(2, leak=[0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="batch dimension"):
        make(2, sum_batch=True).masks(inputs(torch.ones(2)))


# ---------------------------------------------------------------------------- through GradBalancer
def task_grads(model, x, y, params):
    losses = model.losses(x, y)
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses.values()]
    return [torch.stack([r[j] for r in rows]) for j in range(len(params))]


def test_balancer_writes_graddrop_on_the_shared_parameters():
    model = MultiHeadNet("mlp")
    ref = clone(model)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1), GradDrop(seed=11), shared=model.trunk
    )
    x, y = model.inputs()
    opt.zero_grad()
    w = opt.backward(model.losses(x, y))
    torch.testing.assert_close(w, torch.ones(3))
    shared = list(ref.trunk.parameters())
    expected = reference(task_grads(ref, x, y, shared), 11, 0)
    for p, e in zip(model.trunk.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    # heads get their own task's gradient
    losses = ref.losses(x, y)
    for i, head in enumerate(ref.heads):
        g = torch.autograd.grad(losses[f"t{i}"], list(head.parameters()), retain_graph=True)
        for p, e in zip(model.heads[i].parameters(), g):
            torch.testing.assert_close(p.grad, e)
    opt.step()
    # the second step draws other uniforms (step 1)
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    ref = clone(model)
    expected = reference(task_grads(ref, x, y, list(ref.trunk.parameters())), 11, 1)
    for p, e in zip(model.trunk.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_balancer_on_the_features_with_batch_sums():
    model = MultiHeadNet("mlp")
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        "graddrop",
        shared=model.trunk,
        engine="representation",
        sum_batch=True,
        seed=2,
    )
    x, y = model.inputs()
    losses, z = model.losses(x, y, features=True)
    opt.zero_grad()
    opt.backward(losses, features=z)
    # reference: GradDrop on dL_i/dz with batch-summed purity, then one trunk backward
    ref = clone(model)
    losses_r, z_r = ref.losses(x, y, features=True)
    rows = torch.stack(
        [torch.autograd.grad(v, z_r, retain_graph=True)[0] for v in losses_r.values()]
    )
    m = make(3, sum_batch=True, seed=2)
    (dz,) = combine(m, inputs(rows))
    expected = torch.autograd.grad(z_r, list(ref.trunk.parameters()), grad_outputs=dz)
    for p, e in zip(model.trunk.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    opt.step()


def test_checkpoint_resumes_identically():
    check_resume(lambda model, seed: make_balancer(model, GradDrop(seed=seed)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_is_seeded_by_step():
    rows = torch.randn(3, 4096, device="cuda")
    m = make(3, seed=4)
    a = combine(m, inputs(rows, step=2))[0]
    assert a.device.type == "cuda" and bool(torch.isfinite(a).all())
    assert torch.equal(a, combine(m, inputs(rows, step=2))[0])
    assert not torch.equal(a, combine(m, inputs(rows, step=3))[0])
    same_sign = rows.abs()
    torch.testing.assert_close(combine(m, inputs(same_sign))[0], same_sign.sum(0))
