"""What users pass to `GradBalancer.backward`: validated and put in shape (no side effects,
but for `mark_consumed`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradbalance.errors import LossError, MissingInputError, TaskMismatchError
from gradbalance.methods import KPIS, Method

__all__ = [
    "Call",
    "as_feature_list",
    "check_devices",
    "check_graph",
    "mark_consumed",
    "on_device",
    "parse_call",
    "parse_kpis",
    "parse_losses",
    "scale_of",
    "stack_losses",
    "validate_task_names",
    "weighted_sum",
]

#: Key set in the ``metadata`` of a loss's ``grad_fn`` once `GradBalancer.backward` consumed
#: its graph (``retain_graph=False``): a later backward over it raises, at every step alike.
CONSUMED = "gradbalance.consumed"


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


def _node_metadata(node: Any) -> dict[str, Any]:
    """An autograd node's ``metadata`` dict (public API; torch's stubs type it as a method)."""
    return node.metadata


def check_graph(loss_list: list[Tensor]) -> None:
    """Refuse losses whose graph an earlier `backward` consumed (``retain_graph=False``).

    Autograd itself raises only where the graph's saved tensors were freed, which the
    balancer's engines do not do alike on every step; this check makes a second backward
    raise at every step, before anything is modified.
    """
    for i, loss in enumerate(loss_list):
        node = loss.grad_fn
        if node is not None and _node_metadata(node).get(CONSUMED):
            raise LossError(
                f"trying to backward through the graph a second time: backward() was "
                f"already called on these losses (loss #{i} of this call) and freed their "
                "graph; recompute the losses (a new forward pass), or pass "
                "retain_graph=True to the first backward() to backpropagate twice"
            )


def mark_consumed(loss_list: list[Tensor]) -> None:
    """Mark the losses' graphs as consumed (see `check_graph`)."""
    for loss in loss_list:
        node = loss.grad_fn
        if node is not None:
            _node_metadata(node)[CONSUMED] = True


def check_devices(tasks: tuple[str, ...], losses: list[Tensor]) -> None:
    """Raise `LossError` naming the tasks of each device when the losses are on several."""
    first = losses[0].device
    if all(loss.device == first for loss in losses):
        return
    by_device: dict[str, list[str]] = {}
    for task, loss in zip(tasks, losses):
        by_device.setdefault(str(loss.device), []).append(task)
    where = ", ".join(f"task(s) {names} on {dev}" for dev, names in by_device.items())
    raise LossError(
        f"the losses are on different devices: {where}; compute every loss on one device "
        "(the model's), or move them with loss.to(device)"
    )


def stack_losses(losses: list[Tensor], differentiable: bool) -> tuple[Tensor | None, Tensor]:
    """The losses as one vector: ``(stacked, detached)``.

    ``stacked`` keeps the autograd graph (for ``Σ wᵢ Lᵢ``) when ``differentiable`` and the losses
    share a dtype, else it is ``None``; ``detached`` is a float64 copy, one ``stack`` in all.
    """
    flat = [loss if loss.dim() == 0 else loss.reshape(()) for loss in losses]
    dtype = flat[0].dtype
    if any(loss.dtype != dtype for loss in flat):
        with torch.no_grad():
            return None, torch.stack([loss.to(torch.float64) for loss in flat])
    if differentiable:
        stacked = torch.stack(flat)
        # a copy even for float64 losses: the balancer may average it in place (DDP)
        return stacked, stacked.detach().to(torch.float64, copy=True)
    with torch.no_grad():
        return None, torch.stack(flat).to(torch.float64)


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` (differentiable). Methods may return their weights on the CPU (equal,
    fixed, RLW, ...); a CPU tensor is copied with ``non_blocking=True``: from pageable memory
    CUDA stages it at once, without waiting for the kernels queued on the device.

    Examples:
        >>> on_device(torch.ones(2), torch.device("meta")).device
        device(type='meta')
    """
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.device.type == "cpu")


def weighted_sum(weights: Tensor, losses: list[Tensor], stacked: Tensor | None) -> Tensor:
    """``Σ_i w_i L_i`` in the losses' dtype and on their device, differentiable w.r.t. both.

    Losses of one dtype come as ``stacked`` (`stack_losses`): one product and one sum (two
    autograd nodes whatever ``K``); each loss still receives exactly ``w_i`` as its gradient.
    Losses of mixed dtypes (``stacked`` is ``None``) are summed term by term.
    """
    w = on_device(weights, losses[0].device).to(losses[0].dtype)
    if stacked is not None:
        return (stacked * w).sum()
    objective = None
    for w_i, loss in zip(w.unbind(), losses):
        term = w_i * loss.reshape(())
        objective = term if objective is None else objective + term
    assert objective is not None
    return objective


def scale_of(scaler: Any, device: torch.device) -> Tensor | None:
    """The GradScaler's current scale as a tensor, or ``None`` without an enabled scaler."""
    if scaler is None:
        return None
    if not hasattr(scaler, "scale") or not hasattr(scaler, "is_enabled"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), device=device, dtype=torch.float32))


class Call(NamedTuple):
    """One `backward` call's inputs, validated, in the balancer's task order."""

    tasks: tuple[str, ...]
    losses: list[Tensor]
    call_order: list[int]
    kpis: Tensor | None
    features: list[Tensor]
    scale: Tensor | None


def parse_call(
    losses: Any,
    known: tuple[str, ...] | None,
    method: Method,
    *,
    features: Any,
    kpis: Any,
    scaler: Any,
    features_required: bool,
    features_useful: bool,
    resolve: Callable[[tuple[str, ...], list[Tensor], Method], None],
) -> Call:
    """Validate everything `backward` was given, in a fixed order (so that the same error is
    raised first whatever else is wrong): losses, their graphs and devices, then ``resolve``
    (the parameter set's checks of what the losses reach), KPIs, features, the scaler.

    ``features`` are required when ``features_required``; else, when ``features_useful`` (the
    chained engine may use them) and given, unusable ones are ignored.
    """
    tasks, loss_list, call_order = parse_losses(losses, known)
    check_graph(loss_list)
    check_devices(tasks, loss_list)
    resolve(tasks, loss_list, method)
    kpi_tensor = parse_kpis(kpis, tasks, method.name) if KPIS in method.requires else None
    feature_list: list[Tensor] = []
    if features_required:
        feature_list = as_feature_list(features, method.name)
    elif features is not None and features_useful and method.is_gradient_method():
        # engine="auto" uses features only to speed up the Jacobian: unusable ones are ignored
        with contextlib.suppress(TypeError, LossError, MissingInputError):
            feature_list = as_feature_list(features, method.name)
    scale = scale_of(scaler, loss_list[0].device)
    return Call(tasks, loss_list, call_order, kpi_tensor, feature_list, scale)
