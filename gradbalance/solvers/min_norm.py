r"""The minimum-norm point of the convex hull of the task gradients (MGDA's subproblem).

Sener & Koltun (NeurIPS 2018, eq. (3)) solve

$$
\min_{w \in \Delta^K} \Big\| \sum_i w_i g_i \Big\|^2 = \min_{w \in \Delta^K} w^\top G w,
\qquad \Delta^K = \{w \ge 0,\ \mathbf 1^\top w = 1\},\quad G = J J^\top,
$$

with a Frank-Wolfe loop in Python. `min_norm` solves the same problem exactly (to the
tolerance of a verified duality gap) with batched tensor code; the algorithm and its guarantees
are documented on the solvers page of the docs. This module holds the API and picks the
algorithm; each algorithm has its own module:

- `gradbalance.solvers.two_tasks`: the closed form for ``K = 2`` (one Gramian or a batch);
- `gradbalance.solvers.jacobi`: the Jacobi-scaled problem every path for ``K >= 3`` solves;
- `gradbalance.solvers.small`: one Gramian on CPU with ``3 <= K <= 256``, a verified NumPy
  path (`gradbalance.solvers.numpy_nnqp` beyond ``K = 24``);
- `gradbalance.solvers.supports`: every support at once for ``3 <= K <= 8``;
- `gradbalance.solvers.pivoting`: block principal pivoting with an active-set finish, beyond.
- `gradbalance.solvers.fused`: one Triton launch for a batch (``2 <= K <= 128``): Frank-Wolfe
  with an exact finish and a certified gap, the default on CUDA when Triton is importable;
- `gradbalance.solvers.frank_wolfe`: ``method="frank-wolfe"``, the published (inexact) solver.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, overload

import torch
from torch import Tensor

from gradbalance.errors import NonFiniteError
from gradbalance.solvers._threads import cpu_single_thread, is_compiling
from gradbalance.solvers.frank_wolfe import MAX_ITER, frank_wolfe
from gradbalance.solvers.fused import fused_available, min_norm_fused
from gradbalance.solvers.jacobi import jacobi_scale, weights_from
from gradbalance.solvers.pivoting import default_max_iter, resolve_flags, solve_nnqp
from gradbalance.solvers.small import NUMPY_MAX_K, SMALL_MAX_K, min_norm_small
from gradbalance.solvers.supports import ENUM_MAX_K, solve_supports
from gradbalance.solvers.two_tasks import first_weight, first_weight_gap, two_task_weights

__all__ = ["min_norm", "min_norm_gap"]

# (device type, dtype, K) where the fused kernel raised with backend="auto": the batched path
# solves those from then on (the kernel has not yet run on every GPU; one warning says so)
_KERNEL_FAILED: set[tuple[str, torch.dtype, int]] = set()

Method = Literal["exact", "frank-wolfe"]
Backend = Literal["auto", "torch", "triton"]

_NONFINITE = (
    "min_norm received a Gramian with NaN or infinite entries; a task loss or gradient is not "
    "finite (check the losses, or skip the step)"
)


def min_norm_gap(G: Tensor, w: Tensor) -> Tensor:
    r"""Frank-Wolfe duality gap of weights ``w`` for the min-norm problem of ``G``.

    $$
    \operatorname{gap}(w) = w^\top G w - \min_i (G w)_i \;\ge\; \tfrac12 \Big(w^\top G w -
    \min_{v \in \Delta} v^\top G v\Big) \;\ge\; 0 ,
    $$

    so twice the gap bounds the suboptimality of ``w`` (for ``w`` on the simplex and ``G``
    positive semi-definite: ``2 gap`` is the largest decrease of the linearised objective over
    the simplex, since the gradient of ``wᵀGw`` is ``2Gw``), zero exactly at the optimum. It is
    the KKT condition $(Gw)_i \ge w^\top G w$ with equality on the support, in one number.

    Args:
        G: ``(..., K, K)`` Gramians.
        w: ``(..., K)`` weights on the simplex.

    Returns:
        The gap, shape ``(...)``, in float64 and in the units of ``G``.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers import min_norm_gap
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> min_norm_gap(G, torch.tensor([0.5, 0.5])).item()
        0.0
        >>> min_norm_gap(G, torch.tensor([1.0, 0.0])).item()
        1.0
    """
    g = G.to(torch.float64)
    g = 0.5 * (g + g.mT)
    ww = w.to(device=G.device, dtype=torch.float64)
    gw = (g @ ww.unsqueeze(-1)).squeeze(-1)
    return (ww * gw).sum(-1) - gw.amin(-1)


def _gap(g: Tensor, w: Tensor) -> Tensor:
    gw = (g @ w.unsqueeze(-1)).squeeze(-1)
    return (w * gw).sum(-1) - gw.amin(-1)


def _two_scalar(G: Tensor, check: bool, return_gap: bool) -> Tensor | tuple[Tensor, Tensor]:
    """One two-task Gramian on CPU: the closed form on Python floats."""
    (a, b), (c, d) = G.tolist()
    if check and not all(math.isfinite(x) for x in (a, b, c, d)):
        raise NonFiniteError(_NONFINITE)
    w1 = first_weight(a, b, c, d)
    w = torch.tensor([w1, 1.0 - w1], dtype=G.dtype)
    if not return_gap:
        return w
    return w, torch.tensor(first_weight_gap(a, b, c, d, w1), dtype=torch.float64)


@overload
def min_norm(
    G: Tensor,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    return_gap: Literal[False] = ...,
    early_exit: bool | None = ...,
    check_finite: bool | None = ...,
    method: Method = ...,
    backend: Backend = ...,
) -> Tensor: ...


@overload
def min_norm(
    G: Tensor,
    *,
    tol: float = ...,
    max_iter: int | None = ...,
    return_gap: Literal[True],
    early_exit: bool | None = ...,
    check_finite: bool | None = ...,
    method: Method = ...,
    backend: Backend = ...,
) -> tuple[Tensor, Tensor]: ...


@cpu_single_thread
def min_norm(
    G: Tensor,
    *,
    tol: float = 1e-12,
    max_iter: int | None = None,
    return_gap: bool = False,
    early_exit: bool | None = None,
    check_finite: bool | None = None,
    method: Method = "exact",
    backend: Backend = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Minimum-norm point of the convex hull of the task gradients, from their Gramian.

    Solves, for every Gramian of the batch (Sener & Koltun, NeurIPS 2018, eq. (3)),

    $$
    w^\star = \arg\min_{w \ge 0,\ \mathbf 1^\top w = 1} w^\top G w ,
    $$

    so that $\sum_i w^\star_i g_i$ is the minimum-norm element of the convex hull of the
    gradients $g_i$ (rows of $J$, $G = JJ^\top$).

    Method (see the solvers page of the docs for the guarantees): ``G`` is symmetrised and
    divided by its largest diagonal entry (so the result does not depend on the scale of
    ``G`` and ``tol`` is relative). For ``K >= 3`` the problem is then solved in Jacobi-scaled
    variables (`gradbalance.solvers.jacobi`: ``D^{-1} G D^{-1}`` with
    ``D = diag(sqrt(G_ii))``, an exact reformulation), so gradients whose norms differ by many
    orders of magnitude (``1e8 : 1 : 1e-8``) keep their own relative precision and the weights
    land on the true minimiser, whose objective is then at most ``min_i G_ii``. Then

    - ``K = 1``: ``w = [1]``; ``K = 2``: the closed form
      $w_1 = \operatorname{clip}\big((G_{22}-G_{12})/(G_{11}+G_{22}-2G_{12}), 0, 1\big)$
      (the published code clips to [0.001, 0.999]; we do not);
    - ``3 <= K <= 8``: every support is solved at once (``2^K - 1`` tiny linear systems in one
      batched call) and the candidate with the smallest KKT residual is kept;
    - ``K >= 9``: the problem is rewritten as the non-negative least-squares problem
      $\min_{u \ge 0} \tfrac12 u^\top (G + \mathbf 1\mathbf 1^\top) u - \mathbf 1^\top u$,
      whose solution is $u^\star = w^\star / (1 + w^{\star\top} G w^\star)$ (here in its
      Jacobi-scaled form), and solved by block principal pivoting with a primal active-set
      (Wolfe / Lawson-Hanson) finish, which stops on the KKT residual.

    A single Gramian with ``3 <= K <= 256`` on CPU (the usual training step) is first solved
    on NumPy arrays (`gradbalance.solvers.small`: Lawson-Hanson's active-set method up to
    ``K = 24``, beyond it `gradbalance.solvers.numpy_nnqp`: block principal pivoting, then an
    active set with a growing Cholesky factor), which skips the tensor dispatch the batched
    code pays per operation; its answer is returned only if its KKT residual is at most
    ``tol / 8``, otherwise the batched path above solves it.

    On CUDA with Triton importable (``backend="auto"``, eager mode: under ``torch.compile`` the
    batched path stays unless ``backend="triton"``), ``2 <= K <= 128`` is instead solved by
    one fused Triton launch for the whole batch (`gradbalance.solvers.fused`: pairwise
    Frank-Wolfe steps, then the KKT system on the detected support, kept only with a verified
    duality gap ``<= tol * max(diag G)``, computed in float64 in the kernel). Problems it does
    not certify within its budget are solved again by the batched path when ``early_exit``
    applies (one host read); on the sync-free path (``early_exit=False``) they keep the
    kernel's feasible iterate, and the returned gap says how far it is.

    Differences from the paper's solver: on the paths above, no Frank-Wolfe iterations (the
    active-set method terminates at the exact optimum instead of approaching it at a sublinear
    rate), no pairwise initialisation, no clipping; a zero Gramian gives uniform weights.

    Args:
        G: Gramians, shape ``(..., K, K)``, symmetric positive semi-definite (only the
            symmetric part is read; positivity is not checked). Any floating dtype and device.
        tol: stopping tolerance: on the KKT residual of the Jacobi-scaled problem for
            ``K >= 3``, which keeps the duality gap below about ``tol * max(diag(G))`` (default
            ``1e-12``; values below ~1e-14 are under the rounding floor and only make the
            solver use its whole budget). For inputs in a lower precision than float64 it is
            raised to the machine epsilon of the input dtype (``1.2e-7`` for float32), the
            precision to which such a Gramian is known.
        max_iter: iteration budget of the active-set finish for ``K >= 9`` (default
            ``2K + 20``; the pivoting stages before it use at most 20 solves). The NumPy path
            for one CPU Gramian with ``K > 24`` and the fused kernel have budgets of their own
            (``3K + 20`` steps, ``2K + 20`` rounds); an explicit value sends the former's
            Gramians to the batched engine.
        return_gap: also return the duality gap `min_norm_gap` of the result.
        early_exit: stop iterating once every problem of the batch has converged. Reading
            that boolean is free on CPU, so it is the default there (eager mode); on CUDA and
            under ``torch.compile`` the default runs the whole budget with converged problems
            frozen, with no host synchronisation. ``True`` on CUDA syncs once per iteration.
        check_finite: raise `gradbalance.errors.NonFiniteError` if ``G`` has NaN or
            infinite entries. Default: on CPU in eager mode only; elsewhere non-finite input
            yields NaN weights (no synchronisation is spent on the check).
        method: ``"exact"`` (default: everything above) or ``"frank-wolfe"``: the published
            Frank-Wolfe solver of Sener & Koltun (`gradbalance.solvers.frank_wolfe`: best-pair
            start, stop when the weights change by less than ``1e-5`` in L1 norm or after
            ``max_iter`` iterations, default 250), for reproducing papers; not exact (``tol``
            does not apply, no warning when the cap fires), computed in the input dtype (float32
            for lower precisions), on CUDA by a Triton kernel when Triton is importable.
        backend: ``"auto"`` (default: the fused Triton kernel for ``method="exact"`` on CUDA
            when Triton is importable; for ``"frank-wolfe"`` also on CPU under
            ``TRITON_INTERPRET=1``), ``"triton"`` (the kernel whenever ``K <= 128``; a CPU
            tensor then needs ``TRITON_INTERPRET=1``: how the tests run it) or ``"torch"``
            (never the kernel).

    Returns:
        Weights of shape ``(..., K)`` on the simplex, in the dtype and on the device of ``G``
        (computed in float64 whatever the input dtype). With ``return_gap=True``, the pair
        ``(weights, gap)`` where ``gap`` (float64, shape ``(...)``, units of ``G``) is
        $w^\top G w - \min_i (Gw)_i \ge (f(w) - f^\star) / 2$, at most ``tol * max(diag G)``
        for a converged problem (up to rounding).

    Raises:
        ValueError: if ``G`` is not of shape ``(..., K, K)`` with ``K >= 1``, ``tol < 0`` or
            an unknown ``method`` or ``backend``.
        TypeError: if ``G`` is not a floating-point tensor.
        RuntimeError: if ``backend="triton"`` cannot run (no Triton, or a CPU tensor without
            ``TRITON_INTERPRET=1``).
        NonFiniteError: on NaN or infinite entries, when ``check_finite`` applies.

    Warns:
        RuntimeWarning: if a problem did not converge within ``max_iter`` (only checked when
            ``early_exit`` applies).

    Examples:
        >>> import torch
        >>> from gradbalance.solvers import min_norm
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 4.0]])
        >>> min_norm(G)
        tensor([0.7500, 0.2500])
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> w, gap = min_norm(J @ J.T, return_gap=True)
        >>> w, gap.item() < 1e-12
        (tensor([0.5000, 0.5000, 0.0000]), True)
        >>> min_norm(torch.zeros(2, 3, 3)).shape  # a batch of problems
        torch.Size([2, 3])
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"min_norm expects a tensor, got {type(G).__name__}")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2] or G.shape[-1] == 0:
        raise ValueError(
            f"min_norm expects Gramians of shape (..., K, K) with K >= 1, got {tuple(G.shape)}"
        )
    if not G.is_floating_point():
        raise TypeError(f"min_norm expects a floating-point Gramian, got {G.dtype}")
    if method not in ("exact", "frank-wolfe"):
        raise ValueError(f"method must be 'exact' or 'frank-wolfe', got {method!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol}")
    k = G.shape[-1]
    iters = default_max_iter(k) if max_iter is None else int(max_iter)
    if iters < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter}")
    early, check = resolve_flags(G.device, early_exit, check_finite)
    G = G.detach()
    if method == "frank-wolfe":
        if check and not bool(torch.isfinite(G).all()):
            raise NonFiniteError(_NONFINITE)
        fw, _, fw_gap = frank_wolfe(
            G, max_iter=MAX_ITER if max_iter is None else iters, backend=backend
        )
        return (fw, fw_gap.to(torch.float64)) if return_gap else fw
    cpu_fast = G.dim() == 2 and G.device.type == "cpu" and not is_compiling()
    cpu_fast = cpu_fast and backend != "triton"
    if k == 2 and cpu_fast:
        # one two-task problem on CPU: the same closed form on Python floats (no tensor op
        # dispatch, no device involved); this is the most common MTL case
        return _two_scalar(G, check, return_gap)
    # a Gramian stored in lower precision is only known to its machine epsilon (and is often
    # slightly indefinite after rounding): asking for more than that only burns iterations
    tol = max(tol, torch.finfo(G.dtype).eps) if G.dtype != torch.float64 else tol
    # the NumPy path beyond SMALL_MAX_K has its own budget: an explicit max_iter is the engine's
    if (3 <= k <= SMALL_MAX_K or (k <= NUMPY_MAX_K and max_iter is None)) and cpu_fast:
        # it returns None on non-finite input, which the check below then reports
        fast = min_norm_small(G, tol, return_gap, large=k > SMALL_MAX_K)
        if fast is not None:
            return fast
    if check and not bool(torch.isfinite(G).all()):
        raise NonFiniteError(_NONFINITE)
    batch = G.shape[:-2]
    # under torch.compile the traced batched path stays the default (the kernel launch there is
    # untested); backend="triton" asks for the kernel anyway
    fused = (backend == "triton" or not is_compiling()) and fused_available(G.device, k, backend)
    if fused and backend == "auto" and (G.device.type, G.dtype, k) in _KERNEL_FAILED:
        fused = False
    if fused:
        try:
            w, gap = _fused(G.reshape(-1, k, k), tol, iters, early)
        except Exception as exc:  # the kernel did not compile or launch on this device
            if backend != "auto":
                raise
            _KERNEL_FAILED.add((G.device.type, G.dtype, k))
            warnings.warn(
                f"min_norm: the fused Triton kernel failed on this {G.device.type} device for "
                f"K = {k}, {G.dtype} ({type(exc).__name__}: {exc}); solving with the batched "
                "path instead (the same exact answer, more kernel launches) for the rest of "
                "this process. Pass backend='torch' to skip the kernel, and please report it.",
                RuntimeWarning,
                stacklevel=2,
            )
            fused = False
    if not fused:
        w, gap = _batched(G.reshape(-1, k, k).to(torch.float64), tol, iters, early)
    out = w.to(device=G.device, dtype=G.dtype).reshape(*batch, k)
    return (out, gap.reshape(batch)) if return_gap else out


def _fused(g: Tensor, tol: float, iters: int, early: bool) -> tuple[Tensor, Tensor]:
    """The fused kernel; with ``early`` (one host read), the problems it could not certify are
    solved again by the batched path (`_batched`), which warns if they still do not converge."""
    w, gap, certified, _ = min_norm_fused(g, tol)
    w = w.to(torch.float64)
    if early and not bool(certified.all()):
        idx = (~certified).nonzero().squeeze(-1)
        w_b, gap_b = _batched(g[idx].to(torch.float64), tol, iters, early)
        w, gap = w.index_copy(0, idx, w_b), gap.index_copy(0, idx, gap_b)
    return w, gap


def _batched(g: Tensor, tol: float, iters: int, early: bool) -> tuple[Tensor, Tensor]:
    """The batched tensor path on float64 Gramians ``g`` ``(B, K, K)``: ``(w, gap)``."""
    k = g.shape[-1]
    scale = None
    if k == 1:
        w = torch.ones_like(g[:, 0])
    elif k == 2:
        w = two_task_weights(g)  # scale-free closed form
    else:
        g = 0.5 * (g + g.mT)
        scale = g.diagonal(dim1=-2, dim2=-1).amax(-1)
        positive = scale > 0
        g = g / torch.where(positive, scale, torch.ones_like(scale)).view(-1, 1, 1)
        q, b = jacobi_scale(g)
        if k <= ENUM_MAX_K:
            w = weights_from(solve_supports(q, b), b)
        else:
            x, done, res = solve_nnqp(q, b, tol / 8, iters, early)
            w = weights_from(x, b)
            if early and not bool(done.all()):
                bad = res > tol  # the engine aims at tol / 8; warn only well beyond it
                if bool(bad.any()):
                    warnings.warn(
                        f"min_norm: {int(bad.sum())} of {res.numel()} problems did not reach "
                        f"tol={tol:g} within max_iter={iters}; returning the best feasible "
                        f"weights (largest scaled KKT residual {float(res.max()):.3g}). "
                        "Increase max_iter.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        # an all-zero Gramian (every gradient zero): every w is optimal, return the uniform one
        w = torch.where(positive.unsqueeze(-1), w, 1.0 / k)
    gap = _gap(0.5 * (g + g.mT), w)  # on the symmetric part, in relative units for K >= 3
    return w, (gap if scale is None else gap * scale.clamp_min(0))
