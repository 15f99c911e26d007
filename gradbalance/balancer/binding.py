"""Binding a method to its tasks: all or nothing.

Binding tells the method the task names (it sizes its state) and gives the method's learnable
parameters (uncertainty weighting's ``log σ²``, ...) a param group of the inner optimizer. A
failing bind, or a failing first `backward`, puts everything back as it was (`snapshot` /
`restore`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from gradbalance._torch_compat import module_restore, module_snapshot
from gradbalance.balancer.parameters import ParameterSet
from gradbalance.errors import MissingInputError, OptionError
from gradbalance.methods import Method
from gradbalance.methods import registry as _registry

__all__ = ["bind", "build_method", "restore", "snapshot"]


def snapshot(method: Method, optimizer: Optimizer, params: ParameterSet) -> tuple[Any, ...]:
    """What binding the tasks changes: the method, the task names, the param groups."""
    return module_snapshot(method), params.tasks, len(optimizer.param_groups)


def restore(
    method: Method, optimizer: Optimizer, params: ParameterSet, saved: tuple[Any, ...]
) -> None:
    """Undo everything since `snapshot`."""
    modules, tasks, groups = saved
    module_restore(modules)
    params.tasks = tasks
    del optimizer.param_groups[groups:]


def bind(
    method: Method,
    optimizer: Optimizer,
    params: ParameterSet,
    tasks: tuple[str, ...],
    *,
    from_backward: bool = False,
) -> None:
    """Bind ``method`` to ``tasks`` and give its learnable parameters a param group.

    All or nothing: on an error the method, the tasks and the param groups are as before.
    """
    saved = snapshot(method, optimizer, params)
    try:
        method.bind(tasks)
        params.tasks = tasks
        _follow_the_model(method, params)
        learnable = [p for p in method.parameters() if p.requires_grad]
        groups = optimizer.param_groups
        if learnable and not any(
            any(p is q for q in group["params"] for p in learnable) for group in groups
        ):
            _check_new_group(method, optimizer, tasks, from_backward)
            options = {
                k: v for k, v in method.param_group_options().items() if k in optimizer.defaults
            }
            optimizer.add_param_group({"params": learnable, **options})
    except BaseException:
        restore(method, optimizer, params, saved)
        raise


def _follow_the_model(method: Method, params: ParameterSet) -> None:
    """Move the method's parameters and buffers (uncertainty's log-variances, ...) to the
    model's device when the model is off the CPU: there the weights are made beside the losses,
    and their gradient does not travel back to the host (a synchronisation every step)."""
    device = next((p.device for p in params.optimizer_params()), None)
    own = [p for p in method.parameters() if p.requires_grad]
    if device is not None and device.type != "cpu" and any(p.device != device for p in own):
        method.to(device)  # may replace the Parameter objects (CPU -> meta): read them after


def _check_new_group(
    method: Method, optimizer: Optimizer, tasks: tuple[str, ...], from_backward: bool
) -> None:
    """Refuse a param group for the method's parameters where it cannot work."""
    name = method.name
    if isinstance(optimizer, torch.optim.LBFGS):
        raise OptionError(
            f"method {name!r} learns parameters of its own, which need a param group of the "
            "inner optimizer, but torch.optim.LBFGS steps only its first param group; use "
            "another optimizer, or a method without learnable parameters"
        )
    if from_backward and any("initial_lr" in g for g in optimizer.param_groups):
        raise MissingInputError(
            f"method {name!r} learns parameters of its own, which need a param group of the "
            "inner optimizer, but a learning-rate scheduler already recorded the param "
            "groups (they carry 'initial_lr'), so a group added now would break it; pass "
            f"tasks={list(tasks)!r} to GradBalancer, so that the group exists before the "
            "scheduler is built"
        )


def build_method(method: str | Method, kwargs: Mapping[str, Any]) -> Method:
    """The method a balancer was given: an instance, or a registered name with options."""
    if isinstance(method, Method):
        if kwargs:
            raise TypeError(
                f"got method options {sorted(kwargs)} together with a Method instance; "
                "pass them to the method's constructor instead"
            )
        return method
    if isinstance(method, str):
        return _registry.get(method, **kwargs)
    raise TypeError(
        f"method must be a registered name or a gradbalance.methods.Method, got {method!r}"
    )
