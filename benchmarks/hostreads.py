"""Count the host reads of tensor values (each one a host synchronisation on an accelerator).

On CUDA, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``, a copy
to the CPU, an operation whose output shape depends on the values such as ``nonzero``) waits
for every kernel queued before it. `HostReads` is a ``TorchFunctionMode`` that counts those
calls by where they were made, so that the count can be checked on the CPU too, where they
cost nothing. It sees what goes through ``torch``'s Python API; a copy made by a kernel that
reads a device value internally (none in gradbalance's step) is out of its sight, which
`torch.cuda.set_sync_debug_mode` covers on a GPU.

Example:
    >>> import torch
    >>> with HostReads() as reads:
    ...     _ = torch.ones(2).sum().item()
    >>> reads.total
    1
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HOST_READS", "HostReads"]

_T = torch.Tensor

#: The functions that read a tensor's values on the host.
HOST_READS: frozenset[Callable[..., Any]] = frozenset(
    {
        _T.item,
        _T.tolist,
        _T.__bool__,
        _T.__float__,
        _T.__int__,
        _T.__index__,
        _T.__complex__,
        _T.cpu,
        _T.numpy,
        _T.nonzero,
        torch.nonzero,
        _T.masked_select,
        torch.masked_select,
        torch.unique,
        torch.equal,
        torch.allclose,
        _T.__array__,
    }
)


def _is_read(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func in HOST_READS:
        return True
    if func is _T.to and args and isinstance(args[0], _T) and args[0].device.type != "cpu":
        # a copy to the CPU of a tensor that lives elsewhere (``.to(device)`` on the CPU
        # proxy cannot tell the CPU named as "the tensors' device" from a copy to the host)
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
    if func is _T.__getitem__ and len(args) > 1:
        index = args[1]
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, _T) and p.dtype == torch.bool for p in parts)
    return False


class HostReads(TorchFunctionMode):
    """Count host reads of tensor values, by the innermost frame whose file matches ``where``.

    Args:
        where: a path fragment; a read is charged to the innermost stack frame whose file
            name contains it (``"?"`` if none does), as ``"file:line"`` below that fragment.

    Attributes:
        hits: ``{(function name, "file:line"): count}``.
    """

    def __init__(self, where: str = "gradbalance/") -> None:
        super().__init__()
        self.where = where
        self.hits: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if _is_read(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if self.where in f.filename]
            if frames:
                f = frames[-1]
                site = f"{f.filename.split(self.where, 1)[-1]}:{f.lineno}"
            else:
                site = "?"
            self.hits[(getattr(func, "__name__", str(func)), site)] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """All the reads counted."""
        return sum(self.hits.values())

    def outside(self, *prefixes: str) -> dict[tuple[str, str], int]:
        """The reads whose site does not start with one of ``prefixes``."""
        return {k: v for k, v in self.hits.items() if not k[1].startswith(prefixes)}
