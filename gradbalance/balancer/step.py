"""The step pipeline: one path from the losses to ``.grad`` for every method and engine.

``GradBalancer.backward`` validates the inputs and hands a `StepContext` to `StepPipeline.run`,
which goes through the same stages whatever the method:

1. **losses**: stacked once (float64 copy), averaged over ranks, checked finite;
2. **measure** what the method reads: nothing more for a loss weighting (or the Gramian of the
   last shared layer, GradNorm), the engine's `gradbalance.engine.TaskGradients` and its
   Gramian for a gradient method; checked finite;
3. **weights** from the method (``StepInputs`` → ``method.weights``), checked;
4. **update**: the gradient of ``Σ_i w_i L_i`` (loss weightings) or the engine's update
   (``Jᵀw``, the method's own combination, or the trunk backward of the representation
   engine), as an `Update`;
5. **commit**: averaged over ranks and checked on every rank alike, or checked and written.

A non-finite value found at any stage raises `gradbalance.balancer.guards.SkipStep`, caught once
in `StepPipeline.run`; nothing has been written by then. The method's state update is only
recorded here (``pending``) and applied by ``GradBalancer.step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from gradbalance import _graph
from gradbalance._linalg import gramian
from gradbalance.balancer.commit import commit, finish_gramian, rank_error, write
from gradbalance.balancer.guards import (
    SkipStep,
    apply_policy,
    check_weights,
    checked_direction,
    nonfinite_params,
    nonfinite_tasks,
)
from gradbalance.balancer.inputs import stack_losses, weighted_sum
from gradbalance.balancer.parameters import ParameterSet, check_reached
from gradbalance.balancer.state import StepState
from gradbalance.distributed import Synchronizer
from gradbalance.engine import EngineChoice, Request, RowsHook, TaskGradients, objective_gradients
from gradbalance.errors import GradBalanceError, UnreachedParameterError
from gradbalance.methods import JACOBIAN, LAST_SHARED_GRAMIAN, Method, StepInputs

__all__ = ["StepContext", "StepPipeline", "Update"]


class StepContext(NamedTuple):
    """One `backward` call's validated inputs.

    Attributes:
        tasks: the task names, in the balancer's order.
        losses: the losses in that order (unscaled).
        call_order: for each loss of the call, its index in ``tasks`` order.
        kpis: the KPIs (DTP) or ``None``.
        features: the features passed to `backward` that the engine uses (may be empty).
        scale: the GradScaler's scale, or ``None``.
        retain_graph: keep the graph after the step's last backward.
        sync: the synchroniser, or ``None`` without a process group.
        bound: the tasks were bound before this call (not its first step).
    """

    tasks: tuple[str, ...]
    losses: list[Tensor]
    call_order: list[int]
    kpis: Tensor | None
    features: list[Tensor]
    scale: Tensor | None
    retain_graph: bool
    sync: Synchronizer | None
    bound: bool


class Update(NamedTuple):
    """What stage 4 produced: the gradients to write.

    Attributes:
        params: the tensors whose ``.grad`` receives ``grads``.
        grads: one gradient per tensor (``None``: nothing to add).
        is_global: per tensor, whether its gradient is already the same on every rank.
        source: ``"loss"`` (the gradient of the weighted loss), ``"gradient"`` (an update
            from checked Jacobian rows: without a process group, nothing is left to check) or
            ``"memory"`` (one weighted backward). It decides the checks and their messages,
            which are built only when a check fails.
    """

    params: list[Tensor]
    grads: list[Tensor | None]
    is_global: list[bool]
    source: str


class StepPipeline:
    """The stages of one balanced `backward` (see the module docstring).

    Args:
        method: the balancing method.
        params: the balancer's `ParameterSet`.
        engines: the balancer's `gradbalance.engine.EngineChoice`.
        state: the balancer's `StepState`.
        policy: ``nonfinite=``: ``"raise"`` or ``"skip"``.
    """

    def __init__(
        self,
        method: Method,
        params: ParameterSet,
        engines: EngineChoice,
        state: StepState,
        policy: str,
    ) -> None:
        self.method = method
        self.params = params
        self.engines = engines
        self.state = state
        self.policy = policy

    def run(self, ctx: StepContext) -> Tensor:
        """Balance one step; returns the weights in the order of the call (NaN if skipped)."""
        try:
            inputs, weights, gram = self._stages(ctx)
        except SkipStep as skip:
            return self._skip(skip, ctx)
        return self._finish(inputs, weights, ctx.call_order, gram)

    def _stages(self, ctx: StepContext) -> tuple[StepInputs, Tensor, Tensor | None]:
        method = self.method
        loss_only = not method.is_gradient_method()
        stacked, detached, kpis = self._losses(ctx, differentiable=loss_only)
        if loss_only:
            inputs = self._measure_last_layer(ctx, detached, kpis)
            weights = method.weights(inputs)
            check_weights(weights, len(ctx.tasks))
            update = self._loss_update(ctx, inputs, weights, stacked)
            gram = None
        else:
            request, engine, result, inputs = self._measure_gradients(ctx, detached, kpis)
            weights = method.weights(inputs).detach()
            check_weights(weights, len(ctx.tasks))
            update = self._gradient_update(ctx, request, engine, result, inputs, weights)
            gram = inputs.gramian
        self._commit(ctx, update)
        return inputs, weights, gram

    # ------------------------------------------------------------------ 1. losses
    def _losses(
        self, ctx: StepContext, differentiable: bool
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        stacked, detached = stack_losses(ctx.losses, differentiable=differentiable)
        kpis = ctx.kpis
        sync = ctx.sync
        if sync is not None:
            # every rank must take the same branch below: decide on the global losses. Past the
            # first step the ranks also agree here, in the same all-reduce, that every rank's
            # inputs were valid (a rank with invalid inputs sends zeros and its flag)
            reduced = [detached]
            if kpis is not None:
                kpis_here = kpis.to(device=detached.device, dtype=torch.float64, copy=True)
                reduced.append(kpis_here)
            if ctx.bound:
                failed = sync.agree_(False, reduced, detached.device)
                if failed:
                    raise rank_error(failed)
            else:
                sync.mean_(reduced)
            if kpis is not None:
                kpis = kpis_here.to(kpis.device)
        # one host transfer of K numbers, checked in Python (cheaper than isfinite + all)
        bad = [ctx.tasks[i] for i, v in enumerate(detached.tolist()) if not math.isfinite(v)]
        if bad:
            where = " (on some rank)" if sync is not None else ""
            raise SkipStep(f"the loss of task(s) {bad} is not finite{where}")
        return stacked, detached, kpis

    # ------------------------------------------------------------------ 2. measure
    def _rows_hook(self, ctx: StepContext) -> RowsHook | None:
        """Under ``distributed="global"``: the global batch's Jacobian is the mean of the
        ranks' Jacobians."""
        sync = ctx.sync
        if sync is None or not sync.exact:
            return None
        k = len(ctx.tasks)
        return lambda rows, tensors: sync.mean(rows, tensors, (k,))

    def _scaled(self, ctx: StepContext) -> list[Tensor]:
        if ctx.scale is None:
            return ctx.losses
        return [loss * ctx.scale.to(loss.dtype) for loss in ctx.losses]

    def _measure_last_layer(
        self, ctx: StepContext, detached: Tensor, kpis: Tensor | None
    ) -> StepInputs:
        last_gram = None
        if LAST_SHARED_GRAMIAN in self.method.requires:
            request = Request(
                self._scaled(ctx), self.params.last_shared, rows_hook=self._rows_hook(ctx)
            )
            result = self.engines.for_last_layer(request)
            sync = ctx.sync
            last_gram = finish_gramian(
                sync,
                gramian(result.rows, len(ctx.tasks)),
                ctx.scale,
                rank_local=sync is not None and not sync.exact,
            )
            bad = nonfinite_tasks(last_gram, ctx.tasks)
            if bad:
                raise SkipStep(
                    f"the gradient of task(s) {bad} on the last shared layer is not finite"
                )
        return StepInputs(
            tasks=ctx.tasks,
            losses=detached,
            last_shared_gramian=last_gram,
            kpis=kpis,
            step=self.state.steps,
        )

    def _measure_gradients(
        self, ctx: StepContext, detached: Tensor, kpis: Tensor | None
    ) -> tuple[Request, object, TaskGradients, StepInputs]:
        k = len(ctx.tasks)
        params = self.params
        shared = params.shared
        shared_ids = {id(p) for p in shared}
        others = [
            p for p in params.optimizer_params() if p.requires_grad and id(p) not in shared_ids
        ]
        representation = self.engines.name == "representation"
        if not representation and not shared:
            raise UnreachedParameterError("no shared parameter requires grad")
        request = Request(
            self._scaled(ctx),
            shared,
            others,
            features=ctx.features,
            retain_graph=ctx.retain_graph,
            rows_hook=None if representation else self._rows_hook(ctx),
            tasks=ctx.tasks,
            label=params.label,
        )
        engine, result = self.engines.compute(request)
        if not representation:
            check_reached(shared, result.reached, params.label)
        sync = ctx.sync
        gram = finish_gramian(
            sync,
            result.gramian(k),
            ctx.scale,
            rank_local=sync is not None and (representation or not sync.exact),
            # feature gradients of different ranks belong to different samples:
            # G = Σ_r G_r / R², the Gramian of the global batch's mean loss
            samples_per_rank=representation,
        )
        bad = nonfinite_tasks(gram, ctx.tasks)
        if bad:
            raise SkipStep(
                f"the gradient of task(s) {bad} on the shared "
                f"{'features' if representation else 'parameters'} is not finite"
            )
        if sync is None and result.has_jacobian:
            bad = nonfinite_params(others, result.others, params.label)
            if bad:
                raise SkipStep(f"the gradient of the {', '.join(bad)} is not finite")
        inputs = StepInputs(
            tasks=ctx.tasks,
            losses=detached,
            gramian=gram,
            kpis=kpis,
            step=self.state.steps,
            jacobian=_unscaled_rows(result, ctx.scale)
            if JACOBIAN in self.method.requires
            else None,
        )
        return request, engine, result, inputs

    # ------------------------------------------------------------------ 4. update
    def _loss_update(
        self, ctx: StepContext, inputs: StepInputs, weights: Tensor, stacked: Tensor | None
    ) -> Update:
        objective = weighted_sum(weights, ctx.losses, stacked)
        extra = self.method.extra_loss(inputs)
        if extra is not None:
            objective = objective + extra
        if ctx.scale is not None:
            objective = objective * ctx.scale.to(objective.dtype)
        params = [p for p in self.params.optimizer_params() if p.requires_grad]
        grads = objective_gradients(objective, params, retain_graph=ctx.retain_graph)
        return Update(params, grads, [False] * len(params), "loss")

    def _gradient_update(
        self,
        ctx: StepContext,
        request: Request,
        engine: object,
        result: TaskGradients,
        inputs: StepInputs,
        weights: Tensor,
    ) -> Update:
        direction = None
        if inputs.jacobian is not None:
            direction = checked_direction(self.method, inputs, weights, result.rows, ctx.scale)
        update = engine.update(request, result, weights, direction)  # type: ignore[attr-defined]
        shared, others = list(request.shared), list(request.others)
        if self.engines.name == "representation" and ctx.sync is None:
            bad = nonfinite_params(shared, update, self.params.label)
            if bad:
                raise SkipStep(f"the trunk gradient is not finite in {bad}")
        # the update is the same on every rank where it comes from the averaged rows
        is_global = request.rows_hook is not None and result.has_jacobian
        return Update(
            [*shared, *others],
            [*update, *result.others],
            [is_global] * len(shared) + [False] * len(others),
            "gradient" if result.has_jacobian else "memory",
        )

    # ------------------------------------------------------------------ 5. commit
    def _commit(self, ctx: StepContext, update: Update) -> None:
        if ctx.sync is not None:
            what = (
                f"the gradient of the weighted loss of {list(ctx.tasks)}"
                if update.source == "loss"
                else "the balanced gradient"
            )
            commit(
                ctx.sync,
                self.state,
                update.params,
                update.grads,
                update.is_global,
                what,
                self.params.optimizer_params,
                self.params.label,
            )
            return
        if update.source != "gradient":
            bad = nonfinite_params(update.params, update.grads, self.params.label)
            if bad:
                if update.source == "loss":
                    raise SkipStep(
                        f"the gradient of the weighted loss is not finite in {bad} although "
                        f"every loss of {list(ctx.tasks)} is finite"
                    )
                raise SkipStep(f"the balanced gradient is not finite in {bad}")
        write(update.params, update.grads)

    # ------------------------------------------------------------------ the end
    def _finish(
        self, inputs: StepInputs, weights: Tensor, call_order: list[int], gram: Tensor | None
    ) -> Tensor:
        state = self.state
        w = weights.detach() if weights.requires_grad else weights
        state.pending.append((inputs, w))
        state.last_weights = w  # `last_weights` converts (and copies) on access
        state.last_losses = inputs.losses
        state.last_gramian = gram
        if call_order == list(range(len(call_order))):
            return w.to(torch.get_default_dtype(), copy=True)
        return w[call_order].to(torch.get_default_dtype())

    def _skip(self, skip: SkipStep, ctx: StepContext) -> Tensor:
        nan = torch.full((len(ctx.call_order),), math.nan)
        shared = self.params.shared
        target = shared[0] if shared else self.params.optimizer_params()[0]
        if apply_policy(skip, self.policy, ctx.scale, target):
            self.state.skipped += 1
            self.state.skip_next_step = True
        self.state.last_weights = nan
        return nan

    # ------------------------------------------------------------------ errors
    def explain_failure(self, losses: list[Tensor], exc: BaseException) -> None:
        """After the engine failed: raise a clear error if a parameter whose per-task gradients
        the engine stacks receives sparse gradients (``nn.Embedding(sparse=True)``)."""
        if not self.method.is_gradient_method() or self.engines.name == "representation":
            return
        label: Callable[[Tensor], str] = self.params.label
        shared = self.params.shared
        sparse = _graph.sparse_gradient_leaves(losses)
        named = [label(p) for p in shared if id(p) in sparse]
        if named:
            raise GradBalanceError(
                f"{', '.join(named)} receives sparse gradients (nn.Embedding(sparse=True)?), "
                f"but method {self.method.name!r} needs the dense per-task gradients of the "
                "shared parameters; build it with sparse=False, leave it out of shared=..., or "
                "use a loss weighting method (task-specific sparse parameters are fine)"
            ) from exc
        if self.engines.name == "batched":
            shared_ids = {id(p) for p in shared}
            others = [
                label(p)
                for p in self.params.optimizer_params()
                if id(p) not in shared_ids and id(p) in sparse
            ]
            if others:
                raise GradBalanceError(
                    f"{', '.join(others)} receive(s) sparse gradients, which engine='batched' "
                    "(vmap) cannot compute; use engine='loop' or 'auto'"
                ) from exc


def _unscaled_rows(result: TaskGradients, scale: Tensor | None) -> tuple[Tensor | None, ...]:
    """The Jacobian rows for methods that read them, without the AMP scale."""
    rows = result.rows
    if scale is None:
        return tuple(rows)
    return tuple(None if r is None else r / scale.to(r.dtype) for r in rows)
