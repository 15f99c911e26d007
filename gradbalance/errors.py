"""Exceptions raised by gradbalance.

Every error a user can trigger through bad input derives from `GradBalanceError`, so a
training loop can catch them all with one ``except``. Each is raised *before* any ``.grad``,
parameter, optimizer state or method state is modified.
"""

from __future__ import annotations

__all__ = [
    "GradBalanceError",
    "LossError",
    "MissingInputError",
    "NonFiniteError",
    "OptionError",
    "OptionTypeError",
    "SolverError",
    "TaskMismatchError",
    "UnreachedParameterError",
]


class GradBalanceError(RuntimeError):
    """Base class of every error raised by gradbalance on bad input or failed numerics."""


class TaskMismatchError(GradBalanceError, ValueError):
    """The losses passed do not match the tasks the balancer was set up with."""


class LossError(GradBalanceError, ValueError):
    """A loss is not a scalar, is detached from the graph, or otherwise cannot be differentiated."""


class UnreachedParameterError(GradBalanceError):
    """A shared parameter is not reached by any task loss (its gradient would be undefined)."""


class NonFiniteError(GradBalanceError, FloatingPointError):
    """A loss or gradient of a task is NaN or infinite."""


class MissingInputError(GradBalanceError, ValueError):
    """A method needs an input (features, KPIs, ...) that ``backward`` did not receive, or
    received in a form it cannot use (e.g. a KPI outside ``[0, 1]``)."""


class OptionError(GradBalanceError, ValueError):
    """An option of a method is invalid: out of range, or naming other tasks than the given ones."""


class OptionTypeError(OptionError, TypeError):
    """An option of a method has the wrong type (also a `TypeError`)."""


class SolverError(GradBalanceError, ArithmeticError):
    """A numerical solver failed; raised instead of silently falling back to other weights."""
