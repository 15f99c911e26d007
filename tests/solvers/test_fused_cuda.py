"""The fused min-norm kernel compiled on a CUDA device (run by the GPU check: ``pytest -m cuda``).

Skipped without CUDA or Triton. Checks the certificates (relative gap <= 1e-12 for float64
input, <= 1e-6 in float32 arithmetic), one launch for a batch of 256, agreement with the exact
CPU solver, no host synchronisation on the default path, and that the default takes the kernel.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch

from gradbalance.solvers import min_norm, min_norm_gap
from tests.solvers.gramians import FAMILIES, make_jacobian

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]


def mixed(k: int, b: int, seed: int = 0) -> torch.Tensor:
    """``b`` Gramians cycling through every family of tests/solvers/gramians.py (float64, CPU)."""
    rng = np.random.default_rng([seed, k])
    out = []
    for i in range(b):
        j = make_jacobian(FAMILIES[i % len(FAMILIES)], k, rng)
        out.append(torch.from_numpy(j @ j.T) * 10.0 ** rng.uniform(-4, 4))
    return torch.stack(out)


def relative(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    g, w = g.double().cpu(), w.double().cpu()
    return min_norm_gap(g, w) / g.diagonal(dim1=-2, dim2=-1).amax(-1)


@pytest.mark.parametrize("k", [2, 3, 8, 16, 33, 64, 128])
def test_gaps_float64_and_float32(k):
    g = mixed(k, 18)
    w, gap = min_norm(g.cuda(), return_gap=True)
    assert w.is_cuda and w.dtype == torch.float64
    assert (relative(g, w) <= 2e-12).all()
    scale = g.diagonal(dim1=-2, dim2=-1).amax(-1)
    true_gap = min_norm_gap(g, w.cpu())
    torch.testing.assert_close(gap.cpu(), true_gap, atol=1e-13 * float(scale.max()), rtol=0)
    assert (gap.cpu() <= 1e-12 * scale).all()
    w32 = min_norm(g.float().cuda())
    assert w32.dtype == torch.float32
    assert (relative(g.float(), w32) <= 1e-6).all()


@pytest.mark.parametrize("k", [4, 32, 128])
def test_float32_arithmetic_certificate(k):
    from gradbalance.solvers.fused import min_norm_fused

    g = mixed(k, 18, seed=1).float().cuda()
    w, gap, ok, _ = min_norm_fused(g, 1e-6, compute_dtype=torch.float32)
    assert w.dtype == torch.float32
    assert bool(ok.all())
    assert (gap.cpu() <= 1e-6 * g.diagonal(dim1=-2, dim2=-1).amax(-1).double().cpu()).all()
    assert (relative(g, w) <= 2e-6).all()  # float32 arithmetic: the certificate to rounding


def test_batch_of_256_is_one_launch():
    from torch.profiler import ProfilerActivity, profile

    g = mixed(32, 256, seed=2).cuda()
    min_norm(g)  # compile first
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        w = min_norm(g)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("_exact_kernel" in n for n in names) == 1, names
    assert (relative(g, w) <= 2e-12).all()


@pytest.mark.parametrize("k", [5, 40, 128])
def test_agrees_with_the_cpu_solver(k):
    g = mixed(k, 12, seed=3)
    w = min_norm(g.cuda()).cpu()
    for i in range(12):
        ref, ref_gap = min_norm(g[i], return_gap=True)
        f, f_ref = float(w[i] @ g[i] @ w[i]), float(ref @ g[i] @ ref)
        scale = float(g[i].diagonal().max())
        assert abs(f - f_ref) <= 2 * max(float(ref_gap), 1e-12 * scale) + 1e-13 * scale


def test_no_host_synchronisation_and_default_takes_the_kernel(monkeypatch):
    module = importlib.import_module("gradbalance.solvers.min_norm")
    calls = []
    real = module.min_norm_fused
    monkeypatch.setattr(module, "min_norm_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = mixed(16, 8, seed=4).cuda()
    min_norm(g)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w = min_norm(g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(calls) == 2 and (relative(g, w) <= 2e-12).all()


def test_fallback_on_cuda_when_not_certified(monkeypatch):
    import functools

    from gradbalance.solvers.fused import min_norm_fused

    module = importlib.import_module("gradbalance.solvers.min_norm")
    monkeypatch.setattr(module, "min_norm_fused", functools.partial(min_norm_fused, max_rounds=0))
    g = mixed(12, 4, seed=5).cuda()
    w = min_norm(g, early_exit=True)  # one host read, then the batched path for all four
    assert (relative(g, w) <= 1e-9).all()
    w_raw, gap = min_norm(g, return_gap=True)  # sync-free: the kernel's iterate, honest gap
    true_gap = min_norm_gap(g.cpu(), w_raw.cpu())
    scale = float(g.diagonal(dim1=-2, dim2=-1).amax())
    torch.testing.assert_close(gap.cpu(), true_gap, atol=1e-13 * scale, rtol=0)
