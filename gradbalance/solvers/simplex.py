"""Euclidean projection onto the probability simplex."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_simplex"]


def project_simplex(v: Tensor) -> Tensor:
    r"""Euclidean projection of each row of ``v`` onto the probability simplex.

    Solves, for every vector along the last dimension,

    $$
    \Pi_\Delta(v) = \arg\min_{w \ge 0,\ \mathbf 1^\top w = 1} \|w - v\|_2^2
    = \max(v - \theta, 0),
    $$

    where the threshold $\theta$ is found by sorting (Held, Wolfe & Crowder, 1974;
    Duchi et al., ICML 2008, Fig. 1): with $u$ the entries of ``v`` sorted in decreasing
    order, $\rho = \max\{j : u_j - (\sum_{r \le j} u_r - 1)/j > 0\}$ and
    $\theta = (\sum_{r \le \rho} u_r - 1)/\rho$. Cost $O(K \log K)$; pure tensor
    code (no host synchronisation), batched over all leading dimensions.

    Args:
        v: tensor of shape ``(..., K)`` with ``K >= 1``, floating point.

    Returns:
        Tensor of the same shape, dtype and device as ``v``, non-negative, summing to one along
        the last dimension. NaN entries propagate.

    Raises:
        ValueError: if ``v`` has no dimension or an empty last dimension.
        TypeError: if ``v`` is not floating point.

    Examples:
        >>> import torch
        >>> from gradbalance.solvers import project_simplex
        >>> project_simplex(torch.tensor([0.5, 2.0, -1.0]))
        tensor([0., 1., 0.])
        >>> project_simplex(torch.tensor([[0.4, 0.4], [3.0, 1.0]]))
        tensor([[0.5000, 0.5000],
                [1.0000, 0.0000]])
    """
    if not isinstance(v, Tensor):
        raise TypeError(f"project_simplex expects a tensor, got {type(v).__name__}")
    if v.dim() == 0 or v.shape[-1] == 0:
        raise ValueError(
            f"project_simplex expects a tensor of shape (..., K) with K >= 1, got {tuple(v.shape)}"
        )
    if not v.is_floating_point():
        raise TypeError(f"project_simplex expects a floating-point tensor, got {v.dtype}")
    k = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    j = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    # the condition holds exactly on a prefix of the sorted entries (it always holds at j = 1)
    rho = (u * j > css).sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)
