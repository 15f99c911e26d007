"""Exact min-norm weights for a few tasks by enumerating every support.

For ``3 <= K <= 8`` (`ENUM_MAX_K`) the Jacobi-scaled NNQP (`gradbalance.solvers.jacobi`) is
solved on each of the ``2^K - 1`` supports at once, in one batched call of small linear
systems, with no iteration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.solvers._threads import is_compiling
from gradbalance.solvers.jacobi import scaled_residual
from gradbalance.solvers.pivoting import RIDGE

__all__ = ["ENUM_MAX_K", "solve_supports"]

#: Largest K solved by enumerating the supports (2^K - 1 small systems, no iteration).
ENUM_MAX_K = 8
#: Cap on the number of small systems per enumeration chunk (bounds the memory).
_ENUM_CHUNK = 1 << 15

_SUBSETS: dict[tuple[int, torch.device], Tensor] = {}


def _subsets(k: int, device: torch.device) -> Tensor:
    """All non-empty subsets of range(k) as a (2^k - 1, k) boolean mask (cached in eager mode)."""
    key = (k, device)
    masks = None if is_compiling() else _SUBSETS.get(key)
    if masks is None:
        codes = torch.arange(1, 1 << k, device=device)
        masks = ((codes.unsqueeze(-1) >> torch.arange(k, device=device)) & 1).bool()
        if not is_compiling():
            _SUBSETS[key] = masks
    return masks


def solve_supports(q: Tensor, b: Tensor) -> Tensor:
    """Exact solve of the scaled NNQP ``(q, b)`` by enumerating supports: every KKT point is
    one of these candidates; returns ``x``.

    For each subset S, solve the equality-constrained problem on S, ``q_SS x_S = b_S``, clip it
    to ``x ≥ 0`` and keep the candidate with the smallest KKT residual. An optimal support that
    is linearly independent always exists (Carathéodory), its system is non-singular and its
    candidate has residual zero; candidates of singular or infeasible subsets violate the KKT
    conditions after the clip, so they can only lose.
    """
    bsz, k, _ = q.shape
    masks = _subsets(k, q.device)
    n = masks.shape[0]
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    q_ridge = q + RIDGE * eye
    mm = masks.unsqueeze(-1) & masks.unsqueeze(-2)  # (n, k, k)
    out = []
    step = max(1, _ENUM_CHUNK // n)
    for start in range(0, bsz, step):
        qc, bc = q_ridge[start : start + step], b[start : start + step]
        m = torch.where(mm, qc.unsqueeze(1), eye)  # (b, n, k, k)
        rhs = (masks.to(q.dtype) * bc.unsqueeze(1)).unsqueeze(-1)  # (b, n, k, 1)
        x = torch.linalg.solve_ex(m, rhs)[0].squeeze(-1)
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
        res = scaled_residual(q[start : start + step].unsqueeze(1), bc.unsqueeze(1), x)
        best = torch.nan_to_num(res, nan=torch.inf).argmin(-1)
        out.append(x.gather(1, best.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1))
    return torch.cat(out) if out else q.new_zeros(0, k)
