"""Fixed, user-chosen task weights (the hand-tuned baseline)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.errors import OptionError, OptionTypeError
from gradbalance.methods.base import LOSSES, Method, StepInputs
from gradbalance.methods.registry import register

__all__ = ["Fixed"]


@register
class Fixed(Method):
    """Constant weights chosen by the user: the update is the gradient of ``Σ_i c_i L_i``.

    Args:
        weights: one non-negative finite weight per task, as a sequence in task order or as a
            mapping task name -> weight (every task must be named).

    Examples:
        >>> import gradbalance as gb
        >>> gb.methods.get("fixed", weights={"seg": 1.0, "depth": 0.5})
        Fixed(weights={'seg': 1.0, 'depth': 0.5})
    """

    name = "fixed"
    requires = frozenset({LOSSES})
    stateful = False
    scale_invariant = "weights"
    paper = "Baseline (no paper): hand-tuned constant loss weights."

    def __init__(self, weights: Sequence[float] | Mapping[str, float]) -> None:
        super().__init__()
        if isinstance(weights, Mapping):
            values = list(weights.values())
            self._spec: list[float] | dict[str, float] = {
                str(k): float(v) for k, v in weights.items()
            }
        else:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, Tensor)):
                raise OptionTypeError(
                    "weights must be a sequence or a mapping of floats, "
                    f"got {type(weights).__name__}"
                )
            values = [float(v) for v in weights]
            self._spec = values
        if len(values) == 0:
            raise OptionError("weights must not be empty")
        for v in values:
            if not math.isfinite(float(v)) or float(v) < 0:
                raise OptionError(f"weights must be finite and non-negative, got {values}")

    @classmethod
    def example_options(cls, tasks: tuple[str, ...]) -> dict[str, Any]:
        """Placeholder weights (all 1) for tools that sweep over every method."""
        return {"weights": [1.0] * len(tasks)}

    def build(self, tasks: tuple[str, ...]) -> None:
        if isinstance(self._spec, dict):
            missing = [t for t in tasks if t not in self._spec]
            extra = [t for t in self._spec if t not in tasks]
            if missing or extra:
                raise OptionError(
                    f"fixed weights name tasks {list(self._spec)}, but the tasks are "
                    f"{list(tasks)} (missing: {missing}, unknown: {extra})"
                )
        elif len(self._spec) != len(tasks):
            raise OptionError(
                f"fixed weights has {len(self._spec)} entries but there are {len(tasks)} tasks "
                f"{list(tasks)}"
            )

    def weights(self, inputs: StepInputs) -> Tensor:
        if isinstance(self._spec, dict):
            values = [self._spec[t] for t in inputs.tasks]
        else:
            values = self._spec
        return torch.tensor(values, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Fixed(weights={self._spec!r})"
