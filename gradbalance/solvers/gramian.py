"""Checks and the float64 copy of one ``(K, K)`` Gramian, shared by the CAGrad and Nash solvers."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.errors import NonFiniteError

__all__ = ["check_gramian", "symmetric_float64"]


def check_gramian(G: Tensor, what: str) -> int:
    """``K`` of the finite floating-point ``(K, K)`` tensor ``G``; raise naming ``what`` if it
    is not one (`gradbalance.errors.NonFiniteError` for NaN or infinite entries)."""
    if not isinstance(G, Tensor):
        raise TypeError(f"{what} expects a tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(
            f"{what} expects a Gramian of shape (K, K) with K >= 1, got {tuple(G.shape)}"
        )
    if not G.is_floating_point():
        raise TypeError(f"{what} expects a floating-point Gramian, got {G.dtype}")
    if not bool(torch.isfinite(G).all()):
        raise NonFiniteError(
            f"{what} received a Gramian with NaN or infinite entries; a task loss or gradient is "
            "not finite (check the losses, or skip the step)"
        )
    return G.shape[0]


def symmetric_float64(G: Tensor) -> Tensor:
    """The symmetric part of ``G``, detached, in float64 on the CPU."""
    g = G.detach().to(device="cpu", dtype=torch.float64)
    return 0.5 * (g + g.T)
