r"""Exact min-norm weights in one fused Triton launch: Frank-Wolfe with an exact finish.

The kernel (`gradbalance.solvers._min_norm_triton`, one program per Gramian, ``K <= 128``)
solves $\min_{w \in \Delta^K} w^\top G w$ for a whole batch in one launch, in registers:

1. pairwise Frank-Wolfe steps (move mass from the support index with the largest
   $(Gw)_i$ to the index with the smallest, exact line search): linear convergence on the
   simplex, and the support of the optimum is found in finitely many steps;
2. an **exact finish** on the detected support $S$: the KKT system
   $G_{SS} w_S = \lambda \mathbf 1,\ \mathbf 1^\top w_S = 1$, solved in the Jacobi-scaled
   variables of `gradbalance.solvers.jacobi` as
   $(\hat G_{SS} + b_S b_S^\top) x = b_S,\ w_S = b_S \odot x / b_S^\top x$ (positive
   definite exactly when the points of $S$ are affinely independent; dependent ones are dropped
   at their pivot), accepted only if $w_S > 0$, else Wolfe's step back to feasibility and again;
3. the **certificate**, computed in the kernel: with $d_i = \sqrt{G_{ii}}$ and
   $\bar d = \sum_j w_j d_j$, a problem is *certified* when
   $w^\top G w - (Gw)_i \le \mathrm{tol}\,\max(d_i, \bar d)\,\bar d$ for every $i$ (so its
   duality gap $w^\top G w - \min_i (Gw)_i$ is at most ``tol`` times $\max_i G_{ii}$, and small
   tasks next to a large one are held to their own scale). Otherwise phases 1-2 run again, up
   to ``max_rounds`` rounds.

The weights, the gap (in the units of ``G``), the certified flag and the rounds come back; the
caller (`gradbalance.solvers.min_norm`) decides what to do with problems that were not certified.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch
from torch import Tensor

__all__ = ["FUSED_MAX_K", "default_rounds", "fused_available", "min_norm_fused"]

#: Largest K the kernel takes (one program keeps a KP x KP block in registers).
FUSED_MAX_K = 128

Backend = Literal["auto", "torch", "triton"]


def fused_available(device: torch.device, k: int, backend: Backend = "auto") -> bool:
    """Whether `min_norm` takes the fused kernel: ``backend="triton"`` asks for it (on CPU it
    then needs ``TRITON_INTERPRET=1``); ``"auto"`` takes it on CUDA when Triton is importable;
    ``"torch"`` never. Always ``False`` for ``K > FUSED_MAX_K`` or ``K == 1``.

    Raises:
        RuntimeError: for ``backend="triton"`` without Triton, or on a CPU tensor without
            ``TRITON_INTERPRET=1``.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers.fused import fused_available
        >>> fused_available(torch.device("cpu"), 8)  # auto: CUDA only
        False
    """
    if backend == "torch" or not 2 <= k <= FUSED_MAX_K:
        return False
    if importlib.util.find_spec("triton") is None:
        if backend == "triton":
            raise RuntimeError("min_norm(backend='triton') needs Triton: pip install triton")
        return False
    if device.type == "cuda":
        return True
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True
        raise RuntimeError(
            f"min_norm(backend='triton') runs on CUDA tensors, or on CPU tensors with "
            f"TRITON_INTERPRET=1 set before Triton is imported; got a {device.type} tensor"
        )
    return False


def default_rounds(k: int) -> int:
    """Rounds (a Frank-Wolfe phase and a finish each) before the kernel gives up.

    Examples:
        >>> default_rounds(8)
        36
    """
    return 2 * k + 20


def min_norm_fused(
    g: Tensor,
    tol: float,
    *,
    compute_dtype: torch.dtype = torch.float64,
    fw_iters: int | None = None,
    max_rounds: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the kernel on a batch ``g`` ``(B, K, K)`` (only the symmetric part is read).

    Args:
        g: Gramians, ``2 <= K <= FUSED_MAX_K``, on CUDA (or CPU under the interpreter).
        tol: certificate tolerance (see the module: on ``wᵀGw - (Gw)_i`` relative to the
            norms involved, which bounds ``gap / max_i G_ii``).
        compute_dtype: float64 (default) or float32, the kernel's arithmetic.
        fw_iters: Frank-Wolfe steps per round (default ``max(16, K)``).
        max_rounds: cap on the rounds (default ``2K + 20``); ``0`` runs none.

    Returns:
        ``(w, gap, certified, rounds)``: weights ``(B, K)`` in ``compute_dtype``, the gap
        ``(B,)`` in the units of ``g`` (float64), the certified flag ``(B,)`` (bool) and the
        rounds run ``(B,)`` (int64). All-zero Gramians get uniform weights (gap 0), non-finite
        ones NaN weights (not certified).

    Examples:
        >>> import torch
        >>> from gradbalance.solvers.fused import min_norm_fused
        >>> g = torch.eye(3, dtype=torch.float64, device="cuda").expand(2, 3, 3)  # doctest: +SKIP
        >>> w, gap, certified, rounds = min_norm_fused(g, 1e-12)  # doctest: +SKIP
        >>> w[0], bool(certified.all())  # doctest: +SKIP
        (tensor([0.3333, 0.3333, 0.3333], device='cuda:0', dtype=torch.float64), True)
    """
    from gradbalance.solvers import _min_norm_triton as kernel_module

    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    b, k, _ = g.shape
    if not 2 <= k <= FUSED_MAX_K:
        raise ValueError(f"the fused kernel takes 2 <= K <= {FUSED_MAX_K}, got K = {k}")
    gc = g.to(compute_dtype).contiguous()
    eps = torch.finfo(compute_dtype).eps
    w = torch.empty(b, k, dtype=compute_dtype, device=g.device)
    gap = torch.empty(b, dtype=compute_dtype, device=g.device)
    ok = torch.empty(b, dtype=torch.int32, device=g.device)
    rounds = torch.empty(b, dtype=torch.int32, device=g.device)
    kp = max(2, 1 << (k - 1).bit_length())
    warps = 1 if kp <= 16 else 2 if kp <= 32 else 4 if kp <= 64 else 8
    if kp == 128 and compute_dtype == torch.float64:
        warps = 16  # two 128 x 128 float64 blocks live at once: spread them over more threads
    fw = max(16, k) if fw_iters is None else int(fw_iters)
    cap = default_rounds(k) if max_rounds is None else int(max_rounds)
    # norms below this fraction of the largest are raised to it in the Jacobi-scaled finish
    # (an exact reformulation for any floor; the kernel receives float scalars as float32)
    floor = 1e-30 if compute_dtype == torch.float64 else 1e-15
    if b:
        kernel = kernel_module.get_kernel()
        tol_k = max(tol, 4 * eps)
        kernel[(b,)](
            gc, w, gap, ok, rounds, k, tol_k, 1e3 * eps, floor, fw, cap, KP=kp, num_warps=warps
        )
    zero = g.diagonal(dim1=-2, dim2=-1).amax(-1) <= 0
    w = torch.where(zero.unsqueeze(-1), torch.full_like(w, 1.0 / k), w)
    # non-finite input (its gap is NaN or infinite): NaN weights, as on the batched path
    w = torch.where(torch.isfinite(gap).unsqueeze(-1), w, torch.full_like(w, torch.nan))
    gap = torch.where(zero, torch.zeros_like(gap), gap).to(torch.float64)
    return w, gap, (ok > 0) | zero, rounds.long()
