"""`InnerOptimizerProxy`: a `torch.optim.Optimizer` that *is* another optimizer's state.

It shares the inner optimizer's ``param_groups``, ``state`` and ``defaults`` (the same objects,
not copies), so learning-rate schedulers, gradient clipping, ``GradScaler`` and checkpoint
tools that read them see the inner optimizer's.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["InnerOptimizerProxy"]


class InnerOptimizerProxy(Optimizer):
    """An `Optimizer` whose ``param_groups``, ``state`` and ``defaults`` are ``optimizer``'s.

    Args:
        optimizer: the inner optimizer.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._initialized = False
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._initialized = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if getattr(self, "_initialized", False):
            self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if getattr(self, "_initialized", False):
            self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if getattr(self, "_initialized", False):
            self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (as ``Optimizer.add_param_group``)."""
        if not getattr(self, "_initialized", False):
            return  # the base constructor replays the inner optimizer's groups: nothing to do
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults, state and param_groups: keep everything
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
