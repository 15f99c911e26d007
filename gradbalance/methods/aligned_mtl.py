"""Aligned-MTL (Senushkin et al., CVPR 2023): align the principal components of the gradients."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradbalance.errors import OptionError
from gradbalance.methods._common import checked_gramian
from gradbalance.methods.base import GRAMIAN, LOSSES, Method, StepInputs
from gradbalance.methods.registry import register

__all__ = ["AlignedMTL", "balance_transformation"]

_SCALES = ("min", "median", "rmse")


def balance_transformation(gramian: Tensor, scale: str = "min") -> Tensor:
    r"""Aligned-MTL's balance matrix $B$: the aligned gradients are the rows of $B J$.

    With $G = V \Lambda V^\top$ (eigenvalues above $K\,\varepsilon\,\lambda_{\max}$ kept, the
    official code's rank rule), $B = \sqrt{\sigma}\, V \Lambda^{-1/2} V^\top$ and $\sigma$ the
    smallest kept eigenvalue (``"min"``), their median (``"median"``, the lower one for an even
    count, as ``torch.median``) or their mean (``"rmse"``). Then $B G B = \sigma P$ with $P$
    the orthogonal projector onto the range of $G$: the aligned gradients are orthogonal with
    equal norms. A zero Gramian gives the identity.
    """
    if scale not in _SCALES:
        raise OptionError(f"scale must be one of {_SCALES}, got {scale!r}")
    k = gramian.shape[-1]
    lam, vec = torch.linalg.eigh(gramian)
    top = lam.max()
    keep = lam > top * k * torch.finfo(gramian.dtype).eps
    if not bool(top > 0) or not bool(keep.any()):
        return torch.eye(k, dtype=gramian.dtype, device=gramian.device)
    lam, vec = lam[keep], vec[:, keep]
    if scale == "min":
        sigma = lam.min()
    elif scale == "median":
        sigma = lam.median()
    else:
        sigma = lam.mean()
    return (vec * (sigma / lam).sqrt()) @ vec.T


@register
class AlignedMTL(Method):
    r"""Aligned-MTL: make the task gradients orthogonal with equal norms, then combine them.

    Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component Alignment for Multi-Task
    Learning*, CVPR 2023, Algorithm 1. The linear system of task gradients is badly
    conditioned when gradients conflict or differ in size; Aligned-MTL replaces $J$ by the
    aligned $\hat J = B J$ whose Gramian has condition number 1 on its range:

    $$
    G = J J^\top = V \Lambda V^\top,\qquad
    B = \sqrt{\sigma}\; V \Lambda^{-1/2} V^\top,\qquad
    \hat J \hat J^\top = B G B = \sigma\, V V^\top ,
    $$

    and the shared parameters move along $\hat J^\top p = J^\top (B p)$ with the task
    preferences $p$; so the weights are $w = B p$. The scale $\sigma$ of the aligned gradients
    is the smallest non-zero eigenvalue of $G$ (``scale="min"``, the paper's choice: every
    aligned gradient gets the length of the smallest singular value of $J$), their median or
    their mean (``"median"``, ``"rmse"``: the other choices of the official code). Eigenvalues
    below $K\,\varepsilon\,\lambda_{\max}$ are treated as zero.

    Scale: the weights do not change when every gradient is multiplied by the same factor
    (the update is multiplied by it). No non-conflict guarantee.

    Deviations: none in the formula. The default preferences are ones (the official code sums
    the aligned gradients; TorchJD averages them, i.e. ``pref=[1/K]*K``). The official code and
    LibMTL call ``torch.symeig``, removed in torch 2; we use ``torch.linalg.eigh``. The paper's
    Aligned-MTL-UB (gradients w.r.t. the shared representation) is this method with
    ``engine="representation"`` and ``features=z``. Task-specific parameters get their own
    task's gradient.

    Args:
        scale: ``"min"`` (default), ``"median"`` or ``"rmse"``.
        pref: the task preferences $p$ (``K`` non-negative numbers; default all ones).

    Examples:
        >>> import torch, gradbalance as gb
        >>> J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> m = gb.methods.get("aligned-mtl")
        >>> w = m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=J @ J.T))
        >>> (w @ J).round(decimals=6)  # both aligned gradients: the smallest singular value
        tensor([1., 1.], dtype=torch.float64)
    """

    name = "aligned-mtl"
    requires = frozenset({LOSSES, GRAMIAN})
    paper = (
        "D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin. Independent Component Alignment "
        "for Multi-Task Learning. CVPR 2023."
    )
    stateful = False
    scale_invariant = "weights"
    non_conflicting = False

    def __init__(self, scale: str = "min", pref: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        if scale not in _SCALES:
            raise OptionError(f"scale must be one of {_SCALES}, got {scale!r}")
        self.scale = scale
        self.pref: list[float] | None = None
        if pref is not None:
            values = [float(x) for x in (pref.tolist() if isinstance(pref, Tensor) else pref)]
            if not values or any(not math.isfinite(x) or x < 0 for x in values):
                raise OptionError(f"pref must be non-negative finite numbers, got {pref!r}")
            self.pref = values

    def weights(self, inputs: StepInputs) -> Tensor:
        g = checked_gramian(inputs, "Aligned-MTL")
        k = inputs.num_tasks
        if self.pref is None:
            p = torch.ones(k, dtype=g.dtype, device=g.device)
        else:
            if len(self.pref) != k:
                raise ValueError(
                    f"Aligned-MTL has {len(self.pref)} preferences but there are {k} tasks "
                    f"{list(inputs.tasks)}; give one per task"
                )
            p = torch.tensor(self.pref, dtype=g.dtype, device=g.device)
        return balance_transformation(g, self.scale) @ p

    def extra_repr(self) -> str:
        parts = [f"scale={self.scale!r}"]
        if self.pref is not None:
            parts.append(f"pref={self.pref}")
        return ", ".join(parts)
