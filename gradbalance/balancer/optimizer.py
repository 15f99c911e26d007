"""`GradBalancer`: the ``torch.optim`` face users hold.

It validates the constructor's arguments and `backward`'s inputs, and shares the inner
optimizer's ``param_groups``, ``state`` and ``defaults``; the work of a step happens in
`gradbalance.balancer.step` (one pipeline for every method and engine), the engine choice in
`gradbalance.engine.EngineChoice`, and `step` steps the inner optimizer, then commits the
method's own state update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gradbalance import distributed as _distributed
from gradbalance.balancer import binding, checkpoint, deferred, inputs
from gradbalance.balancer.commit import agree, check_mode, resolve_sync
from gradbalance.balancer.guards import check_policy, explain_sparse_failure
from gradbalance.balancer.parameters import ParameterSet, check_declared
from gradbalance.balancer.proxy import InnerOptimizerProxy
from gradbalance.balancer.readout import BalancerReadout
from gradbalance.balancer.state import StepState
from gradbalance.balancer.step import StepContext, StepPipeline
from gradbalance.engine import (
    DEFAULT_MEMORY_THRESHOLD,
    EngineChoice,
    check_request,
    check_threshold,
)
from gradbalance.errors import GradBalanceError
from gradbalance.methods import FEATURES, JACOBIAN, KPIS, Method

__all__ = ["GradBalancer"]


class GradBalancer(BalancerReadout, InnerOptimizerProxy):
    """Wrap any ``torch.optim`` optimizer so that one step balances several task losses.

    The balancer *is* a `torch.optim.Optimizer`: it shares ``param_groups``, ``state``
    and ``defaults`` with the inner optimizer, so learning-rate schedulers, gradient clipping,
    ``torch.amp.GradScaler`` and checkpointing work as with the inner optimizer alone.

    A step is ``zero_grad()`` → ``backward(losses)`` → ``step()``. `backward` writes into
    ``.grad``:

    * for a *gradient method* (MGDA, ...): ``Jᵀw`` on the shared parameters, where ``J`` holds
      the per-task gradients and ``w`` the method's weights, and each task-specific parameter's
      own (unweighted) task gradient, as in Sener & Koltun (2018);
    * for a *loss weighting* (equal, uncertainty, DWA, ...): the gradient of ``Σ_i w_i L_i``
      through the whole model, as the papers of those methods do.

    Args:
        optimizer: the inner optimizer, built on all the model's parameters.
        method: a registered method name (``"equal"``, ``"mgda"``, ...; see
            `gradbalance.methods.available`) or a `gradbalance.methods.Method`.
        shared: the shared parameters: a list of tensors, a module holding them, a
            `gradbalance.models.MultiTaskModel` or any module with a ``shared_parameters()``
            method (its declaration, and its ``last_shared_parameters()``, if any, as the
            default ``last_shared``), or ``"auto"``: every
            parameter of the inner optimizer that the losses of at least two tasks reach, found
            from the autograd graph on the first `backward` (all it reaches with one task).
            Required by gradient methods; every shared parameter that requires grad must be in
            the inner optimizer. Frozen shared parameters (``requires_grad=False``) are left
            out at each step and balanced again once unfrozen (the set is resolved again when
            the ``requires_grad`` pattern changes).
        tasks: the task names, in order. Optional: by default the first `backward` call
            declares them (dict keys, or ``task0, task1, ...`` for a list).
        engine: how per-task gradients are computed: ``"auto"`` (``"memory"`` when ``K × P``
            exceeds ``memory_threshold``; else ``"chained"`` when ``features=`` are passed to
            `backward` and the heads reach the shared parameters only through them; else loop
            on CPU, and batched where vmap works on other devices), ``"loop"``, ``"batched"``,
            ``"chained"`` (the exact parameter Jacobian from ``K`` head backwards to the
            ``features=`` and one vmapped trunk backward; loop where it does not apply),
            ``"memory"`` (the memory-light Gramian: the ``K × P`` Jacobian is never held at
            once; not for methods that require the Jacobian) or ``"representation"``
            (gradients w.r.t. the ``features=`` passed to `backward`; forced for methods that
            require features).
        nonfinite: ``"raise"`` (default) raises `gradbalance.NonFiniteError` naming
            the task when a loss or gradient is NaN/inf; ``"skip"`` leaves ``.grad`` untouched,
            turns the next `step` into a no-op and counts the step in
            `skipped_steps`.
        last_shared: the parameters of the last shared layer (GradNorm's ``W``). Default: the
            model's declaration when ``shared`` is a model that declares one, else
            the last shared layer in execution order, found from the autograd graph on the
            first `backward`: the shared weights (2 or more dimensions) after which no shared
            weight is applied on the way to the losses (one per parallel branch), with the
            bias their operation reads.
        distributed: what to synchronise under `torch.distributed` (DDP): ``"auto"``
            (default: ``"global"`` when a process group with more than one rank is
            initialised, else ``"off"``), ``"global"`` (the weights and the update of the
            global batch, on every rank), ``"local"`` (weights from the mean of the rank-local
            Gramians: ``K × K`` numbers instead of the ``K × P`` Jacobian) or ``"off"``. See
            `gradbalance.distributed`.
        process_group: the process group to synchronise over (default: the default group).
        memory_threshold: Jacobian entries ``K × P`` (``P``: shared parameters) above which
            ``engine="auto"`` takes the memory-light path; also the most Jacobian entries one
            group of that path holds at once. Default ``2**27``.
        **method_kwargs: options of the method when ``method`` is a name.

    Examples:
        >>> import torch, gradbalance as gb
        >>> trunk = torch.nn.Linear(4, 8)
        >>> heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)})
        >>> params = [*trunk.parameters(), *heads.parameters()]
        >>> opt = gb.GradBalancer(torch.optim.SGD(params, lr=0.1), method="equal", shared=trunk)
        >>> z = trunk(torch.randn(16, 4))
        >>> opt.zero_grad()
        >>> opt.backward({"a": heads["a"](z).pow(2).mean(), "b": heads["b"](z).abs().mean()})
        tensor([1., 1.])
        >>> opt.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        method: str | Method = "equal",
        shared: Iterable[Tensor] | nn.Module | str | None = None,
        *,
        tasks: Iterable[str] | None = None,
        engine: str = "auto",
        nonfinite: str = "raise",
        last_shared: Iterable[Tensor] | nn.Module | None = None,
        distributed: str = "auto",
        process_group: Any = None,
        memory_threshold: int = DEFAULT_MEMORY_THRESHOLD,
        **method_kwargs: Any,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, GradBalancer):
            raise TypeError("optimizer is already a GradBalancer; wrap the inner optimizer once")
        check_request(engine)
        check_policy(nonfinite)
        check_mode(distributed)
        check_threshold(memory_threshold)
        method_obj = binding.build_method(method, method_kwargs)

        super().__init__(optimizer)

        self.method = method_obj
        self.nonfinite = nonfinite
        self._engines = EngineChoice(
            engine,
            method_name=method_obj.name,
            gradient_method=method_obj.is_gradient_method(),
            needs_features=FEATURES in method_obj.requires,
            needs_jacobian=JACOBIAN in method_obj.requires,
            memory_threshold=memory_threshold,
        )
        self._params = ParameterSet(optimizer, shared, last_shared)
        check_declared(self._params, method_obj, shared, last_shared)
        self._state = StepState()
        self._pipeline = StepPipeline(
            method_obj, self._params, self._engines, self._state, nonfinite
        )
        self._distributed_request = distributed
        self._process_group = process_group
        self._sync: _distributed.Synchronizer | None = None
        self._sync_resolved = False
        if tasks is not None:
            self._bind(inputs.validate_task_names(list(tasks)))
        elif method_obj.is_bound:
            self._bind(method_obj.tasks)  # type: ignore[arg-type]

    def _bind(self, tasks: tuple[str, ...], *, from_backward: bool = False) -> None:
        binding.bind(self.method, self.optimizer, self._params, tasks, from_backward=from_backward)

    def _snapshot(self) -> tuple[Any, ...]:
        return binding.snapshot(self.method, self.optimizer, self._params)

    def _restore(self, saved: tuple[Any, ...]) -> None:
        binding.restore(self.method, self.optimizer, self._params, saved)

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return (
            f"GradBalancer(method={self.method.name!r}, tasks={self.tasks}, "
            f"engine={self._engines.request!r},\n    {inner})"
        )

    # ------------------------------------------------------------------ the step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter of the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._state.pending.clear()
        self._state.skip_next_step = False
        self._state.unsynced = False
        self._state.found = None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without averaging them over ranks (like DDP's ``no_sync``).

        Inside the block, `backward` still synchronises what the weights need (losses, and for
        gradient methods the Jacobian rows or Gramian), so the weights of every micro-batch are
        those of its global batch, but it skips the average of the gradients it writes: they
        stay rank-local in ``.grad``. The first `backward` after the block averages everything
        accumulated (``.grad`` is linear in the micro-batches, so the result is exact). Call
        `step` only after such a `backward`. `torch.nn.parallel.DistributedDataParallel`'s own
        ``model.no_sync()`` does not affect the balancer (its hooks never fire; see
        `gradbalance.distributed`). Without a process group this does nothing.

        Examples:
            >>> import torch, gradbalance as gb
            >>> model = torch.nn.Linear(3, 2)
            >>> opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> opt.zero_grad()
            >>> with opt.no_sync():
            ...     out = model(torch.randn(4, 3))
            ...     _ = opt.backward([out[:, 0].pow(2).mean(), out[:, 1].abs().mean()])
            >>> out = model(torch.randn(4, 3))
            >>> _ = opt.backward([out[:, 0].pow(2).mean(), out[:, 1].abs().mean()])
            >>> opt.step()
        """
        previous = self._state.grad_sync
        self._state.grad_sync = False
        try:
            yield
        finally:
            self._state.grad_sync = previous

    def backward(
        self,
        losses: Mapping[str, Tensor] | list[Tensor] | tuple[Tensor, ...],
        *,
        features: Tensor | Iterable[Tensor] | None = None,
        kpis: Mapping[str, float] | Iterable[float] | Tensor | None = None,
        scaler: torch.amp.GradScaler | None = None,
        retain_graph: bool = False,
    ) -> Tensor:
        """Compute the task weights and accumulate the balanced gradient into ``.grad``.

        Nothing (``.grad``, parameters, optimizer or method state) changes unless every check
        passes; the method's own state changes only when `step` really steps. A first call that
        raises leaves the tasks undeclared (the method unbound, no param group added). Under
        `torch.distributed`, an invalid input on one rank raises on every rank at that step.

        Args:
            losses: one scalar loss per task: a dict ``{task: loss}`` or a list/tuple.
            features: the shared representation(s) the heads read, for methods and engines
                that work on feature gradients (MGDA-UB, ``engine="representation"``). With
                ``engine="auto"`` or ``"chained"``, parameter-level gradient methods use them
                to compute the exact parameter Jacobian faster (one trunk backward).
            kpis: one KPI per task in ``[0, 1]``, for methods that need them (DTP).
            scaler: a ``torch.amp.GradScaler``: pass the *unscaled* losses; the balancer
                scales the backward, unscales what the method reads, and on overflow makes the
                scaler skip the step (method state untouched).
            retain_graph: keep the autograd graph after the backward, as in
                `torch.Tensor.backward`. Without it, a later `backward` over the same losses
                raises a `gradbalance.LossError` (also a ``RuntimeError``), at every step alike.

        Returns:
            The weights, shape ``(K,)``, detached, in the order of ``losses``. NaN when the step
            is skipped.
        """
        sync = self._synchronizer()
        method = self.method
        known = self._params.tasks
        try:
            call = inputs.parse_call(
                losses,
                known,
                method,
                features=features,
                kpis=kpis,
                scaler=scaler,
                features_required=self._engines.requires_features,
                features_useful=self._engines.chained_ok,
                resolve=self._params.resolve_step,
            )
        except (GradBalanceError, ValueError, TypeError):
            if sync is not None:
                # an input error on one rank only: agree on it first, then raise on every rank
                # (the others would block in the next collective, or mix steps if caught)
                self._agree(sync, failed=True)
            raise
        if sync is not None and known is None:
            self._agree(sync, failed=False)  # the first step: before K is known, the flags alone
        saved = self._snapshot() if known is None else None
        try:
            if saved is not None:
                self._bind(call.tasks, from_backward=True)
            result = self._pipeline.run(
                StepContext(*call, retain_graph=retain_graph, sync=sync, bound=saved is None)
            )
        except BaseException as exc:
            if saved is not None:
                # a failing first backward leaves no trace: tasks unbound, no method state,
                # no param group
                self._restore(saved)
            if isinstance(exc, (RuntimeError, NotImplementedError)) and not isinstance(
                exc, GradBalanceError
            ):
                explain_sparse_failure(method, self._engines.name, self._params, call.losses, exc)
            raise
        if not retain_graph:
            inputs.mark_consumed(call.losses)
        return result

    def _synchronizer(self) -> _distributed.Synchronizer | None:
        """Resolve ``distributed=`` on the first backward (the process group exists by then)."""
        if not self._sync_resolved:
            self._sync = resolve_sync(self._distributed_request, self._process_group, self.method)
            self._sync_resolved = True
        return self._sync

    def _agree(self, sync: _distributed.Synchronizer, *, failed: bool) -> None:
        """Agree with the other ranks on whether some rank's inputs were invalid (see
        `gradbalance.balancer.commit.agree`)."""
        size = 0
        if self._params.tasks is not None:
            size = len(self._params.tasks) * (2 if KPIS in self.method.requires else 1)
        agree(sync, failed, size, self._params.optimizer_params()[0].device)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step the inner optimizer, then commit the method's state update.

        Only a step that follows a successful `backward` (since the last `step` or `zero_grad`)
        counts in `steps` and commits the method's state: a step without one still steps the
        inner optimizer on whatever ``.grad`` holds (as ``torch.optim`` would), but neither
        counts nor moves the methods' schedules (RLW's draws, GradDrop's, Nash-MTL's).

        Args:
            closure: optional; re-evaluates the model and calls `backward` (as in
                `torch.optim.Optimizer.step`), returning the loss. It is evaluated once here
                and passed on to the inner optimizer, which gets that first result on its first
                call and re-evaluates the closure on later ones (`torch.optim.LBFGS`).
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        state = self._state
        if state.skip_next_step:
            state.skip_next_step = False
            state.pending.clear()
            return result
        if state.unsynced:
            raise RuntimeError(
                "GradBalancer.step(): .grad still holds rank-local gradients of backward() "
                "calls made inside no_sync(); call backward() once outside no_sync() before "
                "step(), so that they are averaged over the ranks"
            )
        found, state.found = state.found, None
        first = [result]

        def evaluate() -> Any:
            if first:
                return first.pop()
            with torch.enable_grad():
                return closure()  # type: ignore[misc]

        def run_inner() -> Any:
            return self.optimizer.step() if closure is None else self.optimizer.step(evaluate)

        if found is not None:  # the backwards were skipped (or not) on the device
            stepped = deferred.step_masked(
                self.optimizer, self.method, state, found, run_inner, closure is not None
            )
            state.found = None  # what a closure's re-evaluations found decides nothing
            return result if stepped is None else stepped
        stepped = run_inner()
        if closure is not None:
            result = stepped
            # a re-evaluation skipped for a non-finite loss must not skip the next step
            state.skip_next_step = False
        for step_inputs, weights in state.pending:
            self.method.update(step_inputs, weights)
        state.steps += bool(state.pending)
        state.pending.clear()
        return result

    # ------------------------------------------------------------------ epochs
    def end_epoch(self) -> None:
        """Tell epoch-based methods (DWA) that an epoch ended; a no-op for the others."""
        self.method.end_epoch()

    def observe(self, losses: Any) -> None:
        """Pass the losses measured after `step` to methods that learn from them.

        FAMO's exact update compares the losses of one batch before and after the step; call
        ``opt.observe(losses)`` with the recomputed losses (a dict, list or tuple like
        `backward`'s) right after ``opt.step()``. A no-op for the other methods.
        """
        self.method.observe(losses)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with the method's state and the balancer's
        counters under one extra key.

        Its ``"state"`` and ``"param_groups"`` are the inner optimizer's, as torch lays them
        out, so generic optimizer-state tools read them; ``"gradbalance"`` holds
        ``{"format": 2, "method": ..., "balancer": ...}``. `load_state_dict` also reads the
        older layout ``{"optimizer", "method", "balancer"}``. Holds only tensors and plain
        Python values, so ``torch.load(weights_only=True)`` reads it back.
        """
        self._state.settle()  # the device's skip counts, read once
        return checkpoint.pack(
            self.optimizer.state_dict(),
            self.method.state_dict(),
            {
                "method": self.method.name,
                "tasks": self.tasks,
                "steps": self._state.steps,
                "skipped_steps": self._state.skipped,
                # the engine choice ("engine", "chained_trunk"), so that a resumed run makes
                # the same one
                **self._engines.state_dict(),
            },
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a `state_dict` into this balancer (built like the saved one).

        All or nothing: the task names, the method's state (keys and shapes) and the inner
        optimizer's param groups are checked before anything is loaded; on any error the
        balancer, its method and the inner optimizer are left as they were. Reads the current
        layout and the older ``{"optimizer", "method", "balancer"}`` one.
        """
        checkpoint.load(
            state_dict, self.method, self.optimizer, self._params, self._state, self._engines
        )
