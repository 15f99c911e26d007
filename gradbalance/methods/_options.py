"""Helpers shared by methods: per-task options, finite numbers, a learnable-group's options."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor

from gradbalance.errors import OptionError

__all__ = ["check_group_options", "finite_float", "group_options", "per_task"]

T = TypeVar("T")


def per_task(
    spec: Any,
    tasks: tuple[str, ...],
    what: str,
    convert: Callable[[Any], T],
) -> list[T]:
    """Resolve a per-task option given as one value, a sequence in task order, or a mapping.

    Args:
        spec: a single value (used for every task), a sequence with one value per task in task
            order, or a mapping task name -> value naming every task.
        tasks: the task names.
        what: the option's name, for error messages.
        convert: validates and converts one value (raises ``ValueError``/``TypeError``).

    Examples:
        >>> per_task({"a": 1, "b": 2}, ("a", "b"), "gamma", float)
        [1.0, 2.0]
    """
    if isinstance(spec, Mapping):
        missing = [t for t in tasks if t not in spec]
        unknown = [str(t) for t in spec if t not in tasks]
        if missing or unknown:
            raise OptionError(
                f"{what} names tasks {[str(t) for t in spec]}, but the tasks are {list(tasks)} "
                f"(missing: {missing}, unknown: {unknown}); give one value per task"
            )
        return [convert(spec[t]) for t in tasks]
    if (
        isinstance(spec, (str, bytes))
        or not isinstance(spec, (Sequence, Tensor))
        or (isinstance(spec, Tensor) and spec.dim() == 0)
    ):
        return [convert(spec)] * len(tasks)
    values = list(spec)
    if len(values) != len(tasks):
        raise OptionError(
            f"{what} has {len(values)} entries but there are {len(tasks)} tasks {list(tasks)}; "
            "give one value per task (or a single value, or a mapping task -> value)"
        )
    return [convert(v) for v in values]


def finite_float(value: Any) -> float:
    """``float(value)``, refusing NaN and infinities (a `per_task` converter)."""
    x = float(value)
    if not math.isfinite(x):
        raise OptionError(f"expected a finite number, got {value!r}")
    return x


def check_group_options(lr: Any, weight_decay: Any) -> tuple[float | None, float]:
    """Validate the ``lr`` (``None``: the inner optimizer's) and ``weight_decay`` of the param
    group that holds a method's learnable parameters; return them as floats."""
    if lr is not None and (not math.isfinite(float(lr)) or float(lr) <= 0):
        raise OptionError(f"lr must be a positive finite number or None, got {lr!r}")
    if not math.isfinite(float(weight_decay)) or float(weight_decay) < 0:
        raise OptionError(f"weight_decay must be non-negative, got {weight_decay!r}")
    return (None if lr is None else float(lr)), float(weight_decay)


def group_options(lr: float | None, weight_decay: float) -> dict[str, Any]:
    """`Method.param_group_options` for a method with its own ``lr`` / ``weight_decay``."""
    options: dict[str, Any] = {"weight_decay": weight_decay}
    if lr is not None:
        options["lr"] = lr
    return options
