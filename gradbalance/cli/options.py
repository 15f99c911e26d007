"""``argparse`` ``type=`` converters: each checks one kind of value and names what is allowed.

A converter raises `argparse.ArgumentTypeError`; argparse turns it into a usage error (exit
status 2) that names the flag, before any data is loaded or any training starts.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
from typing import Any

import torch

from gradbalance import methods, models

__all__ = [
    "MAX_SEED",
    "MAX_THREADS",
    "device",
    "first_line",
    "key_value",
    "method_name",
    "model_name",
    "positive_float",
    "positive_int",
    "seed",
    "thread_count",
]

#: The seeds torch accepts (``torch.manual_seed``); numpy accepts every non-negative integer.
MAX_SEED = 2**64 - 1
#: More torch threads than this only slow a run down (and a huge count exhausts the memory).
MAX_THREADS = 1024


def method_name(value: str) -> str:
    """A registered method name (case and ``_``/``-`` insensitive) -> its canonical name."""
    try:
        return methods.get_class(value).name
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"unknown method {value!r}; choose from: {', '.join(methods.available())}"
        ) from None


def model_name(value: str) -> str:
    """A registered model name (case, ``-`` and ``_`` insensitive) -> its canonical name."""
    try:
        return models.describe(value).name
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"unknown model {value!r}; choose from: {', '.join(models.available())}"
        ) from None


def positive_int(value: str) -> int:
    """An integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def positive_float(value: str) -> float:
    """A finite number > 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def seed(value: str) -> int:
    """``--seed``: an integer in ``[0, 2**64 - 1]``."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to 2**64 - 1 (the seeds torch and numpy accept), "
            f"got {value!r}"
        )
    return n


def thread_count(value: str) -> int:
    """``--threads``: an integer in ``[1, MAX_THREADS]``."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(
            f"expected a number of threads from 1 to {MAX_THREADS} (this machine has "
            f"{os.cpu_count() or 'an unknown number of'} cores), got {value!r}"
        )
    return n


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (torch's CUDA errors span several)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def device(value: str) -> str:
    """``--device``: a device that can hold and compute tensors here.

    Rejects unknown device strings, ``meta`` (shapes without data), and devices this machine or
    this torch build does not have (``cuda`` without CUDA, a GPU index past the last GPU). A
    tiny computation on the device, copied back to the CPU, is the test.
    """
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"unknown device {value!r} ({first_line(exc)}); use --device cpu, or cuda for "
            "the first GPU"
        ) from None
    if dev.type == "meta":
        raise argparse.ArgumentTypeError(
            "'meta' tensors have shapes but no data, so nothing can be trained on them; use "
            "--device cpu, or cuda for the first GPU"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{value!r}: CUDA is not available (no GPU, or this torch was built without CUDA); "
            "use --device cpu"
        )
    try:
        probe = torch.ones(2, device=dev)
        float((probe + probe).sum().cpu())
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} cannot compute on this machine ({first_line(exc)}); use --device cpu"
        ) from None
    return value


def key_value(value: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a Python literal (``1.5``, ``[1, 2]``, ``True``)
    when it is one, else kept as a string."""
    key, sep, raw = value.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected key=value (e.g. alpha=1.5, weights=[1,2], task_types=classification), "
            f"got {value!r}"
        )
    try:
        parsed = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        parsed = raw
    return key, parsed
