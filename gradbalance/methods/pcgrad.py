"""PCGrad (Yu et al., NeurIPS 2020): project each task gradient off the ones it conflicts with."""

from __future__ import annotations

import torch
from torch import Tensor

# SeededOrders stays importable from here (it moved to _common)
from gradbalance.methods._common import SeededOrders, checked_gramian
from gradbalance.methods.base import GRAMIAN, LOSSES, StepInputs
from gradbalance.methods.registry import register

__all__ = ["PCGrad"]


def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    r"""The coefficients ``C`` with ``g_i^{PC} = Σ_k C_{ik} g_k``, from the Gramian only.

    Row ``i`` starts as $e_i$; for each ``j ≠ i`` in the order ``orders[i]``, if
    $\langle g_i^{PC}, g_j\rangle = (C G)_{ij} < 0$, then
    $C_{ij} \mathrel{-}= (CG)_{ij} / G_{jj}$ (the projection of $g_i^{PC}$ onto the normal
    plane of $g_j$). All rows are processed at once (pure tensor code, no host sync).
    """
    k = gramian.shape[-1]
    dev = gramian.device
    coef = torch.eye(k, dtype=gramian.dtype, device=dev)
    rows = torch.arange(k, device=dev)
    orders = orders.to(dev)
    for t in range(k):
        j = orders[:, t]
        dot = (coef * gramian[j]).sum(-1)  # ⟨g_i^PC, g_{j_i}⟩ (G symmetric)
        gjj = gramian[j, j]
        project = (j != rows) & (dot < 0) & (gjj > 0)
        step = torch.where(project, dot / torch.where(gjj > 0, gjj, 1.0), 0.0)
        coef[rows, j] -= step
    return coef


@register
class PCGrad(SeededOrders):
    r"""PCGrad: project each task gradient onto the normal plane of the gradients it conflicts with.

    Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for Multi-Task Learning*,
    NeurIPS 2020, Algorithm 1. For every task $i$, starting from $g_i^{PC} = g_i$ and visiting
    the other tasks $j$ in a random order,

    $$
    \text{if } \langle g_i^{PC}, g_j\rangle < 0:\quad
    g_i^{PC} \leftarrow g_i^{PC} - \frac{\langle g_i^{PC}, g_j\rangle}{\lVert g_j\rVert^2}\, g_j ,
    $$

    and the shared parameters move along $\sum_i g_i^{PC}$. Every $g_i^{PC}$ is a linear
    combination $\sum_k C_{ik} g_k$ whose inner products are read from the Gramian
    ($\langle g_i^{PC}, g_j\rangle = (CG)_{ij}$), so the update is $J^\top w$ with
    $w = C^\top \mathbf 1$, computed exactly from $G$ without touching the gradients.

    Scale: the weights do not change when every gradient is multiplied by the same $c > 0$
    (the update is multiplied by $c$). With two tasks the update has a non-negative inner
    product with both gradients; with more tasks there is no such guarantee.

    Randomness: the orders come from the method's own `torch.Generator`, seeded with
    ``seed`` (default: ``torch.initial_seed()``, so ``torch.manual_seed`` makes runs
    reproducible) and saved in the method's ``state_dict``: a resumed run draws the same orders.
    A new set of orders is drawn per applied step (one permutation per task), as in the paper.

    Deviations from the paper: none in the formula (the sum, not the mean, of the projected
    gradients, as Algorithm 1). The projection is skipped for a zero gradient $g_j$ (the paper
    would divide by zero). As in every gradient method of this library, task-specific
    parameters receive their own task's gradient; the projection acts on the shared parameters
    (the official code projects the gradients of all parameters at once). With gradient
    accumulation, the micro-batches of one step use the same orders.

    Args:
        seed: seed of the method's generator of task orders.

    Examples:
        >>> import torch, gradbalance as gb
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> m = gb.methods.get("pcgrad")
        >>> m.bind(("a", "b"))
        >>> w = m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=J @ J.T))
        >>> w  # g1^PC = g1 + g2/2 and g2^PC = g2 + g1
        tensor([2.0000, 1.5000], dtype=torch.float64)
        >>> w @ J  # (0.5, 0.5) + (0, 1): the sum of the projected gradients
        tensor([0.5000, 1.5000], dtype=torch.float64)
    """

    name = "pcgrad"
    requires = frozenset({LOSSES, GRAMIAN})
    paper = (
        "T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn. Gradient Surgery for "
        "Multi-Task Learning. NeurIPS 2020."
    )
    stateful = True
    stochastic = True
    scale_invariant = "weights"
    non_conflicting = False

    def weights(self, inputs: StepInputs) -> Tensor:
        g = checked_gramian(inputs, "PCGrad")
        coef = pcgrad_coefficients(g, self.orders(inputs.num_tasks))
        return coef.sum(0)

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        self.orders(inputs.num_tasks, commit=True)  # advance the generator past this step
