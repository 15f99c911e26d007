"""What a step refuses: non-finite losses, gradients and weights, malformed method output.

A check that finds a non-finite value raises `SkipStep` wherever it runs in the step pipeline;
the pipeline catches it in one place and applies the policy (`apply_policy`): under a
``GradScaler`` the overflow is handed to the scaler, with ``nonfinite="skip"`` the step is
skipped and counted, else `gradbalance.NonFiniteError` is raised. Nothing has been written into
``.grad`` when `SkipStep` is raised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from gradbalance import _graph
from gradbalance._torch_compat import HAS_FUSED_NONFINITE_CHECK, fused_nonfinite_flag
from gradbalance.balancer.parameters import ParameterSet
from gradbalance.errors import GradBalanceError, NonFiniteError, SolverError
from gradbalance.methods import Method, StepInputs

__all__ = [
    "POLICIES",
    "SkipStep",
    "all_finite",
    "apply_policy",
    "check_policy",
    "check_weights",
    "checked_direction",
    "explain_sparse_failure",
    "nonfinite_params",
    "nonfinite_tasks",
]

logger = logging.getLogger("gradbalance.balancer")

#: The values of ``nonfinite=``.
POLICIES = ("raise", "skip")


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is a value of ``nonfinite=``."""
    if policy not in POLICIES:
        raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")


class SkipStep(Exception):
    """A loss, gradient or update of this step is not finite; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def apply_policy(skip: SkipStep, policy: str, scale: Tensor | None, target: Tensor) -> bool:
    """Apply the non-finite policy to a refused step.

    Returns whether the step counts as skipped (``nonfinite="skip"``); under a GradScaler
    (``scale`` given) marks ``target``'s gradient infinite so that ``scaler.step()`` skips the
    inner step and ``scaler.update()`` lowers the scale, and returns false; else raises
    `gradbalance.NonFiniteError`.
    """
    if scale is not None:
        # under a GradScaler an overflow is expected
        inf = torch.full_like(target, math.inf)
        target.grad = inf if target.grad is None else target.grad.add_(inf)
        return False
    if policy == "skip":
        logger.warning("gradbalance: skipping the step: %s", skip.reason)
        return True
    raise NonFiniteError(
        f"{skip.reason}; nothing was applied. Lower the learning rate, check the data, or "
        "build the balancer with nonfinite='skip' to skip such steps"
    )


def finite_view(t: Tensor) -> Tensor:
    """The values whose finiteness decides ``t``'s: the stored values of a sparse tensor
    (coalesced, so that duplicate entries are checked as summed), else ``t`` itself."""
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()  # compressed sparse layouts (CSR, CSC, BSR, BSC)


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every tensor (``None`` skipped) is free of NaN and infinities, with one host sync.

    GradScaler's fused kernel checks all the tensors in one call, with ``inv_scale = 1`` (the
    kernel multiplies in place by it, which leaves every value as it is). Where it refuses the
    list (an expanded or sparse tensor, complex dtypes, several devices), the dense
    contiguous floating-point tensors are checked one fused call per (device, dtype) group and
    the others by their own ``isfinite().all()``.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return True
    if HAS_FUSED_NONFINITE_CHECK:
        try:
            return not bool(fused_nonfinite_flag(present))
        except (RuntimeError, NotImplementedError):
            pass
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    flags: list[Tensor] = []
    for t in present:
        if (
            HAS_FUSED_NONFINITE_CHECK
            and t.layout == torch.strided
            and t.is_floating_point()
            and t.is_contiguous()
        ):
            groups.setdefault((t.device, t.dtype), []).append(t)
        else:
            flags.append(torch.isfinite(finite_view(t)).all().logical_not().to(torch.float32).cpu())
    for group in groups.values():
        try:
            found = fused_nonfinite_flag(group)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - kernel unavailable
            found = torch.stack([torch.isfinite(t).all().logical_not() for t in group]).any()
        flags.append(found.reshape(()).to(torch.float32).cpu())
    return not bool(torch.stack(flags).any())


def nonfinite_tasks(gram: Tensor, tasks: tuple[str, ...]) -> list[str]:
    """The tasks whose own gradient is not finite: ``G_ii = ‖g_i‖²`` (a NaN in ``g_i``
    spreads through row and column ``i`` of ``G`` to every task, but only ``G_ii`` is
    task ``i``'s own); every task with a non-finite row if the diagonal is finite."""
    if math.isfinite(gram.sum().item()):  # a finite sum has only finite terms
        return []
    own_ok = torch.isfinite(torch.diagonal(gram))
    if bool(own_ok.all()):
        own_ok = torch.isfinite(gram).all(dim=1)
    return [tasks[i] for i, ok in enumerate(own_ok.tolist()) if not ok]


def nonfinite_params(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], label: Callable[[Tensor], str]
) -> list[str]:
    """The labels of the parameters whose gradient in ``grads`` is not finite."""
    if all_finite(grads):
        return []
    # rare path: name the offending tensors one by one
    checks = [(i, g) for i, g in enumerate(grads) if g is not None]
    flags = torch.stack([torch.isfinite(finite_view(g)).all() for _, g in checks])
    if bool(flags.all()):
        return []
    return [label(params[i]) for (i, _), ok in zip(checks, flags.tolist()) if not ok]


