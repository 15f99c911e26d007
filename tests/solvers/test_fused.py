"""The fused exact min-norm kernel (gradbalance.solvers.fused) under Triton's interpreter.

The kernel tests run in a fresh interpreter with ``TRITON_INTERPRET=1``
(`test_fused_kernel_in_subprocess`, as in test_frank_wolfe.py): the interpreter executes every
program in NumPy, so batches are small and K = 128 appears in two cases only. What is checked:
every result is on the simplex, its certified gap is the true gap and below the tolerance
(1e-12 relative to ``max diag G`` in float64, 1e-6 in float32), its objective matches the
existing exact solver and cvxpy to that certificate, on every Gramian family of tests and of
benchmarks/solver.py, degenerate cases, mixed batches, and the fallback when a problem is not
certified."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradbalance.errors import NonFiniteError
from gradbalance.solvers import min_norm, min_norm_gap
from tests.solvers.gramians import FAMILIES, cvxpy_optimum, gramians, make_jacobian

min_norm_module = importlib.import_module("gradbalance.solvers.min_norm")
HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_SUBPROCESS = os.environ.get("GRADBALANCE_FUSED_SUBPROCESS") == "1"
ROOT = Path(__file__).resolve().parents[2]
needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and IN_SUBPROCESS),
    reason="triton is not installed" if not HAS_TRITON else "run by the subprocess test",
)
FAST = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def fused(g: torch.Tensor, tol: float | None = None, **kwargs):
    from gradbalance.solvers.fused import min_norm_fused

    dtype = kwargs.pop("compute_dtype", torch.float64)
    return min_norm_fused(g, TOL[dtype] if tol is None else tol, compute_dtype=dtype, **kwargs)


def stack(family: str, k: int, b: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, k])
    return torch.stack(
        [torch.from_numpy((lambda j: j @ j.T)(make_jacobian(family, k, rng))) for _ in range(b)]
    )


def check(g: torch.Tensor, w: torch.Tensor, gap: torch.Tensor, ok: torch.Tensor, tol: float):
    """On the simplex, certified, the reported gap is the true one, and the objective is the
    exact solver's to within the certificate. Weights computed in float32 carry its rounding:
    their sum and their gap are then checked to float32's precision (``K`` roundings)."""
    g64, w64 = g.double(), w.double()
    scale = g64.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    eps = torch.finfo(w.dtype).eps * g.shape[-1]
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w64.sum(-1), torch.ones_like(scale), atol=max(eps, 1e-12), rtol=0)
    assert ok.all()
    true_gap = min_norm_gap(g64, w64)
    assert (true_gap <= (2 * tol + eps) * scale).all(), (true_gap / scale).max()
    assert ((gap - true_gap).abs() <= 2 * eps * scale).all(), ((gap - true_gap) / scale).max()
    # the reference: the CPU path, one Gramian at a time, with its own certificate (on Gramians
    # rounded from float32, slightly indefinite, it may stop short of its tolerance and warn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exact = [min_norm(x, return_gap=True) for x in g64.reshape(-1, *g.shape[-2:])]
    ref = torch.stack([e[0] for e in exact]).reshape(w.shape)
    ref_gap = torch.stack([e[1] for e in exact]).reshape(gap.shape).clamp_min(0)
    f = torch.einsum("...i,...ij,...j->...", w64, g64, w64)
    f_star = torch.einsum("...i,...ij,...j->...", ref, g64, ref)
    slack = max(eps, 1e-13) * scale
    assert (f - f_star <= 2 * true_gap.clamp_min(0) + slack).all()  # f_star >= f - 2 gap(w)
    assert (f_star - f <= 2 * ref_gap + slack).all()


