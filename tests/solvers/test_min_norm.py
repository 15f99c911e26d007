"""min_norm: exact (duality gap <= 1e-9 max diag G, cvxpy as reference) on every Gramian family,
KKT conditions, simplex, permutation equivariance, scale invariance, batching, float32, edge
cases, errors, and the sync-free / torch.compile path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradbalance.errors import NonFiniteError
from gradbalance.solvers import min_norm, min_norm_gap
from tests.solvers.gramians import FAMILIES, cvxpy_optimum, gramians, make_jacobian

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
EXACT = 1e-9  # the goal: optimality gap <= 1e-9 * max diag(G)


def normalised(g: torch.Tensor) -> torch.Tensor:
    return g / g.diagonal().max().clamp_min(1e-300)


def objective(g: torch.Tensor, w: torch.Tensor) -> float:
    w = w.double()
    return float(w @ g.double() @ w)


def assert_on_simplex(w: torch.Tensor) -> None:
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-12)


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a non-converged solve warns: fail on it
        yield


# --------------------------------------------------------------------------- exactness


@SETTINGS
@given(gramians())
def test_exact_against_cvxpy(case):
    family, g = case
    w, gap = min_norm(g, return_gap=True)
    assert w.dtype == g.dtype and w.shape == g.shape[:1]
    assert_on_simplex(w)
    scale = g.diagonal().max().item()
    # our own certificate: twice the duality gap bounds the suboptimality
    assert gap.item() <= EXACT * scale, (family, gap.item() / scale)
    assert abs(gap.item() - min_norm_gap(g, w).item()) <= 1e-12 * scale
    # the independent reference: never worse than cvxpy (up to the goal's tolerance)
    gn = normalised(g)
    assert objective(gn, w) <= cvxpy_optimum(gn) + EXACT, family


@SETTINGS
@given(gramians())
def test_kkt_conditions(case):
    """(Gw)_i >= wᵀGw - tol for all i, with equality on the support."""
    family, g = case
    gn = normalised(g)
    w = min_norm(g)
    gw = gn @ w
    f = w @ gw
    assert (gw >= f - EXACT).all(), family
    support = w > 0
    assert ((gw[support] - f).abs() <= EXACT).all(), family


@settings(max_examples=40, deadline=None, derandomize=True)
@given(gramians(max_k=12))
def test_small_k_paths_against_cvxpy(case):
    """K = 2 (closed form), K <= 8 (enumeration) and the switch to the iterative path."""
    _, g = case
    w, gap = min_norm(g, return_gap=True)
    gn = normalised(g)
    assert gap.item() <= EXACT * g.diagonal().max().item()
    assert objective(gn, w) <= cvxpy_optimum(gn) + EXACT


# --------------------------------------------------------------------------- symmetries


def unique_solution_gramian(k: int, seed: int) -> torch.Tensor:
    """Well-conditioned positive definite G (unique minimiser) with conflicting gradients."""
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((k, 3 * k + 4))
    j += rng.choice([-1.0, 1.0], (k, 1)) * rng.standard_normal(3 * k + 4)
    return torch.from_numpy(j @ j.T)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(2, 64), st.integers(0, 2**32 - 1))
def test_permutation_equivariance(k, seed):
    g = unique_solution_gramian(k, seed)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(k))
    w = min_norm(g)
    wp = min_norm(g[perm][:, perm])
    torch.testing.assert_close(wp, w[perm], atol=1e-9, rtol=0)


@SETTINGS
@given(gramians(), st.integers(0, 2**32 - 1))
def test_permutation_optimal_value_any_family(case, seed):
    """Where the minimiser is not unique the weights may differ, the optimal value may not."""
    _, g = case
    gn = normalised(g)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(g.shape[0]))
    w, wp = min_norm(g), min_norm(g[perm][:, perm])
    assert abs(objective(gn, w) - objective(gn[perm][:, perm], wp)) <= 2 * EXACT


@SETTINGS
@given(gramians(scale=False), st.floats(-8, 8))
def test_scale_invariance(case, log_c):
    _, g = case
    c = 10.0**log_c
    w, w_c = min_norm(g), min_norm(g * c)
    gn = normalised(g)
    assert abs(objective(gn, w) - objective(gn, w_c)) <= 2 * EXACT


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(2, 64), st.integers(0, 2**32 - 1), st.floats(-8, 8))
def test_scale_invariance_weights(k, seed, log_c):
    g = unique_solution_gramian(k, seed)
    torch.testing.assert_close(min_norm(g * 10.0**log_c), min_norm(g), atol=1e-9, rtol=0)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(2, 40), st.integers(0, 2**32 - 1))
def test_batch_equals_per_problem(k, seed):
    rng = np.random.default_rng(seed)
    fams = rng.choice(FAMILIES, size=6)
    gs = []
    for fam in fams:
        j = make_jacobian(str(fam), k, rng)
        gs.append(torch.from_numpy(j @ j.T) * 10.0 ** rng.uniform(-8, 8))
    batch = torch.stack(gs).reshape(2, 3, k, k)
    w, gap = min_norm(batch, return_gap=True)
    assert w.shape == (2, 3, k) and gap.shape == (2, 3)
    for i, g in enumerate(gs):
        wi = min_norm(g)
        gn = normalised(g)
        # identical trajectories: same weights up to the rounding of batched kernels
        assert abs(objective(gn, w.reshape(6, k)[i]) - objective(gn, wi)) <= 1e-12
        assert gap.reshape(6)[i].item() <= EXACT * g.diagonal().max().item()
    wu = min_norm(torch.stack([unique_solution_gramian(k, seed + i) for i in range(4)]))
    for i in range(4):
        torch.testing.assert_close(wu[i], min_norm(unique_solution_gramian(k, seed + i)))


# --------------------------------------------------------------------------- dtypes


@settings(max_examples=20, deadline=None, derandomize=True)
@given(gramians(families=("random", "no_conflict", "duplicated", "collinear")))
def test_float32_input(case):
    family, g = case
    g32 = g.float()
    w32, gap = min_norm(g32, return_gap=True)
    assert w32.dtype == torch.float32
    assert torch.isfinite(w32).all() and (w32 >= 0).all()
    assert abs(w32.sum().item() - 1) <= 1e-6
    # exact to float32 precision for the float32 matrix it was given
    assert gap.dtype == torch.float64
    assert gap.item() <= 1e-6 * g32.diagonal().max().item(), family
    gn = normalised(g)
    assert objective(gn, w32) <= objective(gn, min_norm(g)) + 1e-5, family


def test_half_and_bfloat16_accepted():
    g = unique_solution_gramian(5, 0)
    w = min_norm(g)
    for dt in (torch.float16, torch.bfloat16):
        wd = min_norm(g.to(dt))
        assert wd.dtype == dt
        torch.testing.assert_close(wd.double(), w, atol=2e-2, rtol=0)


# --------------------------------------------------------------------------- closed forms


def test_two_tasks_closed_form_without_clipping():
    g = torch.tensor([[1.0, -0.5], [-0.5, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(min_norm(g), torch.tensor([0.75, 0.25], dtype=torch.float64))
    # the published solver clips to [0.001, 0.999]; a vertex must stay a vertex
    g = torch.tensor([[1.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(min_norm(g), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # identical gradients: every point is optimal, we return the middle
    torch.testing.assert_close(min_norm(torch.ones(2, 2)), torch.tensor([0.5, 0.5]))


def test_opposite_gradients_reach_zero():
    for k in (2, 5, 12):
        coef = torch.linspace(-1, 2, k, dtype=torch.float64)
        g = torch.outer(coef, coef)
        w, gap = min_norm(g, return_gap=True)
        assert objective(g, w) <= 1e-14 and gap.item() <= 1e-14


@pytest.mark.parametrize("k", [1, 2, 3, 8, 9, 30])
def test_zero_gramian_gives_uniform_weights(k):
    w, gap = min_norm(torch.zeros(k, k), return_gap=True)
    torch.testing.assert_close(w, torch.full((k,), 1.0 / k))
    assert gap.item() == 0.0


@pytest.mark.parametrize("k", [3, 8, 9, 30])
def test_single_zero_gradient_gets_all_the_weight(k):
    rng = np.random.default_rng(k)
    j = rng.standard_normal((k, 2 * k))
    j[k // 2] = 0
    w = min_norm(torch.from_numpy(j @ j.T))
    torch.testing.assert_close(w, torch.eye(k, dtype=torch.float64)[k // 2])


def test_one_task():
    torch.testing.assert_close(min_norm(torch.tensor([[3.0]])), torch.tensor([1.0]))


def test_known_solution_three_tasks():
    # g1 = e1, g2 = e2, g3 = e1 + e2: the min-norm point is (e1 + e2) / 2
    j = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        min_norm(j @ j.T), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    )


def test_empty_batch_and_shapes():
    assert min_norm(torch.zeros(0, 4, 4)).shape == (0, 4)
    assert min_norm(torch.zeros(0, 12, 12)).shape == (0, 12)
    w, gap = min_norm(torch.eye(3).expand(2, 5, 3, 3), return_gap=True)
    assert w.shape == (2, 5, 3) and gap.shape == (2, 5)


def test_asymmetric_input_uses_symmetric_part():
    g = unique_solution_gramian(10, 3)
    skew = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(min_norm(g + (skew - skew.T)), min_norm(g), atol=1e-9, rtol=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("k", [2, 5, 12])
def test_non_finite_input_raises_on_cpu(k):
    g = torch.eye(k)
    g[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        min_norm(g)
    g[0, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        min_norm(g)
    # opting out of the check (the CUDA default): no raise, no crash (a warning on CPU is fine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert min_norm(g, check_finite=False).shape == (k,)


@pytest.mark.parametrize(
    ("g", "exc", "match"),
    [
        (torch.ones(3), ValueError, "shape"),
        (torch.ones(2, 3), ValueError, "shape"),
        (torch.ones(0, 0), ValueError, "K >= 1"),
        (torch.ones(3, 3, dtype=torch.long), TypeError, "floating-point"),
        ([[1.0]], TypeError, "tensor"),
    ],
)
def test_bad_arguments(g, exc, match):
    with pytest.raises(exc, match=match):
        min_norm(g)


def test_bad_options():
    with pytest.raises(ValueError, match="tol"):
        min_norm(torch.eye(3), tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        min_norm(torch.eye(3), max_iter=-1)


def test_budget_exhausted_warns_and_stays_feasible():
    rng = np.random.default_rng(0)
    j = rng.standard_normal((40, 21))  # rank-deficient: needs the active-set finish
    g = torch.from_numpy(j @ j.T)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = min_norm(g, max_iter=0)
    assert any(issubclass(r.category, RuntimeWarning) for r in rec)
    assert_on_simplex(w)
    # the same problem with the default budget is exact
    assert min_norm(g, return_gap=True)[1].item() <= EXACT * g.diagonal().max().item()


# --------------------------------------------------------------------------- sync-free path


@settings(max_examples=10, deadline=None, derandomize=True)
@given(gramians(max_k=48))
def test_sync_free_path_matches_early_exit(case):
    """The default CUDA path (no early exit, no finiteness check) gives the same answer."""
    _, g = case
    w = min_norm(g)
    w2, gap2 = min_norm(g, early_exit=False, check_finite=False, return_gap=True)
    gn = normalised(g)
    assert abs(objective(gn, w) - objective(gn, w2)) <= 1e-12
    assert gap2.item() <= EXACT * g.diagonal().max().item()


@pytest.mark.parametrize("k", [2, 5, 11])
def test_traceable_without_graph_breaks(k):
    """No .item()/bool() on tensors in the default non-CPU path: fullgraph tracing succeeds."""
    torch._dynamo.reset()
    g = unique_solution_gramian(k, 1)

    def solve(x):
        return min_norm(x, max_iter=3)  # defaults resolve to the sync-free path when compiling

    compiled = torch.compile(solve, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(g), min_norm(g, max_iter=3, early_exit=False))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(gramians(min_k=2, max_k=2))
def test_two_task_scalar_and_batched_paths_agree(case):
    _, g = case
    w, gap = min_norm(g, return_gap=True)  # a single CPU problem: Python-float closed form
    wb, gapb = min_norm(g[None], return_gap=True)  # batched tensor closed form
    torch.testing.assert_close(w, wb[0], atol=1e-15, rtol=0)
    assert abs(gap.item() - gapb[0].item()) <= 1e-15 * g.diagonal().max().item()


# ------------------------------------------------------------- the small single-problem path


@SETTINGS
@given(gramians())
def test_single_small_problem_path_matches_batched_path(case):
    # one Gramian with 3 <= K <= 24 on CPU takes the NumPy active-set path; a batch of one
    # takes the batched tensor path: both exact, same optimal value
    family, g = case
    w_single, gap_single = min_norm(g, return_gap=True)
    w_batch, gap_batch = min_norm(g.unsqueeze(0), return_gap=True)
    scale = g.diagonal().max().item()
    assert_on_simplex(w_single)
    assert gap_single.item() <= EXACT * scale and gap_batch.item() <= EXACT * scale, family
    assert abs(objective(g, w_single) - objective(g, w_batch[0])) <= 2 * EXACT * scale


@pytest.mark.parametrize("answer", ["uniform", "none"])
def test_small_path_answers_are_verified(monkeypatch, answer):
    import sys

    module = sys.modules["gradbalance.solvers.small"]
    j = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    g = j @ j.T  # optimum: w proportional to 1 / G_ii = (36, 9, 4) / 49, not uniform
    expected = torch.tensor([36.0, 9.0, 4.0], dtype=torch.float64) / 49
    wrong = {"uniform": lambda q, b, ridge, iters: np.full(q.shape[0], 1 / q.shape[0])}
    monkeypatch.setattr(module, "solve_small", wrong.get(answer, lambda q, b, ridge, iters: None))
    w, gap = min_norm(g, return_gap=True)  # the gap check rejects the answer: batched path
    torch.testing.assert_close(w, expected)
    assert gap.item() <= EXACT * 9


# --------------------------------------------------------------------------- spread (issue 12)


def spread_gramian(k: int, spread: float, seed: int) -> torch.Tensor:
    """Unit directions scaled to norms spread log-evenly from ``spread`` down to 1/spread."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 3 * k, generator=gen, dtype=torch.float64)
    j = j / j.norm(dim=1, keepdim=True)
    norms = torch.logspace(np.log10(spread), -np.log10(spread), k, dtype=torch.float64)
    j = j * norms[:, None]
    return j @ j.T


