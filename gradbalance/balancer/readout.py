"""`BalancerReadout`: what a `GradBalancer` tells about its configuration and its last steps
(read-only properties; `GradBalancer` inherits them)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance import distributed as _distributed
from gradbalance.balancer.parameters import ParameterSet
from gradbalance.balancer.state import StepState
from gradbalance.engine import EngineChoice

__all__ = ["BalancerReadout"]


class BalancerReadout:
    """The read-only state of a balancer, shared by `GradBalancer`."""

    _params: ParameterSet
    _engines: EngineChoice
    _state: StepState
    _sync: _distributed.Synchronizer | None
    _sync_resolved: bool
    _distributed_request: str

    @property
    def tasks(self) -> list[str] | None:
        """The task names in the balancer's order, or ``None`` before the first backward."""
        return None if self._params.tasks is None else list(self._params.tasks)

    @property
    def engine(self) -> str:
        """The engine strategy in use (``"auto"`` resolves on the first gradient backward)."""
        return self._engines.name

    @property
    def distributed(self) -> str:
        """The distributed mode in use: ``"global"``, ``"local"`` or ``"off"``.

        ``"auto"`` until the first `backward` resolves it.
        """
        if not self._sync_resolved:
            return self._distributed_request
        return "off" if self._sync is None else self._sync.mode

    @property
    def synchronizer(self) -> _distributed.Synchronizer | None:
        """The `gradbalance.distributed.Synchronizer` in use (its counters say how much was
        sent), or ``None`` when nothing is synchronised."""
        return self._sync

    @property
    def shared_parameters(self) -> list[Tensor]:
        """The shared parameters the balancer combines task gradients on: those of ``shared=``
        that require grad now (for ``shared="auto"``: those found on the last resolving
        `backward`, empty before the first)."""
        return self._params.current_shared()

    @property
    def last_shared_parameters(self) -> list[Tensor]:
        """The last shared layer (GradNorm's ``W``): ``last_shared=`` (or the model's
        declaration) less its frozen tensors, else the layer found from the graph by the last
        `backward` (empty before the first)."""
        return self._params.current_last_shared()

    @property
    def steps(self) -> int:
        """How many steps were applied (skipped steps not counted; after steps skipped on the
        device, reading this waits for the device)."""
        return self._state.counts()[0]

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite loss or gradient (``nonfinite="skip"``;
        after steps skipped on the device, reading this waits for the device)."""
        return self._state.counts()[1]

    @property
    def last_weights(self) -> Tensor | None:
        """The weights of the last `backward`, in the balancer's task order (a fresh copy in
        the default dtype on each access; NaN after a skipped step)."""
        w = self._state.last_weights
        return None if w is None else w.to(torch.get_default_dtype(), copy=True)

    @property
    def last_losses(self) -> Tensor | None:
        """The (detached, float64) losses of the last `backward`."""
        return self._state.last_losses

    @property
    def last_gramian(self) -> Tensor | None:
        """The Gramian of the last `backward`, for gradient methods (float64)."""
        return self._state.last_gramian
