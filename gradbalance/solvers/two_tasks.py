r"""The closed form of the min-norm problem for two tasks.

For $K = 2$ the minimiser of $w^\top G w$ over the simplex is

$$
w_1 = \operatorname{clip}\Big(\frac{G_{22} - G_{12}}{G_{11} + G_{22} - 2 G_{12}}, 0, 1\Big),
\qquad w_2 = 1 - w_1 ,
$$

read from the symmetric part of ``G`` (``G12 = (g12 + g21) / 2``); it needs no scaling, and
identical gradients (``|g1 - g2|^2 = 0``, including ``G = 0``) get ``(1/2, 1/2)``. The formula
is written once (`closed_form`), for Python floats and tensors alike: `first_weight` evaluates
it on four floats (one Gramian on CPU, no tensor dispatch, the most common multi-task case) and
`two_task_weights` on a batch of tensors; both give the same bits.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["closed_form", "first_weight", "first_weight_gap", "two_task_weights"]

N = TypeVar("N", float, Tensor)


def closed_form(g11: N, g12: N, g21: N, g22: N) -> tuple[N, N, N]:
    """``(off, num, den)`` with ``off = (g12 + g21) / 2``, ``num = G22 - off`` and
    ``den = G11 + G22 - 2 off = |g1 - g2|^2``: the unclipped weight of task 1 is ``num / den``.
    """
    off = 0.5 * (g12 + g21)
    num = g22 - off
    den = g11 - off + num
    return off, num, den


def first_weight(g11: float, g12: float, g21: float, g22: float) -> float:
    """``w_1`` of the Gramian ``[[g11, g12], [g21, g22]]`` given as Python floats."""
    _, num, den = closed_form(g11, g12, g21, g22)
    return min(max(num / den, 0.0), 1.0) if den > 0 else 0.5


def first_weight_gap(g11: float, g12: float, g21: float, g22: float, w1: float) -> float:
    """The duality gap ``wᵀGw - min_i (Gw)_i`` of ``w = (w1, 1 - w1)``, on Python floats."""
    off = 0.5 * (g12 + g21)
    w2 = 1.0 - w1
    gw1, gw2 = g11 * w1 + off * w2, off * w1 + g22 * w2
    return w1 * gw1 + w2 * gw2 - min(gw1, gw2)


def two_task_weights(g: Tensor) -> Tensor:
    """The weights ``(B, 2)`` of a batch of Gramians ``g`` ``(B, 2, 2)``."""
    a, b, c, d = g.reshape(-1, 4).unbind(-1)
    _, num, den = closed_form(a, b, c, d)
    w1 = torch.where(den > 0, num / den, 0.5).clamp(0.0, 1.0)
    return torch.stack([w1, 1 - w1], dim=-1)
