"""Validation of what users pass to `GradBalancer.backward` (no side effects)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.errors import LossError, MissingInputError, TaskMismatchError

__all__ = ["as_feature_list", "parse_kpis", "parse_losses", "validate_task_names"]


def validate_task_names(tasks: Any) -> tuple[str, ...]:
    """Check user-declared task names: a non-empty sequence of unique strings."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(
            f"tasks must be a sequence of task names (e.g. ['seg', 'depth']), got {tasks!r}"
        )
    names = tuple(tasks)
    if not names:
        raise ValueError("tasks must name at least one task")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"task names must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    return names


def parse_losses(
    losses: Any, known: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[Tensor], list[int]]:
    """Turn ``losses`` (mapping or sequence of scalar tensors) into names and tensors.

    Returns:
        ``(names, tensors, call_order)``: names and tensors in the balancer's task order
        (``known`` when tasks are already declared, else the order given), and for each position
        of the caller's order the index into the balancer's order.
    """
    if known is not None and type(losses) is dict and tuple(losses) == known:
        # the common case: a dict keyed by the declared tasks, in their order
        tensors: list[Tensor] = list(losses.values())
        for name, loss in zip(known, tensors):
            _check_loss(name, loss)
        return known, tensors, list(range(len(known)))
    if isinstance(losses, Tensor):
        raise LossError(
            "backward() takes one loss per task as a dict {task: loss} or a list/tuple, "
            f"got a single tensor of shape {tuple(losses.shape)}; for one task pass [loss]"
        )
    if isinstance(losses, Mapping):
        given_names = [str(k) for k in losses.keys()]
        given = list(losses.values())
        if known is not None:
            missing = [t for t in known if t not in given_names]
            unknown = [t for t in given_names if t not in known]
            if missing or unknown:
                raise TaskMismatchError(
                    f"backward() got losses for tasks {given_names}, but the balancer's tasks "
                    f"are {list(known)} (missing: {missing}, unknown: {unknown}); pass one loss "
                    "for every task"
                )
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        given = list(losses)
        if known is not None:
            if len(given) != len(known):
                raise TaskMismatchError(
                    f"backward() got {len(given)} losses, but the balancer has {len(known)} "
                    f"tasks {list(known)}; pass one loss per task in that order"
                )
            given_names = list(known)
        else:
            given_names = [f"task{i}" for i in range(len(given))]
    else:
        raise LossError(
            "backward() takes the task losses as a dict {task: loss} or a list/tuple of scalar "
            f"tensors, got {type(losses).__name__}"
        )
    if not given:
        raise LossError("backward() got no losses; pass one scalar loss per task")
    for name, loss in zip(given_names, given):
        _check_loss(name, loss)
    order = known if known is not None else tuple(given_names)
    position = {name: i for i, name in enumerate(order)}
    tensors = [given[0]] * len(order)
    call_order = []
    for name, loss in zip(given_names, given):
        tensors[position[name]] = loss
        call_order.append(position[name])
    return tuple(order), tensors, call_order


def _check_loss(name: str, loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise LossError(
            f"loss of task {name!r} is a {type(loss).__name__}, not a tensor; pass the loss "
            "tensor itself (not loss.item())"
        )
    if loss.numel() != 1:
        raise LossError(
            f"loss of task {name!r} has shape {tuple(loss.shape)}; each loss must be a scalar "
            "(reduce it, e.g. with .mean())"
        )
    if not loss.is_floating_point():
        raise LossError(f"loss of task {name!r} has dtype {loss.dtype}; it must be floating point")
    if not loss.requires_grad:
        raise LossError(
            f"loss of task {name!r} does not require grad: it is detached from the model "
            "(computed under torch.no_grad(), or .detach() was called, or no parameter "
            "requires grad)"
        )


def parse_kpis(kpis: Any, tasks: tuple[str, ...], method: str) -> Tensor:
    """One KPI per task in ``[0, 1]`` as a float64 tensor in task order."""
    if kpis is None:
        raise MissingInputError(
            f"method {method!r} needs one KPI per task in [0, 1] (e.g. accuracy or IoU); "
            f"call backward(losses, kpis={{{', '.join(repr(t) + ': ...' for t in tasks)}}})"
        )
    if isinstance(kpis, Mapping):
        missing = [t for t in tasks if t not in kpis]
        if missing:
            raise MissingInputError(
                f"method {method!r} got KPIs for {list(kpis)}, but tasks {missing} have none; "
                "pass one KPI per task"
            )
        values = [kpis[t] for t in tasks]
    elif isinstance(kpis, (Sequence, Tensor)) and not isinstance(kpis, (str, bytes)):
        values = list(kpis)
        if len(values) != len(tasks):
            raise MissingInputError(
                f"method {method!r} got {len(values)} KPIs for {len(tasks)} tasks {list(tasks)}"
            )
    else:
        raise MissingInputError(
            f"kpis must be a dict {{task: value}} or a sequence, got {type(kpis).__name__}"
        )
    out = []
    for task, v in zip(tasks, values):
        x = float(v.detach()) if isinstance(v, Tensor) else float(v)
        if not math.isfinite(x) or x < 0.0 or x > 1.0:
            raise MissingInputError(
                f"KPI of task {task!r} is {x}; KPIs must lie in [0, 1] (e.g. accuracy, IoU)"
            )
        out.append(x)
    return torch.tensor(out, dtype=torch.float64)


def as_feature_list(features: Any, method: str) -> list[Tensor]:
    """The shared features as a list of tensors that require grad."""
    if features is None:
        raise MissingInputError(
            f"method {method!r} balances gradients w.r.t. the shared features: call "
            "backward(losses, features=z) with z the trunk's output that every head reads "
            "(e.g. z = model.encode(x); out = model.decode(z))"
        )
    items = [features] if isinstance(features, Tensor) else list(features)
    if not items:
        raise MissingInputError("features is empty; pass the shared representation tensor(s)")
    for i, f in enumerate(items):
        if not isinstance(f, Tensor):
            raise TypeError(f"features[{i}] is a {type(f).__name__}, not a tensor")
        if not f.requires_grad:
            raise LossError(
                f"features[{i}] does not require grad: pass the trunk's output itself, not a "
                "detached copy"
            )
    return items
