"""GradVac (Wang et al., ICLR 2021): steer task gradients towards their usual similarity."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradbalance.errors import OptionError
from gradbalance.methods._common import SeededOrders, checked_gramian, join_repr
from gradbalance.methods.base import GRAMIAN, LOSSES, StepInputs
from gradbalance.methods.registry import register

__all__ = ["GradVac"]


def gradvac_coefficients(
    gramian: Tensor, orders: Tensor, targets: Tensor, beta: float, eps: float = 0.0
) -> tuple[Tensor, Tensor]:
    r"""GradVac's coefficients ``C`` (``g_i^{PC} = Σ_k C_{ik} g_k``) and the updated targets.

    For each task ``i`` (all at once) and each ``j ≠ i`` in the order ``orders[i]``:
    $\varphi = \langle g_i^{PC}, g_j\rangle / (\lVert g_i^{PC}\rVert \lVert g_j\rVert + \epsilon)$
    with $\lVert g_i^{PC}\rVert^2 = (C G C^\top)_{ii}$ and $\langle g_i^{PC}, g_j\rangle =
    (CG)_{ij}$; if $\varphi < \hat\varphi_{ij}$,
    $C_{ij} \mathrel{+}= \lVert g_i^{PC}\rVert (\hat\varphi \sqrt{1-\varphi^2} - \varphi
    \sqrt{1-\hat\varphi^2}) / (\lVert g_j\rVert \sqrt{1-\hat\varphi^2} + \epsilon)$; then
    $\hat\varphi_{ij} \leftarrow (1-\beta)\hat\varphi_{ij} + \beta\varphi$. Pairs with a zero
    gradient (undefined cosine) are skipped and keep their target; so is a ``g_i^{PC}`` whose
    squared norm is within rounding of zero (below ``16 K ε`` times the sum of the magnitudes
    that make it up), which keeps cancelled vectors from steering by rounding noise. Pure tensor
    code.
    """
    k = gramian.shape[-1]
    dev, dt = gramian.device, gramian.dtype
    coef = torch.eye(k, dtype=dt, device=dev)
    new_targets = targets.to(device=dev, dtype=dt).clone()
    rows = torch.arange(k, device=dev)
    orders = orders.to(dev)
    norms = gramian.diagonal().clamp_min(0.0).sqrt()
    abs_gramian = gramian.abs()
    # ‖g_i^PC‖² = (C G Cᵀ)_ii is a sum of terms as large as (|C| |G| |C|ᵀ)_ii; when g_i^PC has
    # cancelled (a projection removed it), rounding leaves ~√ε of that as a spurious norm and a
    # random direction. Below this floor the vector counts as zero, like a zero gradient.
    floor_scale = 16.0 * k * torch.finfo(dt).eps
    for t in range(k):
        j = orders[:, t]
        cg = coef @ gramian  # row i: ⟨g_i^PC, g_k⟩ for every k
        dot = cg[rows, j]
        sq = (cg * coef).sum(-1)
        floor = floor_scale * ((coef.abs() @ abs_gramian) * coef.abs()).sum(-1)
        ni = torch.where(sq > floor, sq, 0.0).sqrt()
        nj = norms[j]
        den = ni * nj + eps
        ok = (j != rows) & (ni > 0) & (nj > 0)
        phi = torch.where(ok, dot / torch.where(den > 0, den, 1.0), 0.0).clamp(-1.0, 1.0)
        target = new_targets[rows, j]
        s_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
        s_tgt = (1.0 - target * target).clamp_min(0.0).sqrt()
        den_w = nj * s_tgt + eps
        fix = ok & (phi < target) & (den_w > 0)
        w = torch.where(
            fix, ni * (target * s_phi - phi * s_tgt) / torch.where(den_w > 0, den_w, 1.0), 0.0
        )
        coef[rows, j] += w
        new_targets[rows, j] = torch.where(ok, (1.0 - beta) * target + beta * phi, target)
    return coef, new_targets


@register
class GradVac(SeededOrders):
    r"""Gradient Vaccine: raise each pair's gradient similarity to its moving-average target.

    Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models*, ICLR 2021, Algorithm 1. Each ordered pair
    of tasks $(i, j)$ keeps a target similarity $\hat\varphi_{ij}$ (initially 0), an
    exponential moving average of the observed cosine similarities. For each task $i$,
    starting from $g_i^{PC} = g_i$ and visiting the other tasks $j$ in random order:

    $$
    \varphi_{ij} = \frac{\langle g_i^{PC}, g_j\rangle}{\lVert g_i^{PC}\rVert\,\lVert g_j\rVert},
    \qquad
    \text{if } \varphi_{ij} < \hat\varphi_{ij}:\;
    g_i^{PC} \leftarrow g_i^{PC} + \frac{\lVert g_i^{PC}\rVert\,\bigl(\hat\varphi_{ij}
    \sqrt{1-\varphi_{ij}^2} - \varphi_{ij}\sqrt{1-\hat\varphi_{ij}^2}\bigr)}
    {\lVert g_j\rVert \sqrt{1-\hat\varphi_{ij}^2}}\; g_j ,
    $$

    $$
    \hat\varphi_{ij} \leftarrow (1-\beta)\,\hat\varphi_{ij} + \beta\,\varphi_{ij},
    $$

    and the shared parameters move along $\sum_i g_i^{PC}$. The correction makes the cosine
    between $g_i^{PC}$ and $g_j$ equal to the target. Every $g_i^{PC}$ is a linear combination
    of the $g_k$, so cosines and norms come from the Gramian and the update is $J^\top w$.
    With all targets 0 the correction is exactly PCGrad's projection.

    State: the targets $\hat\varphi$ (buffer ``targets``, ``(K, K)``) and the generator of the
    task orders (as `PCGrad`) are in the method's ``state_dict``; they change only in
    `update`, after the inner optimizer stepped, so a skipped step leaves them untouched.

    Scale: the weights do not change when every gradient is multiplied by the same $c > 0$
    (with ``eps = 0``, the default).

    Deviations from the paper: one target per pair for the whole shared parameter vector (the
    paper also studies finer granularities with separate targets per layer; not provided).
    The EMA update applies to every visited pair, as in Algorithm 1 (LibMTL updates it only
    when a correction was made); it uses $\varphi_{ij}$ measured before the correction.
    Pairs with a zero gradient are skipped (undefined cosine), and so are pairs whose
    $g_i^{PC}$ cancelled to within rounding of zero (see `gradvac_coefficients`). ``eps``
    (default 0) is added to the denominators if given. Task-specific parameters get their own
    task's gradient.

    Args:
        beta: the EMA rate $\beta \in [0, 1]$ of the targets (LibMTL's and TorchJD's default
            0.5; the paper treats it as a hyperparameter).
        eps: a non-negative constant added to the denominators.
        seed: seed of the generator of task orders (default ``torch.initial_seed()``).

    Examples:
        >>> import torch, gradbalance as gb
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> m = gb.methods.get("gradvac", beta=0.5)
        >>> m.bind(("a", "b"))
        >>> inputs = gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=J @ J.T)
        >>> w = m.weights(inputs)  # targets are 0: the first step is PCGrad's
        >>> w
        tensor([2.0000, 1.5000], dtype=torch.float64)
        >>> m.update(inputs, w)
        >>> m.targets  # half of the observed cosine -1/√2
        tensor([[ 0.0000, -0.3536],
                [-0.3536,  0.0000]], dtype=torch.float64)
    """

    name = "gradvac"
    requires = frozenset({LOSSES, GRAMIAN})
    paper = (
        "Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao. Gradient Vaccine: Investigating and Improving "
        "Multi-task Optimization in Massively Multilingual Models. ICLR 2021."
    )
    stateful = True
    stochastic = True
    scale_invariant = "weights"
    non_conflicting = False

    targets: Tensor

    def __init__(self, beta: float = 0.5, eps: float = 0.0, seed: int | None = None) -> None:
        super().__init__(seed)
        b = float(beta)
        if not (0.0 <= b <= 1.0):
            raise OptionError(f"beta must lie in [0, 1], got {beta!r}")
        e = float(eps)
        if not math.isfinite(e) or e < 0:
            raise OptionError(f"eps must be a finite non-negative number, got {eps!r}")
        self.beta = b
        self.eps = e

    def build(self, tasks: tuple[str, ...]) -> None:
        k = len(tasks)
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))

    def _compute(self, inputs: StepInputs, commit: bool) -> tuple[Tensor, Tensor]:
        if not self.is_bound:
            raise RuntimeError("GradVac is not bound to tasks yet; call bind(tasks) first")
        g = checked_gramian(inputs, "GradVac")
        orders = self.orders(inputs.num_tasks, commit=commit)
        return gradvac_coefficients(g, orders, self.targets, self.beta, self.eps)

    def weights(self, inputs: StepInputs) -> Tensor:
        coef, _ = self._compute(inputs, commit=False)
        return coef.sum(0)

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        _, targets = self._compute(inputs, commit=True)
        self.targets.copy_(targets)

    def extra_repr(self) -> str:
        return join_repr(super().extra_repr(), f"beta={self.beta}", f"eps={self.eps}")
