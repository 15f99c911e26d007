"""The layout of `GradBalancer.state_dict`, in every format it was ever written in.

Format 2 (current) is the wrapped optimizer's own state dict, unchanged (torch's top-level
``"state"`` and ``"param_groups"``, so generic optimizer-state tools read it), with one extra
key::

    {"state": ..., "param_groups": ...,
     "gradbalance": {"format": 2, "method": <method state>, "balancer": <counters, task names>}}

Format 1, the first, nested the wrapped optimizer's state dict under a key of its own::

    {"optimizer": {"state": ..., "param_groups": ...},
     "method": <method state>, "balancer": {"format": 1, ...}}

`pack` writes format 2; `unpack` reads both into the same three parts, checking only the
layout; `check_method_state`, `check_optimizer_state` and `read_counters` check the contents
before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from gradbalance.balancer import binding, inputs
from gradbalance.balancer.parameters import ParameterSet
from gradbalance.balancer.state import StepState
from gradbalance.engine import EngineChoice
from gradbalance.methods import Method

__all__ = [
    "FORMAT",
    "KEY",
    "check_method_state",
    "check_optimizer_state",
    "load",
    "pack",
    "read_counters",
    "unpack",
]

#: The format `pack` writes.
FORMAT = 2

#: The key of the balancer's and the method's state beside the optimizer's.
KEY = "gradbalance"


def pack(
    optimizer_state: Mapping[str, Any], method_state: Mapping[str, Any], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """A format-2 state dict: ``optimizer_state``'s keys, plus `KEY`.

    Examples:
        >>> sd = pack({"state": {}, "param_groups": []}, {}, {"steps": 0})
        >>> sorted(sd), sd["gradbalance"]["format"]
        (['gradbalance', 'param_groups', 'state'], 2)
    """
    return {
        **optimizer_state,
        KEY: {"format": FORMAT, "method": method_state, "balancer": meta},
    }


def unpack(state_dict: Any) -> tuple[dict[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """``(optimizer state, method state, balancer meta)`` of a state dict of any format.

    Raises:
        ValueError: ``state_dict`` is not a GradBalancer state dict of a known format.

    Examples:
        >>> old = {"optimizer": {"state": {}, "param_groups": []}, "method": {}, "balancer": {}}
        >>> unpack(old) == unpack(pack({"state": {}, "param_groups": []}, {}, {}))
        True
    """
    if isinstance(state_dict, Mapping) and KEY in state_dict:
        ours = state_dict[KEY]
        if not isinstance(ours, Mapping) or not {"method", "balancer"} <= set(ours):
            raise ValueError(
                f"not a GradBalancer state dict: {KEY!r} must be a mapping with keys "
                "'format', 'method' and 'balancer'"
            )
        if ours.get("format") != FORMAT:
            raise ValueError(
                f"GradBalancer state dict of format {ours.get('format')!r}; this version "
                f"reads formats 1 and {FORMAT}"
            )
        optimizer_state = {k: v for k, v in state_dict.items() if k != KEY}
        method_state, meta = ours["method"], ours["balancer"]
    elif isinstance(state_dict, Mapping) and {"optimizer", "method", "balancer"} <= set(state_dict):
        optimizer_state = state_dict["optimizer"]
        method_state, meta = state_dict["method"], state_dict["balancer"]
    else:
        raise ValueError(
            f"not a GradBalancer state dict (expected the optimizer's 'state' and "
            f"'param_groups' with {KEY!r}, or the older 'optimizer', 'method', 'balancer'); "
            "to load an inner optimizer's state use balancer.optimizer.load_state_dict"
        )
    if (
        not isinstance(meta, Mapping)
        or not isinstance(method_state, Mapping)
        or not isinstance(optimizer_state, Mapping)
        or not {"state", "param_groups"} <= set(optimizer_state)
    ):
        raise ValueError(
            "not a GradBalancer state dict: the balancer's and the method's state must be "
            "mappings and the optimizer's an optimizer state dict (keys 'state', 'param_groups')"
        )
    return dict(optimizer_state), method_state, meta


def check_method_state(method: Method, tasks: list[str] | None, saved: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``saved`` has the keys of the method's state, in their
    shapes. Keys the method does not hold yet are left to its own loader (some methods
    create state lazily and accept it from a checkpoint; others refuse it)."""
    expected = method.state_dict()
    missing = sorted(set(expected) - set(saved))
    where = f"method {method.name!r} (tasks {tasks})"
    if missing:
        raise ValueError(
            f"the method state in the state dict does not fit {where}: it lacks {missing}; "
            "was it saved with other tasks or method options?"
        )
    for key, value in expected.items():
        if isinstance(value, Tensor) and (
            not isinstance(saved[key], Tensor) or saved[key].shape != value.shape
        ):
            got = tuple(saved[key].shape) if isinstance(saved[key], Tensor) else saved[key]
            raise ValueError(
                f"the method state in the state dict does not fit {where}: {key!r} is "
                f"{got}, expected shape {tuple(value.shape)}"
            )


