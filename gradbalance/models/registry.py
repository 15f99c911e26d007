"""Build zoo models by name: ``gb.models.create(name, tasks=..., **kw)`` and ``gb.models.list()``.

Names are matched case-insensitively, ignoring ``-`` and ``_`` (``"pad-net"``, ``"padnet"``
and ``"PAD_Net"`` are the same model).
"""

from __future__ import annotations

import builtins
import difflib
from collections.abc import Callable
from typing import Any

from gradbalance.models.base import MultiTaskModel, TasksLike

__all__ = ["create", "list", "register"]

Factory = Callable[..., MultiTaskModel]
_REGISTRY: dict[str, tuple[str, Factory]] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register(name: str, factory: Factory | None = None) -> Any:
    """Register ``factory(tasks=..., **kw) -> MultiTaskModel`` under ``name``.

    Usable directly (``register("my-net", MyNet)``) or as a class decorator
    (``@register("my-net")``).

    Raises:
        ValueError: the name is already taken.

    Examples:
        >>> import gradbalance as gb
        >>> @gb.models.register("tiny-split-doc")
        ... def tiny_split(tasks=None, **kw):
        ...     return gb.models.Split(tasks, width=1 / 32, **kw)
        >>> "tiny-split-doc" in gb.models.list()
        True
    """

    def add(f: Factory) -> Factory:
        key = _key(name)
        if key in _REGISTRY:
            raise ValueError(f"a model named {_REGISTRY[key][0]!r} is already registered")
        _REGISTRY[key] = (name, f)
        return f

    if factory is not None:
        return add(factory)
    return add


def list() -> builtins.list[str]:
    """The registered model names, sorted.

    Examples:
        >>> import gradbalance as gb
        >>> {"mtan", "split", "cross-stitch", "multilenet"} <= set(gb.models.list())
        True
    """
    return sorted(name for name, _ in _REGISTRY.values())


def create(name: str, tasks: TasksLike = None, **kwargs: Any) -> MultiTaskModel:
    """Build the model registered as ``name``.

    Args:
        name: a name from `list` (case, ``-`` and ``_`` do not matter).
        tasks: the tasks (see `gradbalance.models.parse_tasks`); ``None`` for the
            model's default (NYUv2's three tasks for the SegNet family).
        **kwargs: the model's options (``width=``, ...).

    Raises:
        ValueError: unknown name (the message suggests close matches).

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.create("mtan", tasks=gb.models.CITYSCAPES_TASKS, width=1 / 16)
        >>> [*model(torch.randn(2, 3, 32, 64))]
        ['segmentation', 'depth']
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    entry = _REGISTRY.get(_key(name))
    if entry is None:
        names = list()
        close = difflib.get_close_matches(name.lower(), names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Registered models: {names}")
    factory = entry[1]
    if tasks is None:
        return factory(**kwargs)
    return factory(tasks, **kwargs)