# --------------------------------------------------------------------------- main process


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(IN_SUBPROCESS, reason="already in the subprocess")
def test_fused_kernel_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "GRADBALANCE_FUSED_SUBPROCESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel_"]
    out = subprocess.run(
        [*cmd, str(Path(__file__).resolve())], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "21 passed" in out.stdout.splitlines()[-1], out.stdout[-2000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(IN_SUBPROCESS, reason="not under the interpreter")
def test_backend_triton_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.eye(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        min_norm(g, backend="triton")
    # the default on CPU never takes the kernel, also under the interpreter's variable
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.testing.assert_close(min_norm(g), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_backend_argument_is_checked():
    with pytest.raises(ValueError, match="backend must be"):
        min_norm(torch.eye(3), backend="cuda")  # type: ignore[call-overload]
    torch.testing.assert_close(min_norm(torch.eye(4), backend="torch"), torch.full((4,), 0.25))


# --------------------------------------------------------------------------- the kernel


@needs_interpreter
@FAST
@given(gramians(max_k=10), st.integers(1, 3), st.sampled_from([torch.float64, torch.float32]))
def test_kernel_against_exact_solver(case, b, dtype):
    family, g = case
    k = g.shape[0]
    g = torch.stack(
        [g] + [stack(family, k, 1, seed=s)[0] * g.diagonal().max() for s in range(b - 1)]
    )
    w, gap, ok, _ = fused(g.to(dtype), compute_dtype=dtype)
    assert w.dtype == dtype and w.shape == (b, k)
    check(g.to(dtype), w, gap, ok, TOL[dtype] if dtype == torch.float64 else 1e-6)


@needs_interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_against_cvxpy(family):
    g = stack(family, 7, 2, seed=11)
    w, gap, ok, _ = fused(g)
    check(g, w, gap, ok, 1e-12)
    for i in range(2):
        scale = g[i].diagonal().max()
        f = float(w[i] @ g[i] @ w[i]) / scale
        f_ref = cvxpy_optimum(g[i] / scale)
        assert f <= f_ref + 1e-8  # Clarabel's own accuracy
        assert f >= f_ref - 1e-7


@needs_interpreter
def test_kernel_on_benchmark_families():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from solver import FAMILIES as BENCH_FAMILIES
    from solver import make_problems

    for family in BENCH_FAMILIES:
        g = torch.stack([gg for _, gg in make_problems(12, 2, seed=3, family=family)])
        w, gap, ok, _ = fused(g)
        check(g, w, gap, ok, 1e-12)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_degenerate(dtype):
    rng = np.random.default_rng(5)
    cases = {
        "rank1": np.outer(rng.standard_normal(6), rng.standard_normal(3)),
        "duplicated": np.repeat(rng.standard_normal((3, 4)), 2, axis=0),
        "zero_rows": np.concatenate([rng.standard_normal((4, 5)), np.zeros((2, 5))]),
        "k2": rng.standard_normal((2, 3)),
        "k2_opposite": np.array([[1.0, 2.0], [-2.0, -4.0]]),
        "origin_in_hull": np.concatenate([np.eye(3), -np.ones((1, 3))]),
        "rank_deficient": rng.standard_normal((10, 3)),
        "all_zero": np.zeros((4, 3)),
    }
    for name, j in cases.items():
        g = torch.from_numpy(j @ j.T).to(dtype).expand(2, -1, -1)
        w, gap, ok, _ = fused(g, compute_dtype=dtype)
        check(g, w, gap, ok, TOL[dtype])
        if name == "all_zero":
            torch.testing.assert_close(w, torch.full_like(w, 0.25))
        if name in ("origin_in_hull", "k2_opposite", "zero_rows"):
            f = torch.einsum("bi,bij,bj->b", w.double(), g.double(), w.double())
            assert (f <= 4 * TOL[dtype] * g.double().diagonal(dim1=1, dim2=2).amax(-1)).all()


@needs_interpreter
def test_kernel_k128_and_k1():
    g = stack("duplicated", 128, 1, seed=1)
    w, gap, ok, _ = fused(g)
    check(g, w, gap, ok, 1e-12)
    j = np.random.default_rng(2).standard_normal((128, 1))  # rank 1, the origin in the hull
    g1 = torch.from_numpy(j @ j.T)[None].float()
    w, gap, ok, _ = fused(g1, compute_dtype=torch.float32)
    check(g1, w, gap, ok, 1e-6)
    # K = 1 is not the kernel's: min_norm answers it without launching anything
    assert min_norm(torch.tensor([[2.0]]), backend="triton").tolist() == [1.0]


@needs_interpreter
def test_kernel_mixed_batch_is_one_by_one():
    g = torch.cat([stack(f, 9, 1, seed=4) for f in ("random", "rank_deficient", "opposite_1d")])
    g = torch.cat([g, torch.zeros(1, 9, 9, dtype=g.dtype)])
    w, _, ok, rounds = fused(g)
    for i in range(4):
        wi, _, oi, ri = fused(g[i : i + 1])
        torch.testing.assert_close(w[i : i + 1], wi, atol=1e-15, rtol=0)
        assert oi.item() and ri.item() == rounds[i].item()
    assert ok.all()


@needs_interpreter
def test_kernel_through_min_norm():
    g = stack("random", 6, 6, seed=8).reshape(2, 3, 6, 6)
    w, gap = min_norm(g, backend="triton", return_gap=True)
    ref = min_norm(g, backend="torch")
    assert w.shape == (2, 3, 6) and gap.shape == (2, 3) and gap.dtype == torch.float64
    torch.testing.assert_close(w, ref, atol=1e-7, rtol=0)
    scale = g.diagonal(dim1=-2, dim2=-1).amax(-1)
    assert (gap <= 1e-12 * scale).all()
    w32 = min_norm(g.float(), backend="triton")
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32, ref.float(), atol=1e-5, rtol=0)


@needs_interpreter
def test_kernel_fallback_when_not_certified(monkeypatch):
    """A problem the kernel does not certify is solved again by the batched path (early exit,
    the CPU default); on the sync-free path the kernel's iterate comes back with its true gap."""
    from gradbalance.solvers.fused import min_norm_fused

    g = stack("random", 10, 3, seed=9)
    monkeypatch.setattr(
        min_norm_module, "min_norm_fused", functools.partial(min_norm_fused, max_rounds=0)
    )
    calls = []
    real = min_norm_module._batched
    monkeypatch.setattr(
        min_norm_module, "_batched", lambda g, *a: calls.append(g.shape[0]) or real(g, *a)
    )
    w, gap = min_norm(g, backend="triton", return_gap=True)
    assert calls == [3]  # every problem: the kernel ran no round
    check(g, w, gap, torch.ones(3, dtype=torch.bool), 1e-12)
    calls.clear()
    w_raw, gap_raw = min_norm(g, backend="triton", return_gap=True, early_exit=False)
    assert calls == []  # no fallback without the host read
    torch.testing.assert_close(gap_raw, min_norm_gap(g, w_raw), atol=1e-12, rtol=0)
    assert (gap_raw > 1e-12 * g.diagonal(dim1=-2, dim2=-1).amax(-1)).all()
    # with a budget too small for some problems only: the others keep the kernel's answer
    _, _, ok, _ = min_norm_fused(g, 1e-12, max_rounds=1, fw_iters=1)
    monkeypatch.setattr(
        min_norm_module,
        "min_norm_fused",
        functools.partial(min_norm_fused, max_rounds=1, fw_iters=1),
    )
    w, gap = min_norm(g, backend="triton", return_gap=True)
    assert calls == ([int((~ok).sum())] if not ok.all() else [])
    check(g, w, gap, torch.ones(3, dtype=torch.bool), 1e-12)


def kkt_violation(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``max_i (wᵀGw - (Gw)_i) / (max(‖g_i‖, Σ_j w_j ‖g_j‖) Σ_j w_j ‖g_j‖)``, in float64: the
    KKT condition measured against the gradients involved, so a small task next to a large one
    is held to its own scale (``gap / max_i G_ii`` is blind to it)."""
    g, w = g.double(), w.double()
    d = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    gw = (g @ w.unsqueeze(-1)).squeeze(-1)
    f = (w * gw).sum(-1, keepdim=True)
    dw = (w * d).sum(-1, keepdim=True)
    return ((f - gw) / (torch.maximum(d, dw) * dw).clamp_min(1e-300)).amax(-1)


@needs_interpreter
def test_kernel_small_tasks_next_to_a_large_one():
    """Norms spread over 12 orders of magnitude, some with an anti-collinear pair among the
    small tasks: the kernel must land on the CPU solver's minimiser, not stop at a point whose
    gap is only small next to the largest ``G_ii`` (it returned ``[0, 1, 0]`` for the first
    Gramian below, objective 1 where 0 is reachable, and said it was certified)."""
    first = torch.tensor([[1e16, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])
    rng = np.random.default_rng(21)
    for k in (3, 5, 8, 11):
        problems = [first] if k == 3 else []
        for trial in range(4):
            j = rng.standard_normal((k, int(rng.integers(1, 2 * k)))) * 10.0 ** rng.uniform(
                -6, 6, (k, 1)
            )
            if trial % 2:  # the two smallest gradients point in opposite directions
                i = np.argsort(np.abs(j).sum(1))[:2]
                j[i[1]] = -j[i[0]] * rng.uniform(0.5, 2)
            problems.append(torch.from_numpy(j @ j.T))
        g = torch.stack(problems).double()
        w, _, ok, _ = fused(g)
        assert ok.all() and (kkt_violation(g, w) <= 2e-12).all(), kkt_violation(g, w)
        ref = torch.stack([min_norm(x) for x in g])
        f = torch.einsum("bi,bij,bj->b", w, g, w)
        f_star = torch.einsum("bi,bij,bj->b", ref, g, ref)
        d = g.diagonal(dim1=-2, dim2=-1).sqrt()
        floor = 1e-13 * ((ref * d).sum(-1) ** 2)  # wᵀGw's rounding floor at the optimum
        assert (f - f_star <= 1e-9 * f_star.abs() + floor).all(), (f, f_star)
    # the same first problem from float32 input, through min_norm
    w32 = min_norm(first.float(), backend="triton")
    torch.testing.assert_close(w32, torch.tensor([0.0, 0.5, 0.5]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- benchmark rows


def _gpu_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from solver import gpu_solver_rows

    return gpu_solver_rows(
        "cpu", ks=(3, 9), batches=(1, 3), dtypes=(torch.float64,), repeats=1, peer_max=2
    )


@pytest.mark.skipif(IN_SUBPROCESS, reason="not under the interpreter")
def test_gpu_solver_rows_on_cpu_skip_the_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = _gpu_rows()
    fused_rows = [r for r in rows if r["method"] == "fused (Triton)"]
    assert len(fused_rows) == 4 and all(r["status"].startswith("skipped") for r in fused_rows)
    batched = [r for r in rows if r["method"] == "batched (torch)"]
    assert len(batched) == 4 and all(r["ms"] > 0 and r["gap"] <= 1e-12 for r in batched)


@needs_interpreter
def test_kernel_rows_of_the_gpu_table():
    rows = [r for r in _gpu_rows() if r["method"] == "fused (Triton)"]
    assert len(rows) == 4
    assert all(r["ms"] > 0 and r["gap"] <= 2e-12 and r["certified"] == 1.0 for r in rows)


@needs_interpreter
def test_kernel_non_finite_input():
    g = stack("random", 5, 2, seed=12)
    g[1, 2, 3] = float("nan")
    w, gap, ok, _ = fused(g)
    assert ok.tolist() == [True, False] and not torch.isfinite(gap[1])
    assert torch.isnan(w[1]).all() and torch.isfinite(w[0]).all()
    with pytest.raises(NonFiniteError):
        min_norm(g, backend="triton")


def test_a_kernel_that_fails_on_the_device_falls_back_once_with_a_warning(monkeypatch):
    # the kernel has not run on every GPU: with backend="auto" a compile or launch error of the
    # kernel must cost one warning and the batched path's exact answer, not the training run
    mn = importlib.import_module("gradbalance.solvers.min_norm")  # the module, not the function
    calls = []

    def broken(g, tol, **kw):
        calls.append(g.shape)
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(mn, "fused_available", lambda device, k, backend="auto": True)
    monkeypatch.setattr(mn, "min_norm_fused", broken)
    monkeypatch.setattr(mn, "_KERNEL_FAILED", set())
    g = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]], dtype=torch.float64)
    want = mn.min_norm(g, backend="torch")
    with pytest.warns(RuntimeWarning, match="fused Triton kernel failed"):
        got = mn.min_norm(g.expand(2, 3, 3))
    torch.testing.assert_close(got, want.expand(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(mn.min_norm(g.expand(2, 3, 3)), want.expand(2, 3))
    assert len(calls) == 1  # not tried again for this device, dtype and K
    with pytest.raises(RuntimeError, match="out of resources"):
        mn.min_norm(g.expand(2, 3, 3), backend="triton")  # asked for explicitly: no fallback
