"""Writing the update into ``.grad``: alone, or under `torch.distributed` (rank averaging,
finiteness agreed on every rank, ``no_sync`` accumulation), and the collectives a step needs
before that (agreeing on invalid inputs, averaging a Gramian)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.balancer.guards import SkipStep, nonfinite_params
from gradbalance.balancer.state import StepState
from gradbalance.distributed import MODES, Synchronizer, resolve
from gradbalance.errors import GradBalanceError
from gradbalance.methods import JACOBIAN, Method

__all__ = ["agree", "check_mode", "commit", "finish_gramian", "rank_error", "resolve_sync", "write"]


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is a value of ``distributed=``."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")


def write(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Accumulate ``grads`` into the parameters' ``.grad`` (``None`` entries skipped)."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if g.dtype != p.dtype:
                g = g.to(p.dtype)
            current = p.grad
            if current is None:
                p.grad = g.detach() if g.requires_grad else g
            elif current.layout != torch.strided and g.layout == torch.strided:
                p.grad = g + current  # a sparse .grad cannot take a dense one in place
            else:
                current.add_(g)


def rank_error(failed: list[int]) -> GradBalanceError:
    """The error of the ranks whose own inputs were valid when others' were not."""
    return GradBalanceError(
        f"backward() got invalid inputs on rank(s) {failed} (see the error raised there); "
        "nothing was applied on any rank. Every rank raises at this same step, so a "
        "training loop that catches the error and continues keeps the ranks in step"
    )


def agree(
    sync: Synchronizer, failed_here: bool, placeholder_size: int, device: torch.device
) -> None:
    """Agree with the other ranks on whether some rank's inputs were invalid.

    Sends what the valid ranks send at this point of `backward` (``placeholder_size`` float64
    zeros in place of the losses and KPIs once the tasks are bound), so that the collectives
    match. Returns when every rank's inputs were valid; a rank that failed returns too and
    raises its own error, the others raise an error that names the failing ranks.
    """
    placeholder = []
    if failed_here and placeholder_size:
        placeholder = [torch.zeros(placeholder_size, dtype=torch.float64, device=device)]
    failed = sync.agree_(failed_here, placeholder, device)
    if failed and not failed_here:
        raise rank_error(failed)


def finish_gramian(
    sync: Synchronizer | None,
    gram: Tensor,
    scale: Tensor | None,
    *,
    rank_local: bool,
    samples_per_rank: bool = False,
) -> Tensor:
    """The Gramian every rank uses: averaged over ranks when it was computed from
    rank-local gradients (``samples_per_rank``: from per-rank feature gradients under
    ``"global"``, where the global batch's Gramian is ``Σ_r G_r / R²``), then unscaled."""
    if sync is not None and rank_local:
        sync.mean_([gram])
        if samples_per_rank and sync.exact:
            gram.div_(sync.world_size)
    if scale is not None:
        gram = gram / scale.to(torch.float64) ** 2
    return gram


def commit(
    sync: Synchronizer,
    state: StepState,
    params: list[Tensor],
    grads: list[Tensor | None],
    is_global: list[bool],
    what: str,
    all_params: Callable[[], list[Tensor]],
    label: Callable[[Tensor], str],
) -> None:
    """Average what is still rank-local, check finiteness on every rank alike, write.

    ``is_global[i]`` marks gradients that are already the same on every rank (computed from
    averaged rows). Raises `SkipStep` (on every rank alike) when the update is not finite,
    before anything is written.
    """
    device = params[0].device
    if not state.grad_sync:
        # inside no_sync(): keep the gradients rank-local; agree only on finiteness
        bad = nonfinite_params(params, grads, label)
        if sync.any(bool(bad), device):
            raise SkipStep(f"{what} is not finite in {bad or 'the parameters of another rank'}")
        write(params, grads)
        state.unsynced = True
        return
    grads = list(grads)
    if state.unsynced:
        # fold in the rank-local gradients accumulated inside no_sync(): .grad is linear
        # in the micro-batches, so averaging the sum is exact
        positions = {id(p): i for i, p in enumerate(params)}
        params = list(params)
        for q in all_params():
            if q.grad is None:
                continue
            i = positions.get(id(q))
            if i is None:
                params.append(q)
                grads.append(q.grad.detach().clone())
                positions[id(q)] = len(params) - 1
            else:
                g = grads[i]
                grads[i] = q.grad.detach().clone() if g is None else q.grad + g.to(q.dtype)
        local = list(range(len(params)))
    else:
        local = [i for i, done in enumerate(is_global) if not done]
    reduced = sync.mean([grads[i] for i in local], [params[i] for i in local])
    for i, g in zip(local, reduced):
        grads[i] = g
    bad = nonfinite_params(params, grads, label)
    if bad:
        raise SkipStep(f"{what} is not finite in {bad}")
    if state.unsynced:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g.to(p.dtype).detach()
        state.unsynced = False
    else:
        write(params, grads)


def resolve_sync(mode: str, group: Any, method: Method) -> Synchronizer | None:
    """The synchroniser for ``distributed=`` (resolved on the first backward, when the process
    group exists), checked against the method."""
    sync = resolve(mode, group)
    if sync is not None and not sync.exact and JACOBIAN in method.requires:
        raise ValueError(
            f"method {method.name!r} builds its update from the task gradients "
            "themselves (JACOBIAN), which distributed='local' leaves rank-local; use "
            "distributed='global'"
        )
    return sync
