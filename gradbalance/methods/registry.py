"""Name -> method class registry: ``method="mgda"`` and ``methods.MGDA()`` are the same thing."""

from __future__ import annotations

from typing import Any, TypeVar

from gradbalance.methods.base import Method

__all__ = ["available", "get", "get_class", "register"]

_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type[Method])


def normalise(name: str) -> str:
    """The registry's key for a method name: case, surrounding blanks and ``_`` vs ``-`` ignored."""
    return name.strip().lower().replace("_", "-")


def register(cls: M) -> M:
    """Class decorator that registers a `Method` subclass under ``cls.name``.

    Examples:
        >>> from gradbalance.methods import Method, register
        >>> @register
        ... class Half(Method):
        ...     name = "half-example"
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"only Method subclasses can be registered, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name` to register it under")
    key = normalise(cls.name)
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({existing!r})")
    _REGISTRY[key] = cls
    return cls


def available() -> list[str]:
    """The names of all registered methods, sorted.

    Examples:
        >>> import gradbalance as gb
        >>> "equal" in gb.methods.available()
        True
    """
    return sorted(_REGISTRY)


def get_class(name: str) -> type[Method]:
    """The method class registered under ``name`` (case and ``_``/``-`` insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[normalise(name)]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; available methods: {', '.join(available())}"
        ) from None


def get(name: str, **kwargs: Any) -> Method:
    """Build the method registered under ``name`` with ``kwargs``.

    Examples:
        >>> import gradbalance as gb
        >>> gb.methods.get("fixed", weights=[1.0, 0.5])
        Fixed(weights=[1.0, 0.5])
    """
    return get_class(name)(**kwargs)
