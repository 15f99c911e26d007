"""`StepState`: what a balancer remembers between its steps (counters, the pending method
updates, the last step's outputs, and the ``no_sync`` bookkeeping)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from gradbalance.methods import StepInputs

__all__ = ["StepState"]


@dataclass
class StepState:
    """The balancer's mutable state between steps.

    Attributes:
        steps: steps applied (skipped ones not counted).
        skipped: steps skipped for a non-finite value (``nonfinite="skip"``).
        pending: the method updates of the backwards since the last `step`, committed there.
        skip_next_step: the last backward was skipped: the next `step` is a no-op.
        last_weights: the weights of the last backward (NaN after a skipped one).
        last_losses: the float64 losses of the last backward.
        last_gramian: the Gramian of the last backward (gradient methods).
        grad_sync: false inside ``no_sync()``: gradients stay rank-local.
        unsynced: ``.grad`` holds rank-local gradients from inside ``no_sync()``.
        found: under the device-side skip (`gradbalance.balancer.deferred`), the flag of the
            backwards since the last `step` (a boolean on the device), else ``None``.
        device_skipped: backwards skipped on the device, not yet counted in ``skipped``.
        device_unstepped: steps counted in ``steps`` that the device skipped.
    """

    steps: int = 0
    skipped: int = 0
    pending: list[tuple[StepInputs, Tensor]] = field(default_factory=list)
    skip_next_step: bool = False
    last_weights: Tensor | None = None
    last_losses: Tensor | None = None
    last_gramian: Tensor | None = None
    grad_sync: bool = True
    unsynced: bool = False
    found: Tensor | None = None
    device_skipped: Tensor | None = None
    device_unstepped: Tensor | None = None

    def counts(self) -> tuple[int, int]:
        """``(steps applied, steps skipped)``, with one host read per device counter."""
        steps, skipped = self.steps, self.skipped
        if self.device_unstepped is not None:
            steps -= int(self.device_unstepped)
        if self.device_skipped is not None:
            skipped += int(self.device_skipped)
        return steps, skipped

    def settle(self) -> None:
        """Fold the device counters into ``steps`` and ``skipped`` (host reads)."""
        self.steps, self.skipped = self.counts()
        self.device_skipped = self.device_unstepped = None
