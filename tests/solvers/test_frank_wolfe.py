"""min_norm(method="frank-wolfe"): the published Frank-Wolfe solver, in PyTorch and in Triton.

The Triton kernel runs under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
the ``interpret`` fixture around those tests only); it must give the PyTorch path's iterates to
rounding. Both must agree with the exact `min_norm` to Frank-Wolfe's accuracy (certified by their
duality gap, which must be the true one), and with the published algorithm
(``benchmarks/published_mgda.py``) when its end-point clip is used."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradbalance.solvers import min_norm, min_norm_gap
from gradbalance.solvers.frank_wolfe import MAX_ITER, frank_wolfe
from tests.solvers.gramians import FAMILIES, gramians, make_jacobian

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed (pip install triton; the test extra has it)"
IN_SUBPROCESS = os.environ.get("GRADBALANCE_FW_SUBPROCESS") == "1"
# the kernel tests run in a fresh interpreter (test_triton_kernels_in_subprocess): in the same
# process as the package's doctests, Triton's interpreter has failed to patch its own jitted
# reductions ("Cannot call @triton.jit'd outside of the scope of a kernel")
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and IN_SUBPROCESS),
    reason=NO_TRITON if not HAS_TRITON else "run by test_triton_kernels_in_subprocess",
)
FAST = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
FW_ACCURACY = 0.05  # relative gap after at most 250 iterations: FW converges as O(1/t)


@pytest.fixture(scope="module")
def interpret():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


def batch_of(family: str, k: int, b: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, k])
    js = [make_jacobian(family, k, rng) for _ in range(b)]
    return torch.stack([torch.from_numpy(j @ j.T) for j in js])


def check_result(g: torch.Tensor, w: torch.Tensor, gap: torch.Tensor) -> None:
    """Feasible, the reported gap is the true gap, and it certifies w against the exact solver."""
    g64, w64 = g.double(), w.double()
    scale = g64.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    eps = 1e-12 if g.dtype == torch.float64 else 1e-5
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w64.sum(-1), torch.ones_like(scale), atol=eps, rtol=0)
    true_gap = min_norm_gap(g64, w64)
    assert ((gap.double() - true_gap).abs() <= eps * g.shape[-1] * scale).all()
    exact = min_norm(g64)
    f = torch.einsum("...i,...ij,...j->...", w64, g64, w64)
    f_star = torch.einsum("...i,...ij,...j->...", exact, g64, exact)
    assert (f - f_star >= -eps * scale).all()  # never better than the optimum
    # the gap certifies the suboptimality: f(w*) >= f(w) + ∇f(w)ᵀ(w* - w) >= f(w) - 2 gap(w)
    assert (f - f_star <= 2 * true_gap + eps * scale).all()
    assert (true_gap <= FW_ACCURACY * scale).all()


# --------------------------------------------------------------------------- PyTorch path


@settings(max_examples=40, deadline=None, derandomize=True)
@given(gramians(max_k=40), st.sampled_from([torch.float64, torch.float32]))
def test_torch_against_exact(case, dtype):
    _, g = case
    w, iters, gap = frank_wolfe(g.to(dtype), backend="torch")
    assert w.dtype == dtype and w.shape == g.shape[:1] and 0 <= iters.item() <= MAX_ITER
    check_result(g.to(dtype), w, gap)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_batch_is_one_by_one(family):
    g = batch_of(family, 7, 5, seed=1)
    w, iters, gap = frank_wolfe(g, backend="torch")
    for i in range(5):
        wi, it, _ = frank_wolfe(g[i], backend="torch")
        torch.testing.assert_close(w[i], wi, atol=1e-15, rtol=0)
        assert it.item() == iters[i].item()
    check_result(g, w, gap)


def test_published_semantics_with_clip():
    """clip=0.001 reproduces the published algorithm (our reference), its iterations included."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from published_mgda import published_min_norm

    same = total = 0
    for k in (2, 3, 4, 9, 20):
        g = batch_of("random", k, 4, seed=2)
        w, iters, _ = frank_wolfe(g, clip=0.001, backend="torch")
        for i in range(4):
            ref, steps = published_min_norm(g[i].numpy(), safety_cap=MAX_ITER, return_steps=True)
            # on an edge-optimal point, whether (Gw)_t >= wᵀGw (a clipped step) or not is decided
            # by rounding, which differs between numpy and torch: the runs may part there by the
            # clip, and only there
            np.testing.assert_allclose(w[i].numpy(), ref, atol=2e-3, rtol=0)
            exact = np.abs(w[i].numpy() - ref).max() <= 1e-12 and iters[i].item() == steps
            same, total = same + exact, total + 1
    assert same >= 0.75 * total