def scaled_kkt_violation(g: torch.Tensor, w: torch.Tensor) -> float:
    """max_i of the KKT violation (Gw)_i ≥ wᵀGw (= on the support) measured relative to
    ‖g_i‖·‖Σ_j w_j ‖g_j‖‖ — the size of the rounding error in (Gw)_i — so it is meaningful
    whatever the spread of the norms."""
    norms = g.diagonal().clamp_min(0).sqrt()
    gw = g @ w
    f = w @ gw
    viol = torch.where(w > 0, (gw - f).abs(), (f - gw).clamp_min(0))
    return float((viol / (norms * (w * norms).sum())).max())


@pytest.mark.parametrize("k", [3, 4, 6, 9, 12])
@pytest.mark.parametrize("spread", [1e4, 1e8, 1e12])
def test_norms_spread_over_many_orders_of_magnitude(k, spread):
    """MGDA's subproblem with gradient norms from `spread` to 1/`spread` (e.g. 1e8 : 1 : 1e-8).
    The optimum puts its weight on the smallest gradients (objective at most 1/spread²); the
    solver used to stop at objectives of order 1 because its certificate was relative to the
    largest norm only. It must match the true minimiser: its objective is at most cvxpy's
    (on a well-scaled formulation) and at most the smallest G_ii, and it meets the KKT
    conditions to rounding in units of each gradient's own norm."""
    for seed in range(3):
        g = spread_gramian(k, spread, seed)
        for w in (min_norm(g), min_norm(g.unsqueeze(0))[0]):  # single fast path and batched
            assert_on_simplex(w)
            f = objective(g, w)
            assert f <= float(g.diagonal().min()) * (1 + 1e-9), (seed, f)
            assert scaled_kkt_violation(g, w) <= 1e-9, seed
            assert f <= cvxpy_scaled_optimum(g) * (1 + 1e-6) + 1e-12 / spread**2


