"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018): the min-norm point of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.errors import OptionError
from gradbalance.methods._common import require_gramian
from gradbalance.methods.base import FEATURES, GRAMIAN, LOSSES, Method, StepInputs
from gradbalance.methods.registry import register
from gradbalance.solvers import min_norm

__all__ = ["MGDA", "MGDAUB"]

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_PAPER = "O. Sener, V. Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018."


def _normalisers(gramian: Tensor, losses: Tensor, normalization: str) -> Tensor:
    """The per-task divisors ``n_i`` of the gradients (``g_i / n_i``)."""
    if normalization == "none":
        return torch.ones_like(losses)
    norms = gramian.diagonal().clamp_min(0).sqrt()
    if normalization == "l2":
        return norms
    if normalization == "loss":
        return losses.abs()
    return losses.abs() * norms  # "loss+"


class _MinNorm(Method):
    def __init__(self, normalization: str = "none", *, tol: float | None = None) -> None:
        super().__init__()
        if normalization not in _NORMALIZATIONS:
            raise OptionError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}"
            )
        self.normalization = normalization
        self.tol = tol

    def weights(self, inputs: StepInputs) -> Tensor:
        g = require_gramian(inputs, self.name.upper())
        n = _normalisers(g, inputs.losses.to(g), self.normalization)
        # a task whose gradient (or loss) is exactly zero keeps divisor 1: its row is zero
        n = torch.where(n > 0, n, torch.ones_like(n))
        scaled = g / (n[:, None] * n[None, :])
        alpha = min_norm(scaled) if self.tol is None else min_norm(scaled, tol=self.tol)
        return alpha / n

    def extra_repr(self) -> str:
        return f"normalization={self.normalization!r}"


@register
class MGDA(_MinNorm):
    r"""Multiple-gradient descent: the minimum-norm point of the convex hull of task gradients.

    Sener & Koltun (NeurIPS 2018) solve, at every step,

    $$
    \alpha^\star = \arg\min_{\alpha \in \Delta^K} \Big\| \sum_i \alpha_i \frac{g_i}{n_i}
    \Big\|^2 = \arg\min_{\alpha \in \Delta^K} \alpha^\top \tilde G \alpha,
    \qquad \tilde G_{ij} = \frac{G_{ij}}{n_i n_j},
    $$

    with $g_i$ the gradient of task ``i`` on the shared parameters, $G = J J^\top$
    and $n_i$ a normaliser: ``"none"`` (1), ``"l2"`` ($\|g_i\|$), ``"loss"``
    ($L_i$) or ``"loss+"`` ($L_i \|g_i\|$). The shared parameters move along
    $-\sum_i \alpha_i g_i / n_i$, i.e. the weights are $w_i = \alpha_i / n_i$;
    task-specific parameters get their own task's gradient. With no normalisation the
    direction is a common descent direction of every task, and it is zero exactly at Pareto
    stationary points.

    The min-norm problem is solved exactly by `gradbalance.solvers.min_norm`.

    Deviations from the published code: the official implementation applies $\alpha$
    (computed on normalised gradients) to the *unnormalised* losses; we apply it to the
    normalised gradients, so the update is exactly the min-norm element the paper describes.
    The published solver clips the two-task solution to [0.001, 0.999]; ours does not clip.

    Args:
        normalization: ``"none"`` (default, the paper's MGDA), ``"l2"``, ``"loss"``,
            ``"loss+"``.
        tol: optional solver tolerance (relative duality gap).

    Examples:
        >>> import torch, gradbalance as gb
        >>> m = gb.methods.MGDA()
        >>> m.bind(("a", "b"))
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 4.0]], dtype=torch.float64)
        >>> m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=G))
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """

    name = "mgda"
    requires = frozenset({LOSSES, GRAMIAN})
    stateful = False
    scale_invariant = "weights"
    non_conflicting = True
    paper = _PAPER


@register
class MGDAUB(_MinNorm):
    r"""MGDA-UB: MGDA on the gradients w.r.t. the shared representation (an upper bound).

    Sener & Koltun (NeurIPS 2018, Sec. 3.3) replace the gradients on the shared parameters by
    the gradients w.r.t. the shared features $z$ (the encoder's output that every head
    reads): minimising $\|\sum_i \alpha_i \nabla_z L_i\|^2$ minimises an upper bound of
    MGDA's objective and needs only ``K`` backwards through the heads and one through the
    encoder. Pass the features to `GradBalancer.backward`:

    ```python
    z = model.encode(x)
    out = model.decode(z)
    opt.backward(losses, features=z)
    ```

    The Gramian is $G_{ij} = \langle \nabla_z L_i, \nabla_z L_j\rangle$ summed over the
    batch; the shared parameters then receive
    $(\partial z / \partial \theta)^\top \sum_i w_i \nabla_z L_i$, which equals MGDA's
    update with these weights. Normalisation options and deviations as `MGDA`.

    Examples:
        >>> import gradbalance as gb
        >>> gb.methods.get("mgda-ub", normalization="loss+")
        MGDAUB(normalization='loss+')
    """

    name = "mgda-ub"
    requires = frozenset({LOSSES, GRAMIAN, FEATURES})
    stateful = False
    scale_invariant = "weights"
    non_conflicting = True
    paper = _PAPER
