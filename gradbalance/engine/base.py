"""What every engine shares: the `Request` it answers, the `Engine` protocol, and the one way an
engine says it does not apply (`NotApplicable`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from gradbalance._torch_compat import autograd_grad
from gradbalance.engine.result import TaskGradients

__all__ = [
    "DEFAULT_MEMORY_THRESHOLD",
    "STRATEGIES",
    "Engine",
    "NotApplicable",
    "ParameterEngine",
    "Request",
    "RowsHook",
    "objective_gradients",
]

#: The engine strategies a user can ask for.
STRATEGIES = ("auto", "loop", "batched", "chained", "representation", "memory")

#: Jacobian entries (``K ×`` shared parameters) above which ``engine="auto"`` picks the
#: memory-light path; also the budget of Jacobian entries one group of it may hold at once.
#: ``2**27`` entries are 512 MiB of float32 rows (e.g. ``K = 8`` tasks on 16.7 M parameters).
DEFAULT_MEMORY_THRESHOLD = 2**27

#: Called with rows (one per shared tensor, ``None`` where unreached) and their tensors; returns
#: the rows to use. The balancer averages the rows over ranks here (``distributed="global"``).
RowsHook = Callable[[list[Tensor | None], list[Tensor]], list[Tensor | None]]


def _label(p: Tensor) -> str:
    return f"tensor of shape {tuple(p.shape)}"


class Request(NamedTuple):
    """What a step asks an engine for.

    Attributes:
        losses: ``K`` scalar losses (already multiplied by the AMP scale, if any).
        shared: the tensors whose per-task gradients (Jacobian rows) are needed.
        others: tensors whose gradient is only needed summed over tasks.
        features: the shared representation(s) the heads read (chained and representation
            engines).
        retain_graph: keep the autograd graph after the engine's last backward.
        rows_hook: applied to the rows before anything is computed from them (the distributed
            average); ``None`` for none.
        tasks: the task names, for errors.
        label: how errors name a shared tensor.
    """

    losses: Sequence[Tensor]
    shared: Sequence[Tensor]
    others: Sequence[Tensor] = ()
    features: Sequence[Tensor] = ()
    retain_graph: bool = False
    rows_hook: RowsHook | None = None
    tasks: Sequence[str] = ()
    label: Callable[[Tensor], str] = _label


class NotApplicable(Exception):
    """Raised by `Engine.compute` before computing anything when the engine cannot give the
    exact answer for this request (the chained engine, when a head reads a shared parameter
    other than through the features)."""


class Engine(Protocol):
    """One way of computing the per-task gradients.

    ``compute`` answers a `Request` with a `TaskGradients` (or raises `NotApplicable`);
    ``update`` turns the weights into the gradient of the request's ``shared`` tensors:
    ``Jᵀw`` for the parameter engines, one backward of ``Σ_i w_i L_i`` for the memory-light
    one, ``Jᵀw`` on the features then one backward through the trunk for the representation
    engine. ``direction``, when given, replaces ``Jᵀw``: a method's own combination of the rows
    (engines that hold the Jacobian only).
    """

    name: str

    def compute(self, request: Request) -> TaskGradients: ...

    def update(
        self,
        request: Request,
        result: TaskGradients,
        weights: Tensor,
        direction: list[Tensor | None] | None = None,
    ) -> list[Tensor | None]: ...


class ParameterEngine:
    """The engines whose result is the Jacobian of the request's shared parameters (loop,
    batched, chained): a subclass computes it in `jacobian`; `compute` applies the request's
    rows hook to it and `update` is ``Jᵀw``, or the ``direction`` given instead."""

    name = ""

    def jacobian(self, request: Request) -> TaskGradients:
        """The task Jacobian on ``request.shared`` (before the rows hook)."""
        raise NotImplementedError

    def compute(self, request: Request) -> TaskGradients:
        return hooked(self.jacobian(request), request)

    def update(
        self,
        request: Request,
        result: TaskGradients,
        weights: Tensor,
        direction: list[Tensor | None] | None = None,
    ) -> list[Tensor | None]:
        return result.combine(weights) if direction is None else direction


def hooked(result: TaskGradients, request: Request) -> TaskGradients:
    """``result`` with ``request.rows_hook`` applied to its rows (itself without a hook)."""
    if request.rows_hook is None:
        return result
    return result.with_rows(request.rows_hook(list(result.rows), list(request.shared)))


def as_scalar_stack(losses: Sequence[Tensor]) -> Tensor:
    """The losses as one vector, in a common floating dtype."""
    flat = [loss.reshape(()) for loss in losses]
    dtypes = {t.dtype for t in flat}
    if len(dtypes) > 1:
        common = torch.float32 if all(d.itemsize <= 4 for d in dtypes) else torch.float64
        flat = [t.to(common) for t in flat]
    return torch.stack(flat)


def objective_gradients(
    objective: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
) -> list[Tensor | None]:
    """One ordinary backward of a scalar objective w.r.t. ``params`` (``None`` where unused)."""
    return list(autograd_grad(objective, tuple(params), retain_graph))
