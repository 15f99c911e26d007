r"""The published Frank-Wolfe min-norm solver of MGDA, batched: PyTorch and a Triton kernel.

Sener & Koltun (NeurIPS 2018), the Frank-Wolfe variant of their ``MinNormSolver``
(``find_min_norm_element_FW``), for reproducing papers: it is *not* exact (its stopping rule
bounds no duality gap); `gradbalance.solvers.min_norm` is. For a Gramian ``G`` (symmetrised):

1. start from the best pair of tasks: for every pair ``i < j`` the two-point problem
   $\min_{\gamma \in [0,1]} \|\gamma g_i + (1-\gamma) g_j\|^2$ by the closed form of
   `gradbalance.solvers.two_tasks.closed_form`, keeping the cheapest (the first on ties);
2. iterate: $t = \arg\min_i (Gw)_i$, $\gamma$ the same two-point solution on
   $(w^\top G w,\ (Gw)_t,\ G_{tt})$, $w \leftarrow \gamma w + (1-\gamma) e_t$;
3. stop when $\sum_i |\Delta w_i| < 10^{-5}$ (``STOP_CRIT``; the step that meets it is not
   applied, as published) or after ``MAX_ITER = 250`` iterations.

``K = 1`` gives ``[1]`` and ``K = 2`` the best pair, without iterating (as published).

Deviations from the published code, both deliberate: its iteration counter is never
incremented, so its cap of 250 never fires (a run can loop forever, see
``benchmarks/published_mgda.py``); here it does. Its two-point step clips an end-point
solution to ``0.999`` / ``0.001``; here ``clip=0`` by default (end points are ``1`` / ``0``,
as in `min_norm`'s closed form) and ``clip=0.001`` reproduces the published step.

Two implementations with the same iterates (up to rounding): `frank_wolfe_torch`, fully
vectorised over the batch (a Python loop over iterations only, stopping when every problem has
stopped), and a Triton kernel (`gradbalance.solvers._frank_wolfe_triton`: one launch, one
program per Gramian, ``K <= 128``), used on CUDA when Triton is importable and on CPU when
``TRITON_INTERPRET=1`` is set (how the tests run it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch
from torch import Tensor

from gradbalance.solvers.two_tasks import closed_form

__all__ = ["MAX_ITER", "STOP_CRIT", "TRITON_MAX_K", "frank_wolfe", "frank_wolfe_torch"]

STOP_CRIT = 1e-5  # the published stopping rule on the L1 change of the weights
MAX_ITER = 250  # the published cap (which never fires there; here it does)
TRITON_MAX_K = 128

Backend = Literal["auto", "torch", "triton"]


def _two_point(v11: Tensor, v12: Tensor, v22: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """``(γ, cost)``: min over γ in [0, 1] of ``|γ x + (1 - γ) y|²`` from ``xᵀx, xᵀy, yᵀy``;
    an end-point solution gets ``1 - clip`` or ``clip`` (the published code: ``clip=0.001``)."""
    _, num, den = closed_form(v11, v12, v12, v22)  # off = v12 exactly
    first = v12 >= v11  # x itself is the closest point of the segment
    second = v12 >= v22  # y is
    den = torch.where(first | second, torch.ones_like(den), den)
    gam = torch.where(first, 1.0 - clip, torch.where(second, clip, num / den))
    cost = torch.where(first, v11, torch.where(second, v22, v22 + gam * (v12 - v22)))
    return gam, cost


def _gap(g: Tensor, w: Tensor) -> Tensor:
    gw = (g @ w.unsqueeze(-1)).squeeze(-1)
    return (w * gw).sum(-1) - gw.amin(-1)


def frank_wolfe_torch(
    g: Tensor, max_iter: int = MAX_ITER, clip: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The algorithm on a batch ``g`` ``(B, K, K)`` of symmetric Gramians, in their dtype.

    Returns ``(w, iters, gap)``: weights ``(B, K)``, the Frank-Wolfe iterations evaluated per
    problem ``(B,)`` (int64; the stopping one included, ``max_iter`` when the cap fired) and the
    duality gap ``wᵀGw - min_i (Gw)_i`` ``(B,)``. One host synchronisation per iteration (the
    early exit) on CUDA.
    """
    b, k, _ = g.shape
    iters = torch.zeros(b, dtype=torch.int64, device=g.device)
    if k == 1:
        w = torch.ones(b, 1, dtype=g.dtype, device=g.device)
        return w, iters, _gap(g, w)
    d = g.diagonal(dim1=-2, dim2=-1)
    gam, cost = _two_point(d.unsqueeze(-1), g, d.unsqueeze(-2), clip)
    pair = torch.ones(k, k, dtype=torch.bool, device=g.device).triu(1)
    cost = torch.where(pair, cost, torch.inf).reshape(b, k * k)
    best = cost.argmin(-1)  # the first minimum: the published loop's order on ties
    gb = gam.reshape(b, k * k).gather(-1, best.unsqueeze(-1))
    idx = torch.arange(k, device=g.device)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    w = torch.where(idx == (best // k).unsqueeze(-1), gb, zero)
    w = w + torch.where(idx == (best % k).unsqueeze(-1), 1.0 - gb, zero)
    if k >= 3 and max_iter > 0:
        active = torch.ones(b, dtype=torch.bool, device=g.device)
        for _ in range(max_iter):
            gw = (g @ w.unsqueeze(-1)).squeeze(-1)
            t = gw.argmin(-1, keepdim=True)
            v11 = (w * gw).sum(-1, keepdim=True)
            v12 = gw.gather(-1, t)
            v22 = d.gather(-1, t)
            step, _ = _two_point(v11, v12, v22, clip)
            new = step * w + torch.where(idx == t, 1.0 - step, zero)
            stop = (new - w).abs().sum(-1) < STOP_CRIT
            move = active & ~stop
            w = torch.where(move.unsqueeze(-1), new, w)
            iters += active.long()
            active = move
            if not bool(active.any()):
                break
    return w, iters, _gap(g, w)


def _use_triton(g: Tensor) -> bool:
    if g.shape[-1] > TRITON_MAX_K or importlib.util.find_spec("triton") is None:
        return False
    if g.device.type == "cuda":
        return True
    return g.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _frank_wolfe_triton(g: Tensor, max_iter: int, clip: float) -> tuple[Tensor, Tensor, Tensor]:
    from gradbalance.solvers import _frank_wolfe_triton as kernel_module

    b, k, _ = g.shape
    if k == 1:
        return frank_wolfe_torch(g, max_iter, clip)
    g = g.contiguous()
    w = torch.empty(b, k, dtype=g.dtype, device=g.device)
    iters = torch.empty(b, dtype=torch.int32, device=g.device)
    gap = torch.empty(b, dtype=g.dtype, device=g.device)
    params = torch.tensor([clip, 1.0 - clip, STOP_CRIT], dtype=g.dtype, device=g.device)
    kp = max(2, 1 << (k - 1).bit_length())
    warps = 1 if kp <= 16 else 2 if kp <= 32 else 4 if kp <= 64 else 8
    kernel = kernel_module.get_kernel()
    kernel[(b,)](g, params, w, iters, gap, k, max_iter, KP=kp, num_warps=warps)
    return w, iters.long(), gap


def frank_wolfe(
    G: Tensor, *, max_iter: int = MAX_ITER, clip: float = 0.0, backend: Backend = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """The published Frank-Wolfe min-norm solver on Gramians ``G`` ``(..., K, K)``.

    Args:
        G: Gramians (only the symmetric part is read), float32 or float64 (lower precisions
            are computed in float32), any device.
        max_iter: the iteration cap (published: 250, which fires here).
        clip: the end-point clip of the two-point step: ``0`` (default) or the published
            ``0.001``.
        backend: ``"auto"`` (the Triton kernel on CUDA when Triton is importable, and on CPU
            under ``TRITON_INTERPRET=1``; PyTorch otherwise), ``"torch"`` or ``"triton"``.

    Returns:
        ``(w, iters, gap)``: weights ``(..., K)`` in ``G``'s dtype, iterations evaluated
        ``(...)`` (int64) and the duality gap ``wᵀGw - min_i (Gw)_i`` ``(...)`` in the
        compute dtype.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers.frank_wolfe import frank_wolfe
        >>> G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
        >>> w, iters, gap = frank_wolfe(G, backend="torch")
        >>> w, iters.item(), gap.item() < 1e-4
        (tensor([0.4444, 0.4444, 0.1111]), 2, True)
    """
    if G.dim() < 2 or G.shape[-1] != G.shape[-2] or G.shape[-1] == 0:
        raise ValueError(
            f"frank_wolfe expects Gramians of shape (..., K, K) with K >= 1, got {tuple(G.shape)}"
        )
    if not G.is_floating_point():
        raise TypeError(f"frank_wolfe expects a floating-point Gramian, got {G.dtype}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if int(max_iter) < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter}")
    if not 0.0 <= clip < 0.5:
        raise ValueError(f"clip must be in [0, 0.5), got {clip}")
    batch, k = G.shape[:-2], G.shape[-1]
    dtype = G.dtype if G.dtype in (torch.float32, torch.float64) else torch.float32
    g = G.detach().reshape(-1, k, k).to(dtype)
    g = 0.5 * (g + g.mT)
    use = _use_triton(g) if backend == "auto" else backend == "triton"
    if use:
        if k > TRITON_MAX_K:
            raise ValueError(f"the Triton kernel takes K <= {TRITON_MAX_K}, got K = {k}")
        w, iters, gap = _frank_wolfe_triton(g, int(max_iter), float(clip))
    else:
        w, iters, gap = frank_wolfe_torch(g, int(max_iter), float(clip))
    return w.to(G.dtype).reshape(*batch, k), iters.reshape(batch), gap.reshape(batch)