def check_optimizer_state(optimizer: Optimizer, method: Method, saved: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``saved``'s param groups match the inner optimizer's."""
    groups = saved["param_groups"]
    current = optimizer.param_groups
    if not isinstance(saved["state"], Mapping) or not isinstance(groups, Sequence):
        raise ValueError("the optimizer state in the state dict is not an optimizer state dict")
    if len(groups) != len(current):
        note = ""
        if any(p.requires_grad for p in method.parameters()):
            note = " (the method's learnable parameters have a group of their own)"
        raise ValueError(
            f"the optimizer state in the state dict has {len(groups)} param group(s), this "
            f"balancer's inner optimizer has {len(current)}{note}"
        )
    for i, (group, mine) in enumerate(zip(groups, current)):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, Sequence) or len(params) != len(mine["params"]):
            size = len(params) if isinstance(params, Sequence) else params
            raise ValueError(
                f"param group {i} of the optimizer state in the state dict holds {size} "
                f"parameters, this balancer's inner optimizer holds {len(mine['params'])}; "
                "was it saved for another model?"
            )


def read_counters(meta: Mapping[str, Any]) -> dict[str, int]:
    """The step counters of a balancer's saved meta, checked."""
    counters = {}
    for key in ("steps", "skipped_steps"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"state dict has {key}={value!r}; expected an int >= 0")
        counters[key] = value
    return counters


def load(
    state_dict: Mapping[str, Any],
    method: Method,
    optimizer: Optimizer,
    params: ParameterSet,
    state: StepState,
    engines: EngineChoice,
) -> None:
    """Load ``state_dict`` into a balancer's parts, all or nothing (see
    `GradBalancer.load_state_dict`)."""
    tasks_now = None if params.tasks is None else list(params.tasks)
    optimizer_state, method_state, meta = unpack(state_dict)
    if meta.get("method") != method.name:
        raise ValueError(
            f"state dict was saved with method {meta.get('method')!r}, this balancer uses "
            f"{method.name!r}"
        )
    saved_tasks = meta.get("tasks")
    if saved_tasks is not None:
        saved_tasks = inputs.validate_task_names(saved_tasks)
        if params.tasks is not None and params.tasks != saved_tasks:
            raise ValueError(
                f"state dict was saved for tasks {list(saved_tasks)}, this balancer has {tasks_now}"
            )
    counters = read_counters(meta)
    saved = binding.snapshot(method, optimizer, params)
    inner = optimizer.state, optimizer.param_groups
    backup = None
    try:
        if saved_tasks is not None and params.tasks is None:
            binding.bind(method, optimizer, params, saved_tasks)
        bound = None if params.tasks is None else list(params.tasks)
        check_method_state(method, bound, method_state)
        check_optimizer_state(optimizer, method, optimizer_state)
        if saved[1] is not None:
            # the method was bound: keep its values, to put them back if loading fails
            backup = {
                k: v.detach().clone() if isinstance(v, Tensor) else v
                for k, v in method.state_dict().items()
            }
        optimizer.load_state_dict(optimizer_state)
        method.load_state_dict(method_state)
    except BaseException:
        optimizer.__setstate__({"state": inner[0], "param_groups": inner[1]})
        # drops what binding (or a lazy loader) created
        binding.restore(method, optimizer, params, saved)
        if backup is not None:
            method.load_state_dict(backup)
        raise
    state.steps = counters["steps"]
    state.skipped = counters["skipped_steps"]
    state.found = state.device_skipped = state.device_unstepped = None
    engines.load_state_dict(meta)
    state.pending.clear()
    state.skip_next_step = False
