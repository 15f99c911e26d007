"""IMTL-G (Liu et al., ICLR 2021): the update with equal projections on every task direction."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.errors import SolverError
from gradbalance.methods._common import checked_gramian
from gradbalance.methods.base import GRAMIAN, LOSSES, Method, StepInputs
from gradbalance.methods.registry import register

__all__ = ["IMTLG"]

#: Relative residual of ``G v = n`` above which ``n`` is not in the range of ``G``.
_IN_RANGE = 1e-6
#: ``|1ᵀv|`` at or below this (relative to ``‖v‖₁``) makes the normalisation impossible.
_ZERO = 1e-10


@register
class IMTLG(Method):
    r"""IMTL-G: the combination of task gradients with equal projections on every unit gradient.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task Learning*,
    ICLR 2021 (the gradient-balance part of IMTL). With $u_i = g_i / \lVert g_i\rVert$, IMTL-G
    looks for $d = \sum_i \alpha_i g_i$, $\sum_i \alpha_i = 1$, such that
    $\langle d, u_1\rangle = \dots = \langle d, u_K\rangle$: no task is favoured. The paper's
    closed form is $\alpha_{2:K} = g_1 U^\top (D U^\top)^{-1}$, $\alpha_1 = 1 - \sum_{i\ge2}
    \alpha_i$ with $D_i = g_1 - g_i$, $U_i = u_1 - u_i$. On the Gramian the condition reads
    $(G\alpha)_i = \lambda \lVert g_i\rVert$ for all $i$, so with $n_i = \sqrt{G_{ii}}$

    $$
    v = G^{+} n, \qquad \alpha = \frac{v}{\lvert \mathbf 1^\top v\rvert},
    $$

    which equals the paper's closed form for linearly independent gradients whenever
    $\mathbf 1^\top v > 0$. The pseudo-inverse extends it to linearly dependent gradients
    when $n$ lies in the range of $G$ (then the projections are still equal); when it does
    not (e.g. two opposite gradients of different lengths), the only update with equal
    projections is $0$, and the weights are $0$. (TorchJD's generalisation returns
    $G^{+}n / \mathbf 1^\top G^{+} n$ there, whose projections are not equal.)

    Scale: $\alpha$ does not change when every gradient is multiplied by the same factor (the
    update is multiplied by it); the update's *direction* does not change when each task's
    gradient is multiplied by its own factor (the paper's scale invariance).

    Deviations from the paper:

    - The sign: the paper normalises by $\sum_i \alpha_i = 1$. When $\mathbf 1^\top v < 0$
      (it happens for some conflicting gradients) that normalisation flips the update into
      $-J^\top v$, whose equal projections are negative: an ascent direction of every loss.
      We divide by $\lvert\mathbf 1^\top v\rvert$ instead (then $\sum_i \alpha_i = -1$), so the
      equal projections are always positive. If $\mathbf 1^\top v = 0$ no normalisation
      exists and a `gradbalance.errors.SolverError` is raised.
    - The paper computes the task gradients w.r.t. the shared representation for speed; by
      default we use the shared parameters. Pass ``engine="representation"`` to
      `GradBalancer` and ``features=z`` to ``backward`` for the paper's choice.
    - IMTL-L (the loss-scale part of the paper's hybrid IMTL) is a separate method.
      Task-specific parameters get their own task's gradient.

    Examples:
        >>> import torch, gradbalance as gb
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> m = gb.methods.get("imtl-g")
        >>> w = m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=J @ J.T))
        >>> w  # the smaller gradient gets the larger weight
        tensor([0.3333, 0.6667], dtype=torch.float64)
        >>> w @ J  # equal projections (2/3) on both unit gradients
        tensor([0.6667, 0.6667], dtype=torch.float64)
    """

    name = "imtl-g"
    requires = frozenset({LOSSES, GRAMIAN})
    paper = (
        "L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang. Towards "
        "Impartial Multi-task Learning. ICLR 2021."
    )
    stateful = False
    scale_invariant = "weights"
    non_conflicting = False

    def weights(self, inputs: StepInputs) -> Tensor:
        g = checked_gramian(inputs, "IMTL-G")
        if not host_checks(g):
            return _device_weights(g)
        norms = g.diagonal().clamp_min(0.0).sqrt()
        top = norms.max()
        if not bool(top > 0):
            return torch.zeros_like(norms)
        gs = g / (top * top)
        n = norms / top
        v = torch.linalg.pinv(gs, hermitian=True) @ n
        if not bool((gs @ v - n).norm() <= _IN_RANGE * n.norm()):
            # n is not in the range of G: no non-zero combination has equal projections (e.g.
            # opposite gradients); d = 0 is the only update that treats the tasks equally
            return torch.zeros_like(norms)
        total = v.sum()
        if not bool(total.abs() > _ZERO * v.abs().sum()):
            raise SolverError(
                "IMTL-G: the combination with equal projections on every unit gradient has "
                f"weights summing to 0 (v = {v.tolist()}), so the paper's normalisation "
                "Σα = 1 is impossible; nothing was applied. Catch gradbalance.SolverError to "
                "skip this step, or use another method"
            )
        return v / total.abs()


def host_checks(g: Tensor) -> bool:
    """Whether the branches of IMTL-G are taken on the host: on the CPU in eager mode (where a
    read costs nothing); elsewhere `_device_weights` takes them as masks."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    return g.device.type == "cpu" and not (compiling is not None and compiling())


def _device_weights(g: Tensor) -> Tensor:
    """The weights of `IMTLG.weights` without a host read: the same branches as masks, NaN
    where the normalisation is impossible (the balancer then skips the step under
    ``nonfinite="skip"`` or raises `gradbalance.SolverError` for non-finite weights)."""
    norms = g.diagonal().clamp_min(0.0).sqrt()
    top = norms.max()
    positive = top > 0
    top = torch.where(positive, top, torch.ones_like(top))
    gs = g / (top * top)
    n = norms / top
    v = torch.linalg.pinv(gs, hermitian=True) @ n
    in_range = (gs @ v - n).norm() <= _IN_RANGE * n.norm()
    total = v.sum()
    normalisable = total.abs() > _ZERO * v.abs().sum()
    scaled = v / torch.where(normalisable, total.abs(), torch.ones_like(total))
    scaled = torch.where(normalisable, scaled, torch.full_like(scaled, float("nan")))
    return torch.where(positive & in_range, scaled, torch.zeros_like(scaled))
