"""Dynamic Task Prioritization (Guo et al., ECCV 2018): focal-style weights from smoothed KPIs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.errors import MissingInputError, OptionError
from gradbalance.methods._common import join_repr
from gradbalance.methods._options import per_task
from gradbalance.methods.base import KPIS, LOSSES, Method, StepInputs, as_float64
from gradbalance.methods.registry import register

__all__ = ["DTP"]


def _gamma(value: Any) -> float:
    x = float(value)
    if not math.isfinite(x) or x < 0:
        raise OptionError(f"gamma must be a finite non-negative number, got {value!r}")
    return x


@register
class DTP(Method):
    r"""Dynamic Task Prioritization: give more weight to the tasks with the lower KPI.

    Guo, Haque, Huang, Yeung & Fei-Fei, *Dynamic Task Prioritization for Multitask Learning*,
    ECCV 2018. Each task reports a key performance indicator ``κ_t ∈ [0, 1]`` (accuracy, IoU,
    PCK, ...) at every step, passed as ``backward(losses, kpis={...})``. It is smoothed by an
    exponential moving average and turned into a task-level focal weight:

    $$
    \bar\kappa_t^{(\tau)} = \alpha\,\kappa_t^{(\tau)} + (1-\alpha)\,\bar\kappa_t^{(\tau-1)},
    \qquad
    w_t = \mathrm{FL}(\bar\kappa_t; \gamma_t) = -(1-\bar\kappa_t)^{\gamma_t}\log\bar\kappa_t,
    $$

    and the network minimises ``Σ_t w_t L_t``. The weight decreases with ``κ̄`` (for ``γ ≥ 0``),
    so the hardest task gets the largest weight; ``γ_t`` (per task) focuses it further.

    The weight of step ``τ`` uses the average *including* that step's KPI,
    ``κ̄^(τ)``, as in the paper's ``FL(κ̄^(τ); γ)``; the first KPI initialises the average.
    ``weights`` computes that average without storing it; ``update`` (called only after
    the inner optimizer stepped) stores it, so a skipped or failed step leaves it untouched.

    Deviations from the paper: ``κ̄`` is clamped to ``[eps, 1 − eps]`` (``eps = 1e-6`` by
    default) before the focal weight, so a task with ``κ̄ = 0`` gets a large finite weight
    instead of ``+inf`` and a perfect task a tiny positive one. The paper's *example-level*
    focal loss is not part of this weighting; use ``gb.losses.focal_loss`` for it. The paper
    gives ``α`` and ``γ`` no universal value; the defaults ``α = 0.1`` and ``γ = 1`` are this
    library's.

    Args:
        gamma: the focusing parameter ``γ_t ≥ 0``: one value, a sequence in task order, or a
            mapping task -> value. ``γ = 0`` gives ``−log κ̄``.
        alpha: weight of the newest KPI in the moving average, in ``(0, 1]`` (``1``: no
            smoothing).
        eps: clamp of ``κ̄`` away from 0 and 1, in ``(0, 0.5)``.

    Raises:
        MissingInputError: (from ``GradBalancer.backward``) when ``kpis`` is missing or
            does not name every task.
        MissingInputError: (from ``GradBalancer.backward``, also a ``ValueError``) when a KPI
            is outside ``[0, 1]`` or not finite.
        OptionError: (a ``ValueError``) when ``alpha``, ``eps`` or a ``gamma`` is out of range.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method="dtp",
        ...                       gamma=2.0)
        >>> out = model(torch.randn(8, 3))
        >>> opt.zero_grad()
        >>> w = opt.backward({"cls": out[:, 0].pow(2).mean(), "seg": out[:, 1].pow(2).mean()},
        ...                  kpis={"cls": 0.9, "seg": 0.3})
        >>> bool(w[1] > w[0])  # the task with the lower KPI gets the larger weight
        True
        >>> opt.step()
    """

    name = "dtp"
    requires = frozenset({LOSSES, KPIS})
    stateful = True
    scale_invariant = "weights"
    paper = (
        "M. Guo, A. Haque, D.-A. Huang, S. Yeung, L. Fei-Fei. Dynamic Task Prioritization for "
        "Multitask Learning. ECCV 2018."
    )

    kpi_average: Tensor
    initialized: Tensor

    def __init__(
        self,
        gamma: float | Sequence[float] | Mapping[str, float] = 1.0,
        alpha: float = 0.1,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if isinstance(gamma, (int, float)):
            _gamma(gamma)
        a = float(alpha)
        if not math.isfinite(a) or not 0.0 < a <= 1.0:
            raise OptionError(f"alpha must lie in (0, 1], got {alpha!r}")
        e = float(eps)
        if not math.isfinite(e) or not 0.0 < e < 0.5:
            raise OptionError(f"eps must lie in (0, 0.5), got {eps!r}")
        self._gamma_spec = gamma
        self.alpha = a
        self.eps = e
        self._gammas: list[float] = []

    def build(self, tasks: tuple[str, ...]) -> None:
        gammas = per_task(self._gamma_spec, tuple(tasks), "gamma", _gamma)
        self._gammas = gammas
        self.register_buffer("kpi_average", torch.zeros(len(tasks), dtype=torch.float64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ the weights
    def _smoothed(self, inputs: StepInputs) -> Tensor:
        if not self.is_bound:
            raise RuntimeError("DTP is not bound to tasks yet; call bind(tasks) first")
        if inputs.kpis is None:
            raise MissingInputError(
                "method 'dtp' needs one KPI per task in [0, 1]: call "
                "backward(losses, kpis={task: value, ...})"
            )
        kpis = as_float64(inputs.kpis).to(self.kpi_average.device)
        if kpis.shape != self.kpi_average.shape:
            raise ValueError(
                f"got {tuple(kpis.shape)} KPIs, expected one per task {list(self.tasks or ())}"
            )
        if not bool(self.initialized):
            return kpis
        return self.alpha * kpis + (1.0 - self.alpha) * self.kpi_average

    def focal_weights(self, smoothed_kpis: Tensor) -> Tensor:
        """``−(1 − κ̄)^γ · log κ̄`` per task, with ``κ̄`` clamped to ``[eps, 1 − eps]``.

        Example:
            >>> import gradbalance as gb
            >>> m = gb.methods.DTP(gamma=0.0)
            >>> m.bind(("a",))
            >>> m.focal_weights(torch.tensor([0.5], dtype=torch.float64))
            tensor([0.6931], dtype=torch.float64)
        """
        kappa = as_float64(smoothed_kpis).clamp(self.eps, 1.0 - self.eps)
        gamma = torch.tensor(self._gammas, dtype=torch.float64, device=kappa.device)
        return -((1.0 - kappa) ** gamma) * torch.log(kappa)

    def weights(self, inputs: StepInputs) -> Tensor:
        return self.focal_weights(self._smoothed(inputs))

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        self.kpi_average.copy_(self._smoothed(inputs))
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ read-only views
    @property
    def smoothed_kpis(self) -> Tensor | None:
        """The stored moving average ``κ̄`` (detached copy), or ``None`` before the first step."""
        if not self.is_bound or not bool(self.initialized):
            return None
        return self.kpi_average.clone()

    @property
    def gammas(self) -> list[float]:
        """The per-task focusing parameters once bound."""
        return list(self._gammas)

    def extra_repr(self) -> str:
        parts = [f"gamma={self._gamma_spec!r}", f"alpha={self.alpha}", f"eps={self.eps}"]
        return join_repr(super().extra_repr(), *parts)
