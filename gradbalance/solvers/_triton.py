# mypy: ignore-errors
"""Triton, when it is installed, for the solvers' kernels (`_frank_wolfe_triton`,
`_min_norm_triton`): the optional import and one cache of jitted kernels.

Without Triton the modules still import (``triton`` and ``tl`` are ``None``) and no kernel is
built. `triton.jit` decides between the compiler and the interpreter (``TRITON_INTERPRET=1``,
how CI runs the kernels on CPU tensors) when it wraps a function, so a kernel is jitted once per
setting.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["jitted", "tl", "triton"]

_KERNELS: dict = {}


def jitted(kernel):
    """``triton.jit(kernel)`` for the current ``TRITON_INTERPRET`` setting (cached)."""
    key = (kernel, bool(triton.knobs.runtime.interpret))
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(kernel)
    return _KERNELS[key]