@pytest.mark.parametrize("k", [3, 5, 10])
def test_spread_orthogonal_gradients_exact_solution(k):
    """Orthogonal gradients: w_i ∝ 1/‖g_i‖², f* = 1 / Σ_i 1/‖g_i‖² (known in closed form)."""
    g = torch.diag(torch.logspace(16, -16, k, dtype=torch.float64))  # norms 1e8 ... 1e-8
    inv = 1 / g.diagonal()
    for w in (min_norm(g), min_norm(g.unsqueeze(0))[0]):
        torch.testing.assert_close(w, inv / inv.sum(), rtol=1e-9, atol=1e-24)
        assert objective(g, w) == pytest.approx(float(1 / inv.sum()), rel=1e-9)


def cvxpy_scaled_optimum(g: torch.Tensor) -> float:
    """cvxpy on the Jacobi-scaled form: v = D w with D = diag(‖g_i‖), so the objective reads
    vᵀĜv with Ĝ of unit diagonal and the constraint (d_min/d)ᵀv = d_min; the value is then
    evaluated on the original G (cvxpy on the raw G stops ~1e-9 away in absolute terms)."""
    import cvxpy as cp

    a = g.numpy()
    d = np.sqrt(np.diag(a))
    gh = a / d[:, None] / d[None, :]
    v = cp.Variable(a.shape[0])
    c = d.min() / d
    problem = cp.Problem(cp.Minimize(cp.quad_form(v, cp.psd_wrap(gh))), [v >= 0, c @ v == 1])
    problem.solve(solver=cp.CLARABEL)
    w = np.maximum(v.value / d, 0.0)
    w = w / w.sum()
    return float(w @ a @ w)
