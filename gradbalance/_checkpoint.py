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
layout (the balancer checks the contents).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FORMAT", "KEY", "pack", "unpack"]

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