def test_cap_fires():
    """The published counter never moves; ours stops after 250 iterations."""
    g = batch_of("random", 16, 1, seed=0)[0]
    _, iters, gap = frank_wolfe(g, backend="torch")
    _, longer, gap_longer = frank_wolfe(g, max_iter=5000, backend="torch")
    assert iters.item() == MAX_ITER < longer.item()
    assert gap_longer.item() < gap.item()
    w, it = min_norm(g, method="frank-wolfe"), frank_wolfe(g, max_iter=3, backend="torch")[1]
    assert it.item() == 3 and w.shape == (16,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b", [1, 3])
def test_degenerate_torch(dtype, b):
    rng = np.random.default_rng(5)
    cases = {
        "rank1": np.outer(rng.standard_normal(6), rng.standard_normal(3)),
        "duplicated": np.repeat(rng.standard_normal((3, 4)), 2, axis=0),
        "zero_rows": np.concatenate([rng.standard_normal((4, 5)), np.zeros((2, 5))]),
        "k1": rng.standard_normal((1, 3)),
        "k2": rng.standard_normal((2, 3)),
        "k128": rng.standard_normal((128, 64)),
        "all_zero": np.zeros((4, 3)),
    }
    for name, j in cases.items():
        g = torch.from_numpy(j @ j.T).to(dtype).expand(b, -1, -1)
        w, iters, gap = frank_wolfe(g, backend="torch")
        assert w.shape == g.shape[:-1], name
        check_result(g, w, gap)
        if name in ("k1", "k2"):
            assert (iters == 0).all()  # no iteration, as published
        if name == "zero_rows":
            assert (gap.abs() <= 1e-5).all()  # a zero gradient is the optimum, found by the pair


def test_min_norm_method():
    g = batch_of("random", 5, 6, seed=3).reshape(2, 3, 5, 5)
    w, gap = min_norm(g, method="frank-wolfe", return_gap=True)
    assert w.shape == (2, 3, 5) and gap.shape == (2, 3) and gap.dtype == torch.float64
    ref, _, ref_gap = frank_wolfe(g, backend="torch")
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(gap, ref_gap)
    w32 = min_norm(g[0, 0].float(), method="frank-wolfe")
    assert w32.dtype == torch.float32
    with pytest.raises(ValueError, match="method must be 'exact' or 'frank-wolfe'"):
        min_norm(g, method="fw")  # type: ignore[call-overload]
    # the default method is unchanged
    torch.testing.assert_close(min_norm(g), min_norm(g, method="exact"))


# --------------------------------------------------------------------------- Triton kernel


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.skipif(IN_SUBPROCESS, reason="already in the subprocess")
def test_triton_kernels_in_subprocess():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "GRADBALANCE_FW_SUBPROCESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton"]
    out = subprocess.run(
        [*cmd, str(Path(__file__).resolve())], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "5 passed" in out.stdout.splitlines()[-1], out.stdout[-2000:]


@needs_triton
@FAST
@given(
    gramians(max_k=12),
    st.integers(1, 3),
    st.integers(0, 40),
    st.sampled_from([torch.float64, torch.float32]),
)
def test_triton_matches_torch(interpret, case, b, max_iter, dtype):
    family, g = case
    k = g.shape[0]
    g = torch.stack([g] + [batch_of(family, k, 1, seed=s)[0] for s in range(b - 1)]).to(dtype)
    w_t, it_t, gap_t = frank_wolfe(g, max_iter=max_iter, backend="torch")
    w_k, it_k, gap_k = frank_wolfe(g, max_iter=max_iter, backend="triton")
    assert torch.equal(it_t, it_k), family
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = g.double().diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    torch.testing.assert_close(w_k, w_t, atol=tol, rtol=0)
    assert ((gap_k.double() - gap_t.double()).abs() <= tol * k * scale).all()
    true_gap = min_norm_gap(g.double(), w_k.double())
    assert ((gap_k.double() - true_gap).abs() <= tol * k * scale).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_full_run_and_degenerate(interpret, dtype):
    rng = np.random.default_rng(7)
    cases = [
        np.outer(rng.standard_normal(5), rng.standard_normal(3)),  # rank 1
        np.repeat(rng.standard_normal((2, 4)), 2, axis=0),  # duplicated rows
        np.concatenate([rng.standard_normal((3, 5)), np.zeros((2, 5))]),  # zero rows
        rng.standard_normal((1, 3)),
        rng.standard_normal((2, 3)),
        rng.standard_normal((3, 6)),  # a full run to its own stop
    ]
    for j in cases:
        g = torch.from_numpy(j @ j.T).to(dtype).expand(2, -1, -1)
        w, iters, gap = frank_wolfe(g, backend="triton")
        w_t, it_t, _ = frank_wolfe(g, backend="torch")
        assert torch.equal(iters, it_t)
        torch.testing.assert_close(w, w_t, atol=1e-12 if dtype == torch.float64 else 2e-6, rtol=0)
        check_result(g, w, gap)


@needs_triton
def test_triton_k128(interpret):
    g = batch_of("random", 128, 1, seed=4)
    w_t, it_t, gap_t = frank_wolfe(g, max_iter=3, backend="torch")
    w_k, it_k, gap_k = frank_wolfe(g, max_iter=3, backend="triton")
    assert torch.equal(it_t, it_k) and it_k.item() == 3
    torch.testing.assert_close(w_k, w_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(gap_k, gap_t, atol=1e-9 * g.diagonal().max().item(), rtol=0)


@needs_triton
def test_auto_backend_uses_triton_under_interpreter(interpret, monkeypatch):
    from gradbalance.solvers import frank_wolfe as module

    calls = []
    real = module._frank_wolfe_triton
    monkeypatch.setattr(module, "_frank_wolfe_triton", lambda *a: calls.append(1) or real(*a))
    g = batch_of("random", 4, 2, seed=6)
    w = min_norm(g, method="frank-wolfe")
    assert calls and w.shape == (2, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    min_norm(g, method="frank-wolfe")
    assert len(calls) == 1  # on CPU without the interpreter: the PyTorch path
