"""IMTL-L (Liu et al., ICLR 2021): learnable loss scales that make every scaled loss equal 1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradbalance.methods._common import join_repr
from gradbalance.methods._options import check_group_options, finite_float, group_options, per_task
from gradbalance.methods.base import LOSSES, Method, StepInputs
from gradbalance.methods.registry import register

__all__ = ["IMTLL"]


@register
class IMTLL(Method):
    r"""IMTL-L: learn one log-scale $s_i$ per task so that every scaled loss tends to 1.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task Learning*,
    ICLR 2021 (the loss-balance half of IMTL). Each task gets a learnable $s_i$ and the model
    and the $s_i$ jointly minimise

    $$
    \mathcal L = \sum_i e^{s_i} L_i - s_i ,
    \qquad
    \frac{\partial \mathcal L}{\partial s_i} = e^{s_i} L_i - 1 ,
    $$

    so for fixed losses $s_i^\star = -\log L_i$ and every scaled loss $e^{s_i} L_i$ is 1: the
    tasks are balanced "impartially", whatever the scale of their losses. The effective loss
    weight is $w_i = e^{s_i}$ (returned, detached, by ``GradBalancer.backward``); the
    regulariser $-\sum_i s_i$ is `extra_loss`.

    The $s_i$ are the method's ``nn.Parameter`` ``log_scales``: ``GradBalancer`` adds them to
    the inner optimizer as their own param group (``weight_decay=0``; ``lr`` gives them a
    learning rate of their own) and they travel in ``state_dict``.

    Deviations from the paper: none in the objective. The paper pairs IMTL-L with IMTL-G (its
    gradient-balance half, a separate method here) in "IMTL"; this class is IMTL-L alone, a
    loss weighting applied to the whole model. The paper learns $s$ with the network's
    optimizer; so do we, in a separate param group without weight decay.

    Args:
        init: the initial $s_i$ (``0.0``: weight 1): one value, a sequence in task order, or a
            mapping task -> value.
        lr: learning rate of the $s$ param group; ``None`` uses the inner optimizer's default.
        weight_decay: weight decay of the $s$ param group (default ``0``).

    Tip:
        Pass ``tasks=[...]`` to ``GradBalancer`` when you also use a learning-rate
        scheduler: the $s$ param group is then created at construction, before the scheduler
        records the param groups (without it, the first ``backward`` raises rather than add a
        group the scheduler does not know).

    Examples:
        >>> import torch, gradbalance as gb
        >>> _ = torch.manual_seed(0)
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> params = [*trunk.parameters(), *heads.parameters()]
        >>> opt = gb.GradBalancer(torch.optim.SGD(params, lr=0.1), method="imtl-l",
        ...                       tasks=["a", "b"])
        >>> out = heads(trunk(torch.randn(16, 4)))
        >>> opt.zero_grad()
        >>> opt.backward({"a": out[:, 0].pow(2).mean(), "b": 100 * out[:, 1].pow(2).mean()})
        tensor([1., 1.])
        >>> opt.step()
        >>> bool(opt.method.log_scales[1] < opt.method.log_scales[0])  # the larger loss shrinks
        True
    """

    name = "imtl-l"
    requires = frozenset({LOSSES})
    paper = (
        "L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang. Towards "
        "Impartial Multi-task Learning. ICLR 2021."
    )
    stateful = True
    scale_invariant = "weights"

    log_scales: nn.Parameter

    def __init__(
        self,
        init: float | Sequence[float] | Mapping[str, float] = 0.0,
        lr: float | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(init, (int, float)):
            finite_float(init)
        self._lr, self._weight_decay = check_group_options(lr, weight_decay)
        self._init_spec = init

    def build(self, tasks: tuple[str, ...]) -> None:
        init = per_task(self._init_spec, tuple(tasks), "init", finite_float)
        self.log_scales = nn.Parameter(torch.tensor(init, dtype=torch.get_default_dtype()))

    def _check_bound(self, inputs: StepInputs) -> None:
        if not self.is_bound:
            raise RuntimeError("IMTLL is not bound to tasks yet; call bind(tasks) first")
        if inputs.num_tasks != self.log_scales.numel():
            raise ValueError(
                f"got {inputs.num_tasks} losses, but the method is bound to "
                f"{self.log_scales.numel()} tasks"
            )

    def weights(self, inputs: StepInputs) -> Tensor:
        """$e^{s_i}$ (float64), differentiable w.r.t. the log-scales $s$."""
        self._check_bound(inputs)
        return torch.exp(self.log_scales.to(torch.float64))

    def extra_loss(self, inputs: StepInputs) -> Tensor:
        """The regulariser $-\\sum_i s_i$ that keeps the scales from collapsing to 0."""
        self._check_bound(inputs)
        return -self.log_scales.sum()

    def param_group_options(self) -> Mapping[str, Any]:
        return group_options(self._lr, self._weight_decay)

    @property
    def scales(self) -> Tensor:
        """The current loss scales $e^{s_i}$ (detached copy), in task order."""
        if not self.is_bound:
            raise RuntimeError("IMTLL is not bound to tasks yet")
        return self.log_scales.detach().exp()

    def extra_repr(self) -> str:
        parts = [f"init={self._init_spec!r}"]
        if self._lr is not None:
            parts.append(f"lr={self._lr}")
        if self._weight_decay:
            parts.append(f"weight_decay={self._weight_decay}")
        return join_repr(super().extra_repr(), *parts)
