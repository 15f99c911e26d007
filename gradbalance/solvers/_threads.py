"""Run the small dense solvers single-threaded on CPU.

The problems are K x K with K rarely above a hundred: starting the intra-op thread pool for each
of their tiny batched factorisations costs far more than the arithmetic, and on a busy machine
(other processes on the cores) a multi-threaded call can wait milliseconds for a thread
(measured here: a batched `torch.linalg.solve_ex` on 4 x 4 systems took 0.5 ms with two threads
and 0.008 ms with one). The decorator below sets one intra-op thread for the duration of a
solver call on a CPU tensor and restores the previous setting afterwards. It does nothing on
other devices or while `torch.compile` traces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


def _is_compiling() -> bool:
    """Whether `torch.compile` is tracing (``False`` on torch without `torch.compiler`)."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling()) if callable(is_compiling) else False


def cpu_single_thread(fn: F) -> F:
    """Decorate a solver whose first argument is a tensor: one intra-op thread on CPU."""

    @functools.wraps(fn)
    def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            not isinstance(first, Tensor)
            or first.device.type != "cpu"
            or _is_compiling()
            or torch.get_num_threads() == 1
        ):
            return fn(first, *args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(first, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]
