"""What one step carries through the pipeline: `StepContext` (the validated inputs of a
`backward` call) and `Update` (the gradients stage 4 produced, to be written)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from gradbalance.distributed import Synchronizer

__all__ = ["StepContext", "Update"]


class StepContext(NamedTuple):
    """One `backward` call's validated inputs.

    Attributes:
        tasks: the task names, in the balancer's order.
        losses: the losses in that order (unscaled).
        call_order: for each loss of the call, its index in ``tasks`` order.
        kpis: the KPIs (DTP) or ``None``.
        features: the features passed to `backward` that the engine uses (may be empty).
        scale: the GradScaler's scale, or ``None``.
        retain_graph: keep the graph after the step's last backward.
        sync: the synchroniser, or ``None`` without a process group.
        bound: the tasks were bound before this call (not its first step).
    """

    tasks: tuple[str, ...]
    losses: list[Tensor]
    call_order: list[int]
    kpis: Tensor | None
    features: list[Tensor]
    scale: Tensor | None
    retain_graph: bool
    sync: Synchronizer | None
    bound: bool


class Update(NamedTuple):
    """What stage 4 produced: the gradients to write.

    Attributes:
        params: the tensors whose ``.grad`` receives ``grads``.
        grads: one gradient per tensor (``None``: nothing to add).
        is_global: per tensor, whether its gradient is already the same on every rank.
        source: ``"loss"`` (the gradient of the weighted loss), ``"gradient"`` (an update
            from checked Jacobian rows: without a process group, nothing is left to check) or
            ``"memory"`` (one weighted backward). It decides the checks and their messages,
            which are built only when a check fails.
    """

    params: list[Tensor]
    grads: list[Tensor | None]
    is_global: list[bool]
    source: str
