"""Build zoo models by name, with the same verbs as `gradbalance.methods`:
`gb.models.available()`, `gb.models.get(name, tasks=..., **options)` and
`gb.models.describe(name)`; `gb.models.register` adds a model.

`create` and `list` are the earlier names of `get` and `available`: the same functions, kept
as aliases (``gb.models.create is gb.models.get``).

Names are matched case-insensitively, ignoring ``-`` and ``_`` (``"pad-net"``, ``"padnet"``
and ``"PAD_Net"`` are the same model).
"""

from __future__ import annotations

import builtins
import difflib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

from gradbalance.models.base import MultiTaskModel, TasksLike

__all__ = ["ModelInfo", "available", "create", "describe", "get", "list", "register"]

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
        >>> "tiny-split-doc" in gb.models.available()
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


def available() -> builtins.list[str]:
    """The registered model names, sorted (also available as `list`).

    Examples:
        >>> import gradbalance as gb
        >>> {"mtan", "split", "cross-stitch", "multilenet"} <= set(gb.models.available())
        True
        >>> gb.models.list is gb.models.available
        True
    """
    return sorted(name for name, _ in _REGISTRY.values())


def get(name: str, tasks: TasksLike = None, **options: Any) -> MultiTaskModel:
    """Build the model registered as ``name`` (also available as `create`).

    Args:
        name: a name from `available` (case, ``-`` and ``_`` do not matter).
        tasks: the tasks (see `gradbalance.models.parse_tasks`); ``None`` for the
            model's default (NYUv2's three tasks for the SegNet family).
        **options: the model's options (``width=``, ...).

    Raises:
        ValueError: unknown name (the message suggests close matches).

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.get("mtan", tasks=gb.models.CITYSCAPES_TASKS, width=1 / 16)
        >>> [*model(torch.randn(2, 3, 32, 64))]
        ['segmentation', 'depth']
        >>> gb.models.create is gb.models.get
        True
    """
    factory = _entry(name)[1]
    if tasks is None:
        return factory(**options)
    return factory(tasks, **options)


#: Alias of `available` (its earlier name).
list = available
#: Alias of `get` (its earlier name).
create = get


@dataclass(frozen=True)
class ModelInfo:
    """What `describe` says about one registered model.

    Attributes:
        name: the registry name (`get(name)`).
        summary: the first sentence of the model's docstring.
        model_class: the `MultiTaskModel` subclass the factory builds, or `None` when the
            factory does not say (no class, no return annotation).
        has_shared_features: whether the model has `encode`/`decode` around one shared
            tensor (what MGDA-UB and the `"representation"` engine need).
        accepts_width: whether `get(name, width=...)` is accepted.
        required_options: keyword options `get` needs besides `tasks` (e.g. MMoE's
            `in_features`).
    """

    name: str
    summary: str
    model_class: type[MultiTaskModel] | None
    has_shared_features: bool
    accepts_width: bool
    required_options: tuple[str, ...]


def _summary(doc: str | None) -> str:
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    cut = text.find(". ")
    return text if cut < 0 else text[: cut + 1]


def _model_class(factory: Factory) -> type[MultiTaskModel] | None:
    if isinstance(factory, type):
        return factory if issubclass(factory, MultiTaskModel) else None
    try:
        hint = typing.get_type_hints(factory).get("return")
    except Exception:  # unresolvable annotations: the factory does not say
        return None
    if isinstance(hint, type) and issubclass(hint, MultiTaskModel):
        return hint
    return None


def _info(name: str, factory: Factory) -> ModelInfo:
    cls = _model_class(factory)
    params = dict(inspect.signature(factory).parameters)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and cls is not None:
        params.update(inspect.signature(cls).parameters)  # `**kw` forwarded to the class
    required = tuple(
        p.name
        for i, p in enumerate(params.values())
        if p.default is p.empty
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and not (i == 0 and p.kind is p.POSITIONAL_OR_KEYWORD)  # the tasks
        and p.name != "tasks"
    )
    doc = inspect.getdoc(factory) or (inspect.getdoc(cls) if cls is not None else None)
    return ModelInfo(
        name=name,
        summary=_summary(doc),
        model_class=cls,
        has_shared_features=bool(cls is not None and cls.has_shared_features),
        accepts_width="width" in params,
        required_options=required,
    )


@overload
def describe(name: str) -> ModelInfo: ...
@overload
def describe(name: None = None) -> builtins.list[ModelInfo]: ...
def describe(name: str | None = None) -> ModelInfo | builtins.list[ModelInfo]:
    """Describe one registered model, or all of them (sorted by name).

    Args:
        name: a name from `available` (case, `-` and `_` do not matter); `None` for every
            model.

    Raises:
        ValueError: unknown name (the message suggests close matches).

    Examples:
        >>> import gradbalance as gb
        >>> info = gb.models.describe("pad-net")
        >>> info.model_class.__name__, info.has_shared_features, info.accepts_width
        ('PADNet', True, True)
        >>> gb.models.describe("mmoe").required_options
        ('in_features',)
        >>> {"split", "pad-net"} <= {m.name for m in gb.models.describe() if m.has_shared_features}
        True
    """
    if name is None:
        return [_info(n, f) for n, f in sorted(_REGISTRY.values(), key=lambda e: e[0])]
    return _info(*_entry(name))


def _entry(name: str) -> tuple[str, Factory]:
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    entry = _REGISTRY.get(_key(name))
    if entry is None:
        names = available()
        close = difflib.get_close_matches(name.lower(), names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Registered models: {names}")
    return entry