def check_weights(weights: Tensor, k: int, *, finite: bool = True) -> None:
    """Raise `SolverError` unless the method returned ``k`` weights, finite (one host read)
    unless ``finite`` is false."""
    if not isinstance(weights, Tensor) or weights.shape != (k,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise SolverError(f"the method returned weights of shape {shape}, expected ({k},)")
    if finite and not all(math.isfinite(v) for v in weights.detach().tolist()):
        raise SolverError(
            f"the method returned non-finite weights {weights.detach().tolist()}; "
            "nothing was applied"
        )


def checked_direction(
    method: Method,
    inputs: StepInputs,
    weights: Tensor,
    rows: Sequence[Tensor | None],
    scale: Tensor | None,
) -> list[Tensor | None]:
    """The method's own update from the (unscaled) rows, checked and rescaled for AMP."""
    combined = list(method.combine(inputs, weights))
    if len(combined) != len(rows):
        raise SolverError(
            f"method {method.name!r} combined {len(combined)} tensors, expected {len(rows)}"
        )
    out: list[Tensor | None] = []
    for i, (c, r) in enumerate(zip(combined, rows)):
        if r is None or c is None:
            out.append(None if r is None else torch.zeros_like(r[0]))
            continue
        if c.shape != r.shape[1:]:
            raise SolverError(
                f"method {method.name!r} returned shape {tuple(c.shape)} for shared tensor "
                f"{i}, expected {tuple(r.shape[1:])}"
            )
        c = c.detach().to(r.dtype)
        if not bool(torch.isfinite(c).all()):
            raise SolverError(
                f"method {method.name!r} returned a non-finite update for shared tensor {i}"
            )
        out.append(c if scale is None else c * scale.to(c.dtype))
    return out


def explain_sparse_failure(
    method: Method, engine: str, params: ParameterSet, losses: list[Tensor], exc: BaseException
) -> None:
    """After the engine failed: raise a clear error if a parameter whose per-task gradients
    the engine stacks receives sparse gradients (``nn.Embedding(sparse=True)``)."""
    if not method.is_gradient_method() or engine == "representation":
        return
    label: Callable[[Tensor], str] = params.label
    shared = params.shared
    sparse = _graph.sparse_gradient_leaves(losses)
    named = [label(p) for p in shared if id(p) in sparse]
    if named:
        raise GradBalanceError(
            f"{', '.join(named)} receives sparse gradients (nn.Embedding(sparse=True)?), "
            f"but method {method.name!r} needs the dense per-task gradients of the "
            "shared parameters; build it with sparse=False, leave it out of shared=..., or "
            "use a loss weighting method (task-specific sparse parameters are fine)"
        ) from exc
    if engine == "batched":
        shared_ids = {id(p) for p in shared}
        others = [
            label(p)
            for p in params.optimizer_params()
            if id(p) not in shared_ids and id(p) in sparse
        ]
        if others:
            raise GradBalanceError(
                f"{', '.join(others)} receive(s) sparse gradients, which engine='batched' "
                "(vmap) cannot compute; use engine='loop' or 'auto'"
            ) from exc
