"""Every private torch entry point the package uses, each with its fallback, in one place.

On a torch upgrade, this is the module to audit: each name below says what it is for, what the
private API is, and what happens without it. Every fallback computes the same result through
public API, only slower (or, for the module snapshot and the sparse-node test, with less
information), so a torch release that drops one of them degrades speed, never correctness.

No other module of the package touches ``torch._*``, ``torch._C`` or a private attribute of a
torch object; they import the functions here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "HAS_FUSED_NONFINITE_CHECK",
    "autograd_grad",
    "flatten_dense",
    "fused_nonfinite_flag",
    "module_restore",
    "module_snapshot",
    "saves_sparse_gradient",
    "unflatten_dense",
]

# ---------------------------------------------------------------- flatten / unflatten
# torch's helpers behind DDP's bucketing (``torch._C._nn.flatten_dense_tensors`` and
# ``unflatten_dense_tensors``): a list of tensors into one 1-D tensor and back, in one C++ call
# instead of one Python-level op per tensor (each costs about a microsecond). Without them:
# ``torch.cat`` / ``split`` + ``view``, same values, a few microseconds more per tensor.
_FLATTEN: Callable[..., Tensor] | None = getattr(
    getattr(torch._C, "_nn", None), "flatten_dense_tensors", None
)
_UNFLATTEN: Callable[..., Any] | None = getattr(
    getattr(torch._C, "_nn", None), "unflatten_dense_tensors", None
)


def flatten_dense(tensors: list[Tensor]) -> Tensor:
    """The tensors' entries, one after the other, in one new 1-D tensor (one C++ call).

    Examples:
        >>> import torch
        >>> flatten_dense([torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])])
        tensor([1., 2., 3.])
    """
    if _FLATTEN is not None:
        return _FLATTEN(tensors)
    return torch.cat([t.reshape(-1) for t in tensors])  # pragma: no cover - other torch


def unflatten_dense(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Views of the 1-D ``flat`` shaped as ``like``, in order (one C++ call).

    Examples:
        >>> import torch
        >>> unflatten_dense(torch.arange(3.0), [torch.zeros(2), torch.zeros(1, 1)])
        [tensor([0., 1.]), tensor([[2.]])]
    """
    if _UNFLATTEN is not None:
        return list(_UNFLATTEN(flat, like))
    parts = flat.split([t.numel() for t in like])  # pragma: no cover - other torch
    return [p.view(t.shape) for p, t in zip(parts, like)]  # pragma: no cover


# ---------------------------------------------------------------- autograd.grad without overhead
#: The engine call behind torch.autograd.grad, without its per-call argument handling
#: (``None`` on a torch without it).
_RUN_BACKWARD: Callable[..., tuple[Tensor, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)


def autograd_grad(loss: Tensor, inputs: tuple[Tensor, ...], retain_graph: bool) -> tuple:
    """``torch.autograd.grad(loss, inputs, retain_graph=..., allow_unused=True)`` for a scalar
    loss, calling the autograd engine directly when that is equivalent (plain tensors, no
    ``__torch_function__`` override).

    The public wrapper's argument handling costs tens of microseconds per call, which adds up
    over ``K`` calls a step. The private ``torch.autograd.graph._engine_run_backward`` skips it;
    where it is missing, or its signature changed (a ``TypeError``, after which it is never
    tried again), the public call is used: same gradients.
    """
    global _RUN_BACKWARD
    if _RUN_BACKWARD is not None and not torch.overrides.has_torch_function((loss, *inputs)):
        try:
            return _RUN_BACKWARD(
                (loss,),
                (torch.ones_like(loss),),
                retain_graph,
                False,
                inputs,
                True,
                accumulate_grad=False,
            )
        except TypeError:  # pragma: no cover - the private signature changed: stop using it
            _RUN_BACKWARD = None
    return torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)


# ---------------------------------------------------------------- non-finite check
#: GradScaler's fused kernel (``torch._amp_foreach_non_finite_check_and_unscale_``): one pass
#: over many tensors that sets ``found_inf`` to 1 when one holds a NaN or an infinity. Without
#: it the balancer checks one tensor at a time (``isfinite().all()``): same answer, one kernel
#: per tensor.
_FUSED_NONFINITE_CHECK: Callable[..., None] | None = getattr(
    torch, "_amp_foreach_non_finite_check_and_unscale_", None
)

#: Whether `fused_nonfinite_flag` can run on this torch.
HAS_FUSED_NONFINITE_CHECK = _FUSED_NONFINITE_CHECK is not None


def fused_nonfinite_flag(tensors: list[Tensor]) -> Tensor:
    """1 (float32, on the first tensor's device) when one of ``tensors`` is not finite, else 0.

    GradScaler's fused kernel with ``inv_scale = 1`` (it multiplies in place by it, which
    leaves every value as it is). Raises ``RuntimeError`` / ``NotImplementedError`` where the
    kernel does not apply (sparse or complex tensors, internal overlap such as an expanded
    tensor, several devices) and ``NotImplementedError`` where this torch lacks it
    (`HAS_FUSED_NONFINITE_CHECK`).

    Examples:
        >>> import torch
        >>> fused_nonfinite_flag([torch.ones(2), torch.tensor([float("nan")])])
        tensor([1.])
    """
    if _FUSED_NONFINITE_CHECK is None:  # pragma: no cover - other torch
        raise NotImplementedError("this torch has no fused non-finite check")
    device = tensors[0].device
    found = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        _FUSED_NONFINITE_CHECK(tensors, found, torch.ones(1, dtype=torch.float32, device=device))
    return found


# ---------------------------------------------------------------- autograd node attributes
def saves_sparse_gradient(node: Any) -> bool:
    """Whether an autograd node is an embedding's backward with ``sparse=True``.

    Reads the node's private saved attribute ``_saved_sparse``; without it the answer is
    ``False``, and the error that explains a failed engine on sparse gradients names no
    parameter (the failure itself is unchanged).
    """
    return getattr(node, "_saved_sparse", False) is True


# ---------------------------------------------------------------- nn.Module internals
#: The private containers of `torch.nn.Module` that registering a parameter, buffer or child
#: changes. Without one of them (a torch that renamed it), `module_restore` restores the
#: module's attribute dict only, which still holds the container objects themselves.
_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def module_snapshot(module: nn.Module) -> list[tuple[Any, ...]]:
    """Shallow copies of what registering parameters, buffers or children changes in
    ``module`` and its sub-modules (their attribute dicts and private containers)."""
    out = []
    for m in module.modules():
        containers = [getattr(m, name, None) for name in _MODULE_CONTAINERS]
        copies = [None if c is None else type(c)(c) for c in containers]
        out.append((m, dict(m.__dict__), containers, copies))
    return out


def module_restore(snapshot: list[tuple[Any, ...]]) -> None:
    """Undo what happened to the modules of `module_snapshot` since it was taken."""
    for m, attrs, containers, copies in snapshot:
        m.__dict__.clear()
        m.__dict__.update(attrs)
        for live, saved in zip(containers, copies):
            if live is not None:
                live.clear()
                live.update(saved)
