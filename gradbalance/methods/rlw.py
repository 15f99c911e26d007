"""Random Loss Weighting (Lin et al., TMLR 2022): fresh random loss weights at every step."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gradbalance.errors import OptionError
from gradbalance.methods._common import Seeded, join_repr, step_rng
from gradbalance.methods.base import LOSSES, StepInputs
from gradbalance.methods.registry import register

__all__ = ["RLW"]

_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


@register
class RLW(Seeded):
    r"""Random Loss Weighting: sample new loss weights from a fixed distribution at every step.

    Lin, Ye, Zhang & Tsang, *Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning*, TMLR 2022 (arXiv:2111.10603). At every step the weights are

    $$
    \lambda = \operatorname{softmax}(\tilde\lambda), \qquad \tilde\lambda \sim p(\tilde\lambda),
    $$

    with $p$ a standard normal (``"normal"``, the paper's main choice) or $\mathcal U(0, 1)^K$
    (``"uniform"``); ``"dirichlet"`` samples $\lambda \sim \operatorname{Dir}(\alpha \mathbf 1)$
    directly. The network minimises $\sum_i \lambda_i L_i$: the weights are a distribution
    (non-negative, summing to 1) and do not depend on the losses.

    Randomness: the weights of step $t$ (``StepInputs.step``, the balancer's count of applied
    steps) are drawn from a stream seeded by ``(seed, t)``, so `weights` has no side effects,
    a skipped step is retried with the same weights, micro-batches accumulated into one step
    share their weights (as one large batch would), and a checkpoint resumes the same sequence.
    ``seed`` (drawn from torch's global generator when ``None``) travels in the method's
    ``state_dict``.
    Under `torch.distributed`, pass the same ``seed`` on every rank (``None`` is the same on
    every rank only if torch was seeded identically on each).

    Deviations from the paper: none for ``"normal"`` and ``"uniform"``. The paper's Bernoulli
    variants are not offered. LibMTL applies a softmax to its Dirichlet samples too; here a
    Dirichlet sample is used as it is (it already lies on the simplex).

    Args:
        distribution: ``"normal"`` (default), ``"uniform"`` or ``"dirichlet"``.
        concentration: the Dirichlet concentration $\alpha > 0$ (only for ``"dirichlet"``;
            ``1`` is uniform on the simplex).
        seed: a non-negative int, or ``None`` to draw one from torch's global generator.

    Examples:
        >>> import torch, gradbalance as gb
        >>> m = gb.methods.get("rlw", seed=0)
        >>> m.bind(("a", "b", "c"))
        >>> w = m.weights(gb.methods.StepInputs(("a", "b", "c"), torch.ones(3), step=5))
        >>> round(float(w.sum()), 6), bool((w > 0).all())
        (1.0, True)
        >>> torch.equal(w, m.weights(gb.methods.StepInputs(("a", "b", "c"), torch.ones(3), step=5)))
        True
    """

    name = "rlw"
    requires = frozenset({LOSSES})
    paper = (
        "B. Lin, F. Ye, Y. Zhang, I. W. Tsang. Reasonable Effectiveness of Random Weighting: "
        "A Litmus Test for Multi-Task Learning. TMLR 2022."
    )
    stateful = True
    stochastic = True
    scale_invariant = "weights"

    def __init__(
        self,
        distribution: str = "normal",
        concentration: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if not isinstance(distribution, str) or distribution.lower() not in _DISTRIBUTIONS:
            raise OptionError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        alpha = float(concentration)
        if not math.isfinite(alpha) or alpha <= 0:
            raise OptionError(
                f"concentration must be a positive finite number, got {concentration!r}"
            )
        super().__init__(seed)
        self.distribution = distribution.lower()
        self.concentration = alpha

    def sample(self, num_tasks: int, step: int) -> Tensor:
        """The weights of step ``step`` for ``num_tasks`` tasks (float64, summing to 1)."""
        rng = step_rng(self.seed, step)
        if self.distribution == "dirichlet":
            return torch.from_numpy(rng.dirichlet(np.full(num_tasks, self.concentration)))
        if self.distribution == "normal":
            logits = rng.standard_normal(num_tasks)
        else:
            logits = rng.random(num_tasks)
        return torch.softmax(torch.from_numpy(logits), dim=0)

    def weights(self, inputs: StepInputs) -> Tensor:
        return self.sample(inputs.num_tasks, inputs.step)

    def extra_repr(self) -> str:
        parts = [f"distribution={self.distribution!r}"]
        if self.distribution == "dirichlet":
            parts.append(f"concentration={self.concentration}")
        parts.append(f"seed={self.seed}")
        return join_repr(super().extra_repr(), *parts)
