"""GradDrop (Chen et al., NeurIPS 2020): keep one gradient sign per coordinate, at random."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.errors import OptionError, OptionTypeError
from gradbalance.methods._common import Seeded, join_repr, step_torch_seed
from gradbalance.methods._options import per_task
from gradbalance.methods.base import GRAMIAN, JACOBIAN, LOSSES, StepInputs
from gradbalance.methods.registry import register

__all__ = ["GradDrop"]


def _leak(value: Any) -> float:
    x = float(value)
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise OptionError(f"leak must lie in [0, 1], got {value!r}")
    return x


@register
class GradDrop(Seeded):
    r"""Gradient Sign Dropout: at every coordinate keep only the positive or the negative parts.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout*, NeurIPS 2020 (Algorithm 1). With
    $g_i$ the gradient of task $i$, GradDrop computes, coordinate by coordinate, the *gradient
    positive sign purity*

    $$
    P = \tfrac12 \Bigl(1 + \frac{\sum_i g_i}{\sum_i |g_i|}\Bigr) \in [0, 1],
    $$

    draws $U \sim \mathcal U[0, 1)$ (one number per coordinate, shared by the tasks), keeps
    every positive $g_i$ where $U < P$ and every negative one elsewhere,

    $$
    M_i = \mathbb 1[U < P]\,\mathbb 1[g_i > 0] + \mathbb 1[U \ge P]\,\mathbb 1[g_i < 0],
    \qquad
    d = \sum_i \bigl(\ell_i + (1 - \ell_i) M_i\bigr) \odot g_i ,
    $$

    with leak $\ell_i \in [0, 1]$ ($\ell = 0$: pure GradDrop, $\ell = 1$: the plain sum).
    Where every task agrees in sign, $P \in \{0, 1\}$ and $d$ is the plain sum; where they
    conflict, a sign is kept with the probability of its share of the total magnitude.

    GradDrop is not a weighting of whole task gradients, so it reads the Jacobian
    (``JACOBIAN``) and builds the update in `combine`; `weights` returns ones (the
    weights of the plain sum that GradDrop masks). Task-specific parameters get their own task's
    gradient as with every gradient method. Cost: the ``K`` per-task gradients of the shared
    parameters are held at once (as for any Gramian method), plus one random number per
    shared coordinate.

    Randomness: $U$ of step $t$ is drawn from a ``torch.Generator`` on the gradients' device
    seeded by ``(seed, t)`` (``StepInputs.step``), so `combine` has no side effects, a
    skipped step is retried with the same $U$, micro-batches accumulated into one step share
    it (as one large batch would), and a checkpoint resumes the same sequence. ``seed`` travels
    in the method's ``state_dict``.
    Under `torch.distributed`, pass the same ``seed`` on every rank (``None`` is the same on
    every rank only if torch was seeded identically on each).

    **Where to apply it.** The paper applies GradDrop to the gradients w.r.t. a layer's
    *activations* (usually the last shared layer) and sums them over the batch before computing
    $P$. On the default path this class applies it to the gradients w.r.t. the shared
    *parameters*, coordinate by coordinate. For the paper's placement, pass the shared
    activations ``features=z`` to ``backward`` with ``engine="representation"`` and
    ``sum_batch=True``: $P$ and $M$ are then computed from the gradients summed over the first
    (batch) dimension and shared by every sample.

    Deviations from the paper: on the parameter path (default) GradDrop acts on parameter
    gradients, not activation gradients. The paper multiplies the activation gradients by
    $\operatorname{sgn}(A)$ of the activations before computing $P$; the activations are
    not available to a method, so that factor is omitted (it is 1 wherever $A > 0$, e.g.
    after a ReLU). The paper's optional monotone map $f(P)$ is the identity (the paper's
    choice). The tie $U = P$ (probability 0) keeps the negative sign.

    Args:
        leak: $\ell_i \in [0, 1]$: one value, a sequence in task order, or a mapping
            task -> value.
        sum_batch: compute $P$ and the masks from the gradients summed over their first
            dimension after the task dimension (the batch of ``features=``), as in the paper.
            Leave ``False`` on the parameter path.
        seed: a non-negative int, or ``None`` to draw one from torch's global generator.

    Examples:
        >>> import torch, gradbalance as gb
        >>> m = GradDrop(seed=0)
        >>> m.bind(("a", "b"))
        >>> J = torch.tensor([[1.0, -2.0, 3.0], [2.0, -1.0, -1.0]])
        >>> inputs = gb.methods.StepInputs(("a", "b"), torch.ones(2), jacobian=(J,))
        >>> d = m.combine(inputs, m.weights(inputs))[0]
        >>> d[:2]  # the tasks agree in sign there: the plain sum
        tensor([ 3., -3.])
        >>> bool(d[2] == 3.0 or d[2] == -1.0)  # they conflict: one sign survives
        True
    """

    name = "graddrop"
    requires = frozenset({LOSSES, GRAMIAN, JACOBIAN})
    paper = (
        "Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov. Just Pick a "
        "Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout. NeurIPS 2020."
    )
    stateful = True
    stochastic = True
    scale_invariant = "weights"

    def __init__(
        self,
        leak: float | Sequence[float] | Mapping[str, float] = 0.0,
        sum_batch: bool = False,
        seed: int | None = None,
    ) -> None:
        if isinstance(leak, (int, float)):
            _leak(leak)
        if not isinstance(sum_batch, bool):
            raise OptionTypeError(f"sum_batch must be a bool, got {type(sum_batch).__name__}")
        super().__init__(seed)
        self._leak_spec = leak
        self._leaks: list[float] = []
        self.sum_batch = sum_batch

    def build(self, tasks: tuple[str, ...]) -> None:
        leaks = per_task(self._leak_spec, tuple(tasks), "leak", _leak)
        self._leaks = leaks

    def weights(self, inputs: StepInputs) -> Tensor:
        return torch.ones(inputs.num_tasks, dtype=torch.float64)

    def masks(self, inputs: StepInputs) -> list[Tensor | None]:
        """The keep masks $M$ (``bool``, one ``(K, ...)`` tensor per Jacobian entry), pure.

        With ``sum_batch`` the masks have the batch dimension reduced to size 1.
        """
        if not self.is_bound:
            raise RuntimeError("GradDrop is not bound to tasks yet; call bind(tasks) first")
        if inputs.jacobian is None:
            raise ValueError(
                "GradDrop reads the task gradients (StepInputs.jacobian); use it through "
                "GradBalancer with shared=... (or features=...)"
            )
        generators: dict[torch.device, torch.Generator] = {}
        seed = step_torch_seed(self.seed, inputs.step)
        out: list[Tensor | None] = []
        for i, row in enumerate(inputs.jacobian):
            if row is None:
                out.append(None)
                continue
            if row.shape[0] != inputs.num_tasks:
                raise ValueError(
                    f"Jacobian entry {i} has {row.shape[0]} rows, expected one per task "
                    f"({inputs.num_tasks})"
                )
            g = row.detach()
            if g.dtype in (torch.float16, torch.bfloat16):
                g = g.float()
            if self.sum_batch:
                if g.dim() < 2:
                    raise ValueError(
                        f"sum_batch=True needs a batch dimension, but Jacobian entry {i} has "
                        f"shape {tuple(row.shape)} (one value per task)"
                    )
                g = g.sum(dim=1, keepdim=True)
            total = g.sum(dim=0)
            magnitude = g.abs().sum(dim=0)
            tiny = torch.finfo(magnitude.dtype).tiny
            ratio = torch.where(magnitude > 0, total / magnitude.clamp_min(tiny), 0.0)
            purity = 0.5 * (1.0 + ratio)
            gen = generators.get(g.device)
            if gen is None:
                gen = torch.Generator(device=g.device)
                gen.manual_seed(seed)
                generators[g.device] = gen
            u = torch.rand(purity.shape, generator=gen, device=g.device, dtype=purity.dtype)
            keep_positive = u < purity
            out.append(((g > 0) & keep_positive) | ((g < 0) & ~keep_positive))
        return out

    def combine(self, inputs: StepInputs, weights: Tensor) -> list[Tensor | None]:
        masks = self.masks(inputs)
        assert inputs.jacobian is not None
        out: list[Tensor | None] = []
        for row, mask in zip(inputs.jacobian, masks):
            if row is None or mask is None:
                out.append(None)
                continue
            leak = torch.tensor(self._leaks, dtype=row.dtype, device=row.device)
            leak = leak.reshape((-1,) + (1,) * (row.dim() - 1))
            factor = leak + (1.0 - leak) * mask.to(row.dtype)
            out.append((factor * row).sum(dim=0))
        return out

    def extra_repr(self) -> str:
        parts = [f"leak={self._leak_spec!r}"]
        if self.sum_batch:
            parts.append("sum_batch=True")
        parts.append(f"seed={self.seed}")
        return join_repr(super().extra_repr(), *parts)
