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
in `StepPipeline.run`; nothing has been written by then. Off the CPU
(`gradbalance.balancer.deferred`) the same checks OR a flag on the device instead: under
``"skip"`` the commit writes through it, under ``"raise"`` it is read once before the write. The
method's state update is only recorded here (``pending``) and applied by ``GradBalancer.step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from gradbalance._linalg import gramian
from gradbalance.balancer.commit import commit, finish_gramian, rank_error, write
from gradbalance.balancer.context import StepContext, Update
from gradbalance.balancer.deferred import DeviceSkip, wants_device_checks
from gradbalance.balancer.guards import (
    SkipStep,
    apply_policy,
    check_weights,
    checked_direction,
    nonfinite_params,
    nonfinite_tasks,
)
from gradbalance.balancer.inputs import on_device, stack_losses, weighted_sum
from gradbalance.balancer.parameters import ParameterSet, check_reached
from gradbalance.balancer.state import StepState
from gradbalance.engine import EngineChoice, Request, RowsHook, TaskGradients, objective_gradients
from gradbalance.errors import UnreachedParameterError
from gradbalance.methods import JACOBIAN, LAST_SHARED_GRAMIAN, Method, StepInputs

__all__ = ["StepContext", "StepPipeline", "Update"]

T = TypeVar("T")


class StepPipeline:
    """The stages of one balanced `backward` (see the module docstring).

    Args:
        method: the balancing method.
        params: the balancer's `ParameterSet`.
        engines: the balancer's `gradbalance.engine.EngineChoice`.
        state: the balancer's `StepState`.
        policy: ``nonfinite=``: ``"raise"`` or ``"skip"``.

    Attributes:
        device_checks: ``None`` (default): check finiteness on the device everywhere but on the
            CPU (`gradbalance.balancer.deferred`: no host read under ``nonfinite="skip"``, one
            under ``"raise"``); ``True`` or ``False`` forces the choice (tests use ``True`` to
            run that path on the CPU).
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
        self.device_checks: bool | None = None
        self._mask: DeviceSkip | None = None

    def run(self, ctx: StepContext) -> Tensor:
        """Balance one step; returns the weights in the order of the call (NaN if skipped)."""
        device = ctx.losses[0].device
        self._mask = (
            DeviceSkip(device, raising=self.policy == "raise")
            if ctx.scale is None
            and ctx.sync is None
            and wants_device_checks(device, self.device_checks)
            else None
        )
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
            weights = on_device(method.weights(inputs), detached.device)
            self._check_weights(weights, len(ctx.tasks))
            update = self._loss_update(ctx, inputs, weights, stacked)
            gram = None
        else:
            request, engine, result, inputs = self._measure_gradients(ctx, detached, kpis)
            weights = on_device(method.weights(inputs).detach(), detached.device)
            self._check_weights(weights, len(ctx.tasks))
            update = self._gradient_update(ctx, request, engine, result, inputs, weights)
            gram = inputs.gramian
        self._commit(ctx, update)
        return inputs, weights, gram

    def _check_weights(self, weights: Tensor, k: int) -> None:
        check_weights(weights, k, finite=self._mask is None)
        if self._mask is not None:
            self._guard(lambda: check_weights(weights, k), weights, DeviceSkip.weights)

    def _guard(self, check: Callable[[], None], value: T, flag: Callable[[DeviceSkip, T], T]) -> T:
        """Run a host check now; or, under the device checks, flag ``value`` on the device
        (returning what ``flag`` returns) and keep ``check`` to name what a raised flag found."""
        if self._mask is None:
            check()
            return value
        self._mask.note(check)
        return flag(self._mask, value)

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

        def check(values: Tensor = detached) -> None:
            # one host transfer of K numbers, checked in Python (cheaper than isfinite + all)
            bad = [ctx.tasks[i] for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
            if bad:
                where = " (on some rank)" if sync is not None else ""
                raise SkipStep(f"the loss of task(s) {bad} is not finite{where}")

        return stacked, self._guard(check, detached, DeviceSkip.losses), kpis

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

            def check(g: Tensor = last_gram) -> None:
                if bad := nonfinite_tasks(g, ctx.tasks):
                    raise SkipStep(
                        f"the gradient of task(s) {bad} on the last shared layer is not finite"
                    )

            last_gram = self._guard(check, last_gram, DeviceSkip.gramian)
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

        def check_gram(g: Tensor = gram) -> None:
            if bad := nonfinite_tasks(g, ctx.tasks):
                raise SkipStep(
                    f"the gradient of task(s) {bad} on the shared "
                    f"{'features' if representation else 'parameters'} is not finite"
                )

        def check_others() -> None:
            if bad := nonfinite_params(others, result.others, params.label):
                raise SkipStep(f"the gradient of the {', '.join(bad)} is not finite")

        gram = self._guard(check_gram, gram, DeviceSkip.gramian)
        if sync is None and result.has_jacobian:
            self._guard(check_others, result.others, DeviceSkip.tensors)
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

        def check() -> None:
            if bad := nonfinite_params(shared, update, self.params.label):
                raise SkipStep(f"the trunk gradient is not finite in {bad}")

        if self.engines.name == "representation" and ctx.sync is None:
            self._guard(check, update, DeviceSkip.tensors)
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

        def check() -> None:
            if bad := nonfinite_params(update.params, update.grads, self.params.label):
                if update.source == "loss":
                    raise SkipStep(
                        f"the gradient of the weighted loss is not finite in {bad} although "
                        f"every loss of {list(ctx.tasks)} is finite"
                    )
                raise SkipStep(f"the balanced gradient is not finite in {bad}")

        if update.source != "gradient":
            self._guard(check, update.grads, DeviceSkip.tensors)
        mask = self._mask
        if mask is not None and not mask.raising:
            mask.write(update.params, update.grads)
            return
        if mask is not None:
            mask.settle()  # "raise": the one host read, before anything is written
        write(update.params, update.grads)

    # ------------------------------------------------------------------ the end
    def _finish(
        self, inputs: StepInputs, weights: Tensor, call_order: list[int], gram: Tensor | None
    ) -> Tensor:
        state = self.state
        w = weights.detach() if weights.requires_grad else weights
        state.pending.append((inputs, w))
        if self._mask is not None and not self._mask.raising:  # skipped on the device: NaN
            w = self._mask.record(state, w)
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


def _unscaled_rows(result: TaskGradients, scale: Tensor | None) -> tuple[Tensor | None, ...]:
    """The Jacobian rows for methods that read them, without the AMP scale."""
    rows = result.rows
    if scale is None:
        return tuple(rows)
    return tuple(None if r is None else r / scale.to(r.dtype) for r in rows)
