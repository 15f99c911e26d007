"""``gradbalance train``'s resolved configuration: ``config.json`` in the run folder, and
``--config FILE`` to run it again.

The train parser leaves every option that a configuration file can set at ``None`` when it is
not given; `resolve` then fills each from ``--config`` (when given) and else from `DEFAULTS`,
so a flag given beside ``--config`` overrides the file's value, also when it names the
default (``--optimizer adam`` over a file's ``"sgd"``). ``--method-arg`` pairs are merged
into the file's ``method_args``, key by key.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradbalance import __version__, engine
from gradbalance.cli import options, recipes

__all__ = ["DEFAULTS", "VERSION_KEY", "load", "resolve", "to_json"]

#: The keys of ``config.json`` and the value each takes when neither a flag nor the file sets
#: it; ``None`` means "the dataset's default" (``model``, ``epochs``, ...) or "none".
DEFAULTS: dict[str, Any] = {
    "data": "multimnist",
    "model": None,
    "method": "equal",
    "method_args": {},
    "tasks": None,
    "size": None,
    "epochs": None,
    "batch_size": None,
    "lr": None,
    "width": None,
    "optimizer": "adam",
    "engine": "auto",
    "root": None,
    "augment": False,
    "device": "cpu",
    "seed": 0,
    "quick": False,
}

#: The key that records the gradbalance version that wrote the file (informative only).
VERSION_KEY = "gradbalance"

#: The ``argparse`` destination of each key where it differs from the key.
_DEST = {"method_args": "method_arg"}


def _expected(what: str, value: Any) -> ValueError:
    return ValueError(f"expected {what}, got {json.dumps(value)}")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise _expected(f"one of {', '.join(choices)}", value)
        return value

    return check


def _converted(converter: Callable[[str], Any], what: str) -> Callable[[Any], Any]:
    """A check through the flag's own converter (which names what is allowed)."""

    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise _expected(what, value)
        try:
            return converter(value)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None

    return check


def _integer(converter: Callable[[str], int], what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(what, value)
        try:
            return converter(str(value))
        except argparse.ArgumentTypeError:
            raise _expected(what, value) from None

    return check


def _positive_number(value: Any) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and value > 0 and math.isfinite(value)):
        raise _expected("a positive number", value)
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _method_args(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(k.isidentifier() for k in value):
        raise _expected('an object whose keys are option names, e.g. {"alpha": 1.5}', value)
    return dict(value)


def _tasks(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise _expected("a non-empty list of task names", value)
    return list(value)


def _path(value: Any) -> Path:
    if not isinstance(value, str):
        raise _expected("a folder path (a string)", value)
    return Path(value)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "data": _choice(recipes.DATASETS),
    "model": _converted(options.model_name, "a model name (a string)"),
    "method": _converted(options.method_name, "a method name (a string)"),
    "method_args": _method_args,
    "tasks": _tasks,
    "size": _integer(options.positive_int, "a positive integer"),
    "epochs": _integer(options.positive_int, "a positive integer"),
    "batch_size": _integer(options.positive_int, "a positive integer"),
    "lr": _positive_number,
    "width": _positive_number,
    "optimizer": _choice(("adam", "sgd")),
    "engine": _choice(tuple(engine.STRATEGIES)),
    "root": _path,
    "augment": _boolean,
    "device": _converted(options.device, "a device name (a string)"),
    "seed": _integer(options.seed, "an integer from 0 to 2**64 - 1"),
    "quick": _boolean,
}


def load(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The checked values of the configuration file ``path``; a usage error naming the key
    for an unknown key or a value of the wrong type."""
    shown = f"--config {str(path)!r}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        parser.error(f"{shown}: cannot read the file ({exc.strerror or exc})")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        parser.error(f"{shown}: not a JSON file ({exc})")
    if not isinstance(raw, dict):
        parser.error(f"{shown}: expected a JSON object {{key: value}}, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == VERSION_KEY:
            continue
        if key not in _CHECKS:
            parser.error(f"{shown}: unknown key {key!r}; the keys are {', '.join(DEFAULTS)}")
        if value is None and DEFAULTS[key] is None:
            values[key] = None
            continue
        try:
            values[key] = _CHECKS[key](value)
        except ValueError as exc:
            parser.error(f"{shown}: key {key!r}: {exc}")
    return values


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill each option that no flag set from ``--config`` (if given), else from `DEFAULTS`."""
    from_file = load(parser, args.config) if args.config is not None else {}
    for key, default in DEFAULTS.items():
        dest = _DEST.get(key, key)
        given = getattr(args, dest)
        if key == "method_args":
            merged = {**from_file.get(key, default), **dict(given or [])}
            setattr(args, dest, list(merged.items()))
        elif given is None:
            setattr(args, dest, from_file.get(key, default))


def to_json(parser: argparse.ArgumentParser, config: Mapping[str, Any]) -> str:
    """``config`` (with the version key first) as indented JSON; a usage error naming the
    ``--method-arg`` whose value JSON cannot hold (a set, bytes, a complex number)."""
    for key, value in config.get("method_args", {}).items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            parser.error(
                f"--method-arg {key}={value!r}: config.json cannot hold this value "
                f"({type(value).__name__}); pass a number, string, list or dict"
            )
    return json.dumps({VERSION_KEY: __version__, **config}, indent=2) + "\n"
