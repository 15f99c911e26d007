"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): learned homoscedastic log-variances.

Each task ``i`` gets a learnable log-variance ``s_i = log σ_i²`` and the model minimises

* ``½·exp(−s_i)·L_i + ½·s_i`` for a regression task (Gaussian likelihood),
* ``exp(−s_i)·L_i + ½·s_i`` for a classification task (scaled-softmax likelihood),

summed over tasks. The effective loss weight of task ``i`` is ``c_i·exp(−s_i)`` with
``c_i = ½`` (regression) or ``1`` (classification).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from gradbalance.errors import OptionError
from gradbalance.methods._common import join_repr
from gradbalance.methods._options import check_group_options, finite_float, group_options, per_task
from gradbalance.methods.base import LOSSES, Method, StepInputs
from gradbalance.methods.registry import register

__all__ = ["Uncertainty"]

_TASK_TYPES = {"regression": 0.5, "classification": 1.0}

T = TypeVar("T")


def _task_type(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in _TASK_TYPES:
        raise OptionError(f"task type must be one of {sorted(_TASK_TYPES)}, got {value!r}")
    return value.lower()


@register
class Uncertainty(Method):
    r"""Uncertainty weighting: learn one log-variance ``s_i`` per task and weight by it.

    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics*, CVPR 2018. The joint objective is

    $$
    \mathcal{L} = \sum_i c_i\, e^{-s_i} L_i + \tfrac12 s_i, \qquad
    c_i = \tfrac12 \text{ (regression)},\quad c_i = 1 \text{ (classification)},
    $$

    with ``s_i = log σ_i²`` learned jointly with the network (the paper's ``1/(2σ²)·L + log σ``
    and ``1/σ²·L + log σ``, written in ``s`` for numerical stability, as the paper recommends).
    For a regression task the minimum over ``s_i`` is at ``s_i* = log L_i``: with a mean squared
    error and Gaussian noise of variance ``σ²``, ``s_i`` tends to ``log σ²`` (the log *variance*,
    twice the log of the noise standard deviation). For the classification form the minimum is
    at ``s_i* = log(2·L_i)``.

    The ``s_i`` are one ``torch.nn.Parameter`` of the method (``log_vars``):
    ``GradBalancer`` adds it to the inner optimizer as its own param group
    (``weight_decay=0`` by default, a learning rate of its own if ``lr`` is given) and it
    travels in ``state_dict``. The weights, ``c_i·exp(−s_i)``, require grad so the balancer's
    backward reaches ``s``; ``GradBalancer.backward`` returns them detached.

    Deviations from the paper: none in the objective. The classification form is the paper's
    approximation of a temperature-scaled softmax likelihood; it is applied to whatever loss
    the user passes for that task.

    Args:
        task_types: ``"regression"`` or ``"classification"``: one for every task, a sequence in
            task order, or a mapping task -> type.
        init: the initial ``s_i`` (``0.0``, i.e. ``σ² = 1``): one value, a sequence or a
            mapping.
        lr: learning rate of the ``s`` param group; ``None`` uses the inner optimizer's
            default.
        weight_decay: weight decay of the ``s`` param group (default ``0``: decaying ``s``
            towards 0 would bias the learned variances towards 1).

    Tip:
        Pass ``tasks=[...]`` to ``GradBalancer`` when you also use a learning-rate
        scheduler: the ``s`` param group is then created at construction, before the scheduler
        records the param groups, instead of at the first ``backward`` (which raises when a
        scheduler already recorded them).

    Examples:
        >>> import torch, gradbalance as gb
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> params = [*trunk.parameters(), *heads.parameters()]
        >>> opt = gb.GradBalancer(
        ...     torch.optim.Adam(params, lr=1e-2), method="uncertainty",
        ...     task_types={"depth": "regression", "seg": "classification"},
        ...     tasks=["depth", "seg"])
        >>> out = heads(trunk(torch.randn(16, 4)))
        >>> opt.zero_grad()
        >>> opt.backward({"depth": out[:, 0].pow(2).mean(), "seg": out[:, 1].abs().mean()})
        tensor([0.5000, 1.0000])
        >>> opt.step()
        >>> opt.method.log_variances.shape
        torch.Size([2])
    """

    name = "uncertainty"
    requires = frozenset({LOSSES})
    stateful = True
    scale_invariant = "weights"
    paper = (
        "A. Kendall, Y. Gal, R. Cipolla. Multi-Task Learning Using Uncertainty to Weigh Losses "
        "for Scene Geometry and Semantics. CVPR 2018."
    )

    log_vars: nn.Parameter

    def __init__(
        self,
        task_types: str | Sequence[str] | Mapping[str, str] = "regression",
        init: float | Sequence[float] | Mapping[str, float] = 0.0,
        lr: float | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(task_types, str):
            _task_type(task_types)
        if isinstance(init, (int, float)):
            finite_float(init)
        self._lr, self._weight_decay = check_group_options(lr, weight_decay)
        self._task_types_spec = task_types
        self._init_spec = init
        self._types: list[str] = []

    # ------------------------------------------------------------------ life cycle
    def build(self, tasks: tuple[str, ...]) -> None:
        types = per_task(self._task_types_spec, tuple(tasks), "task_types", _task_type)
        init = per_task(self._init_spec, tuple(tasks), "init", finite_float)
        self._types = types
        self.log_vars = nn.Parameter(torch.tensor(init, dtype=torch.get_default_dtype()))
        # derived from the task types (not state): built here, moved by .to()
        coefficients = torch.tensor([_TASK_TYPES[t] for t in types], dtype=torch.float64)
        self.register_buffer("_coefficient_buffer", coefficients, persistent=False)

    _coefficient_buffer: Tensor

    def _coefficients(self) -> Tensor:
        return self._coefficient_buffer.to(self.log_vars.device)

    def _check_bound(self, inputs: StepInputs) -> None:
        if not self.is_bound:
            raise RuntimeError("Uncertainty is not bound to tasks yet; call bind(tasks) first")
        if inputs.num_tasks != len(self._types):
            raise ValueError(
                f"got {inputs.num_tasks} losses, but the method is bound to {len(self._types)} "
                "tasks"
            )

    def weights(self, inputs: StepInputs) -> Tensor:
        """``c_i·exp(−s_i)`` (float64), differentiable w.r.t. the log-variances ``s``."""
        self._check_bound(inputs)
        return self._coefficients() * torch.exp(-self.log_vars.to(torch.float64))

    def extra_loss(self, inputs: StepInputs) -> Tensor:
        """The regulariser ``½·Σ_i s_i`` that keeps the variances from growing without bound."""
        self._check_bound(inputs)
        return 0.5 * self.log_vars.sum()

    def param_group_options(self) -> Mapping[str, Any]:
        return group_options(self._lr, self._weight_decay)

    # ------------------------------------------------------------------ read-only views
    @property
    def log_variances(self) -> Tensor:
        """The current ``s_i = log σ_i²`` (detached copy), in task order."""
        if not self.is_bound:
            raise RuntimeError("Uncertainty is not bound to tasks yet")
        return self.log_vars.detach().clone()

    @property
    def task_types(self) -> list[str]:
        """The per-task types (``"regression"``/``"classification"``) once bound."""
        return list(self._types)

    def extra_repr(self) -> str:
        parts = [f"task_types={self._task_types_spec!r}", f"init={self._init_spec!r}"]
        if self._lr is not None:
            parts.append(f"lr={self._lr}")
        if self._weight_decay:
            parts.append(f"weight_decay={self._weight_decay}")
        return join_repr(super().extra_repr(), *parts)
