"""One intra-op thread while a small dense solver runs on CPU, and the caller's setting back after.

The problems are K x K with K rarely above a hundred: starting the intra-op thread pool for each
of their tiny batched factorisations costs far more than the arithmetic, and on a busy machine
(other processes on the cores) a multi-threaded call can wait milliseconds for a thread
(measured here: a batched `torch.linalg.solve_ex` on 4 x 4 systems took 0.5 ms with two threads
and 0.008 ms with one).

`single_thread_for` is the one context manager that does it: it sets one thread only where that
helps (a CPU tensor, eager mode, more than one thread set) and restores on exit exactly what it
changed, also when the body raises. `cpu_single_thread` wraps a solver entry point in it (every
public solver of the package uses it); nested solver calls see one thread already and change
nothing. Under `torch.compile` nothing is touched (the traced code must not change process state).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["cpu_single_thread", "is_compiling", "single_thread_for"]

F = TypeVar("F", bound=Callable[..., Any])


def is_compiling() -> bool:
    """Whether `torch.compile` is tracing (``False`` on torch without `torch.compiler`)."""
    compiler = getattr(torch, "compiler", None)
    compiling = getattr(compiler, "is_compiling", None)
    return bool(compiling()) if callable(compiling) else False


class single_thread_for:
    """Context manager: one intra-op thread while solving on ``data``, where that helps.

    It changes the setting only when ``data`` is a CPU tensor, `torch.compile` is not tracing
    and more than one thread is set; on exit it restores the number of threads it found, and
    only if it changed it (so a caller that set one thread, or data on another device, see no
    call to `torch.set_num_threads` at all).

    Examples:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with single_thread_for(torch.zeros(3)):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """

    __slots__ = ("_data", "_restore")

    def __init__(self, data: object) -> None:
        self._data = data
        self._restore = 0  # the thread count to put back on exit; 0: nothing was changed

    def __enter__(self) -> None:
        data = self._data
        if isinstance(data, Tensor) and data.device.type == "cpu" and not is_compiling():
            threads = torch.get_num_threads()
            if threads != 1:
                torch.set_num_threads(1)
                self._restore = threads

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._restore:
            torch.set_num_threads(self._restore)
            self._restore = 0


def cpu_single_thread(fn: F) -> F:
    """Run the solver ``fn`` inside `single_thread_for` its first argument (its input tensor)."""

    @functools.wraps(fn)
    def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
        with single_thread_for(first):
            return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
