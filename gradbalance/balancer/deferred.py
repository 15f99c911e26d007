"""Finiteness checked on the device: a step that reads nothing on the host (``"skip"``) or once
(``"raise"``).

Off the CPU, reading a value on the host (``.item()``, ``.tolist()``, ``bool(tensor)``) waits
for the accelerator to finish everything queued so far. Without a ``GradScaler`` or a process
group, the step pipeline therefore does not *decide* at each check whether a step is finite; it
accumulates one flag on the device, the way ``torch.amp.GradScaler`` does with ``found_inf``:

* every check ORs ``not finite`` into `DeviceSkip.found` instead of raising ``SkipStep``;
* what the method reads is replaced by harmless values when the flag is set (non-finite losses
  by 1, a non-finite Gramian by the identity), so that a solver never sees NaN and never
  raises for a step that is dropped anyway.

Under ``nonfinite="raise"`` the flag is read once, before anything is written (`settle`); when
it is set, the host checks run on the values they would have seen and raise the same error
(naming the task or parameter). Under ``nonfinite="skip"`` it is never read:

* the update is written through a mask: ``.grad += where(found, 0, g)``, so a skipped step
  leaves the values of ``.grad`` as they were (a ``.grad`` that was ``None`` becomes zeros);
* `GradBalancer.step` hands the flag to an inner optimizer that takes ``found_inf`` (fused
  Adam, AdamW, SGD, Adagrad: ``_step_supports_amp_scaling``), whose kernels then leave the
  parameters and their state as they were; any other optimizer costs one host read there.

On the CPU, reading a value costs nothing, and the pipeline keeps the host checks (with the
reason of each skip in the log).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradbalance._torch_compat import HAS_FUSED_NONFINITE_CHECK, fused_nonfinite_flag
from gradbalance.balancer.guards import SkipStep
from gradbalance.balancer.state import StepState
from gradbalance.methods import Method

__all__ = ["DeviceSkip", "accepts_found_inf", "has_update", "step_masked", "wants_device_checks"]

S = TypeVar("S", bound=Sequence[Any])


def wants_device_checks(device: torch.device, forced: bool | None) -> bool:
    """Whether a step on ``device`` checks finiteness on the device (see the module).

    ``forced`` overrides the choice (``True``/``False``); ``None`` takes it from the device:
    every device but the CPU.
    """
    if forced is not None:
        return forced
    return device.type != "cpu"


class DeviceSkip:
    """The non-finite flag of one step, kept on the device.

    Args:
        device: where the step's tensors live.
        raising: under ``nonfinite="raise"``: `settle` reads the flag once before anything is
            written and raises what the first failing host check (`note`) says; under
            ``"skip"`` the flag is never read here and the step is written through it.

    Examples:
        >>> import torch
        >>> skip = DeviceSkip(torch.device("cpu"))
        >>> safe = skip.losses(torch.tensor([1.0, float("nan")], dtype=torch.float64))
        >>> safe.tolist(), bool(skip.found)
        ([1.0, 1.0], True)
    """

    def __init__(self, device: torch.device, raising: bool = False) -> None:
        self.found = torch.zeros((), dtype=torch.bool, device=device)
        self.raising = raising
        self._checks: list[Callable[[], None]] = []

    def note(self, check: Callable[[], None]) -> None:
        """Keep a host check that raises what it finds (``"raise"`` only; run by `settle`)."""
        if self.raising:
            self._checks.append(check)

    def settle(self) -> None:
        """Under ``"raise"``: read the flag (the step's one host read); when set, run the kept
        checks in order, so that the first failing one raises its error (naming the task or
        parameter), as the host checks would have."""
        if not bool(self.found):
            return
        for check in self._checks:
            check()
        raise SkipStep("a loss, gradient or weight of this step is not finite")

    def add(self, bad: Tensor) -> None:
        """OR a flag (any shape with one element, any dtype; non-zero: not finite) into
        `found`, out of place (so that a captured CUDA graph replays it)."""
        self.found = self.found | bad.reshape(()).to(device=self.found.device, dtype=torch.bool)

    def losses(self, detached: Tensor) -> Tensor:
        """Flag non-finite losses; returns them with every non-finite entry replaced by 1."""
        ok = torch.isfinite(detached)
        self.add(~ok.all())
        return torch.where(ok, detached, torch.ones_like(detached))

    def gramian(self, gram: Tensor) -> Tensor:
        """Flag a non-finite Gramian; returns it, or the identity when the step is skipped."""
        self.add(~torch.isfinite(gram).all())
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return torch.where(self.found, eye, gram)

    def tensors(self, tensors: S) -> S:
        """Flag non-finite values in ``tensors`` (``None`` entries skipped), without a host
        read; returns ``tensors``."""
        present = [t for t in tensors if t is not None]
        if not present:
            return tensors
        if HAS_FUSED_NONFINITE_CHECK:
            try:
                self.add(fused_nonfinite_flag(present))
                return tensors
            except (RuntimeError, NotImplementedError):
                pass
        for t in present:
            if t.layout != torch.strided:
                t = t.coalesce().values() if t.layout == torch.sparse_coo else t.values()
            self.add(~torch.isfinite(t).all())
        return tensors

    def weights(self, weights: Tensor) -> Tensor:
        """Flag non-finite weights (the host checks raise `gradbalance.SolverError` for them;
        under ``"skip"`` the step is skipped); returns ``weights``."""
        self.add(~torch.isfinite(weights.detach()).all())
        return weights

    def write(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Accumulate ``grads`` into ``.grad`` unless the step is skipped (``None`` skipped).

        A skipped step adds zeros: the values of ``.grad`` are unchanged, and a ``.grad`` that
        was ``None`` becomes zeros (whether it was set cannot depend on a device value).
        """
        found = self.found
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                masked = _masked(g.detach().to(p.dtype), found)
                current = p.grad
                if current is None:
                    p.grad = masked
                elif current.layout != torch.strided:
                    p.grad = masked + current
                else:
                    current.add_(masked)

    def record(self, state: StepState, weights: Tensor) -> Tensor:
        """Count the step in ``state`` (on the device) and return the weights ``backward``
        returns: NaN when the step is skipped."""
        found = self.found
        count = found.long()
        state.found = found if state.found is None else state.found | found
        skipped = state.device_skipped
        state.device_skipped = count if skipped is None else skipped + count
        return torch.where(found, torch.full_like(weights, math.nan), weights)


def _masked(g: Tensor, found: Tensor) -> Tensor:
    """``g``, or zeros of its layout where ``found`` (sparse: the stored values are masked)."""
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    if g.layout == torch.strided:
        return torch.where(found, zero, g)
    if g.layout == torch.sparse_coo:
        g = g.coalesce()
        values = torch.where(found, zero, g.values())
        return torch.sparse_coo_tensor(
            g.indices(), values, g.shape, is_coalesced=True, check_invariants=False
        )
    return torch.where(found, zero, g.to_dense())  # compressed sparse layouts: rare


def accepts_found_inf(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` attribute without a host read.

    Torch's fused optimizers (``fused=True``: Adam, AdamW, SGD, Adagrad) declare it with
    ``_step_supports_amp_scaling``: their kernels leave the parameters and the state alone
    when ``found_inf`` is 1, and Adam's step count is decremented again. Fused SGD with
    momentum is refused until every momentum buffer exists: its first step allocates the
    buffers uninitialised and lets the kernel fill them, which a skipped step would not do.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group.get("momentum", 0) == 0:
                continue
            for p in group["params"]:
                if optimizer.state.get(p, {}).get("momentum_buffer") is None:
                    return False
    return True


def has_update(method: Method) -> bool:
    """Whether ``method`` commits state in `gradbalance.methods.Method.update`."""
    return type(method).update is not Method.update


def has_masked_update(method: Method) -> bool:
    """Whether ``method`` commits its state through the device's flag without reading it
    (`gradbalance.methods.Method.update_masked`: DWA)."""
    return type(method).update_masked is not Method.update_masked


def step_masked(
    optimizer: Optimizer,
    method: Method,
    state: StepState,
    found: Tensor,
    run_inner: Callable[[], Any],
    closure: bool,
) -> Any:
    """`GradBalancer.step` after backwards skipped (or not) on the device, flag ``found``.

    The inner optimizer gets ``found_inf`` where it takes it (`accepts_found_inf`, no closure):
    no host read. Otherwise, and before a method's state update (its state may live on the
    host: PCGrad's generator), ``found`` is read once on the host; a method that commits
    through the flag (`has_masked_update`: DWA) gets it instead, unread.
    Returns what ``run_inner`` returned (``None`` when the step was skipped on the host).
    """
    pending = list(state.pending)
    state.pending.clear()
    skipped: bool | None = None
    result = None
    if not closure and accepts_found_inf(optimizer):
        optimizer.found_inf = found.to(torch.float32)  # type: ignore[attr-defined]
        try:
            result = run_inner()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    else:
        skipped = bool(found)  # the one host read (an optimizer without found_inf)
        if not skipped:
            result = run_inner()
    if pending and skipped is None and has_masked_update(method):
        for inputs, weights in pending:
            method.update_masked(inputs, weights, found)
    elif pending and has_update(method):
        if skipped is None:
            skipped = bool(found)  # the one host read (a method with state to commit)
        if not skipped:
            for inputs, weights in pending:
                method.update(inputs, weights)
    if pending and not skipped:
        state.steps += 1
        if skipped is None:  # counted; the device knows whether it was skipped
            count = found.long()
            unstepped = state.device_unstepped
            state.device_unstepped = count if unstepped is None else unstepped + count
    return result
