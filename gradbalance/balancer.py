"""`GradBalancer`: the ``torch.optim`` wrapper users hold.

It validates the inputs, asks the engine for what the method needs (losses only, a Gramian of
the task gradients, ...), asks the method for one weight per task, writes the combined gradient
into ``.grad`` and, on `GradBalancer.step`, steps the inner optimizer and then commits the
method's own state update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gradbalance import _checkpoint, _graph, _inputs
from gradbalance import distributed as _distributed
from gradbalance import engine as _engine
from gradbalance._torch_compat import (
    HAS_FUSED_NONFINITE_CHECK,
    fused_nonfinite_flag,
    module_restore,
    module_snapshot,
)
from gradbalance.errors import (
    GradBalanceError,
    LossError,
    MissingInputError,
    NonFiniteError,
    OptionError,
    SolverError,
    UnreachedParameterError,
)
from gradbalance.methods import (
    FEATURES,
    JACOBIAN,
    KPIS,
    LAST_SHARED_GRAMIAN,
    Method,
    StepInputs,
)
from gradbalance.methods import registry as _registry

__all__ = ["GradBalancer"]

logger = logging.getLogger(__name__)

_NONFINITE_POLICIES = ("raise", "skip")
#: Key set in the ``metadata`` of a loss's ``grad_fn`` once `GradBalancer.backward` consumed
#: its graph (``retain_graph=False``): a later backward over it raises, at every step alike.
_CONSUMED = "gradbalance.consumed"


def _node_metadata(node: Any) -> dict[str, Any]:
    """An autograd node's ``metadata`` dict (public API; torch's stubs type it as a method)."""
    return node.metadata


def _check_reached(
    shared: Sequence[Tensor], reached: Sequence[bool], label: Callable[[Tensor], str]
) -> None:
    """Raise `UnreachedParameterError` naming the shared tensors no task loss reaches."""
    unreached = [label(p) for p, r in zip(shared, reached) if not r]
    if unreached:
        raise UnreachedParameterError(
            f"no task loss reaches {', '.join(unreached)}; remove it from shared=... "
            "or check that the model uses it"
        )


def _stack_losses(losses: list[Tensor], differentiable: bool) -> tuple[Tensor | None, Tensor]:
    """The losses as one vector: ``(stacked, detached)``.

    ``stacked`` keeps the autograd graph (for ``Σ wᵢ Lᵢ``) when ``differentiable`` and the losses
    share a dtype, else it is ``None``; ``detached`` is a float64 copy, one ``stack`` in all.
    """
    flat = [loss if loss.dim() == 0 else loss.reshape(()) for loss in losses]
    dtype = flat[0].dtype
    if any(loss.dtype != dtype for loss in flat):
        with torch.no_grad():
            return None, torch.stack([loss.to(torch.float64) for loss in flat])
    if differentiable:
        stacked = torch.stack(flat)
        # a copy even for float64 losses: the balancer may average it in place (DDP)
        return stacked, stacked.detach().to(torch.float64, copy=True)
    with torch.no_grad():
        return None, torch.stack(flat).to(torch.float64)


def _weighted_sum(weights: Tensor, losses: list[Tensor], stacked: Tensor | None) -> Tensor:
    """``Σ_i w_i L_i`` in the losses' dtype, differentiable w.r.t. both.

    Losses of one dtype come as ``stacked`` (`_stack_losses`): one product and one sum (two
    autograd nodes whatever ``K``); each loss still receives exactly ``w_i`` as its gradient.
    Losses of mixed dtypes (``stacked`` is ``None``) are summed term by term.
    """
    w = weights.to(losses[0].dtype)
    if stacked is not None:
        return (stacked * w).sum()
    objective = None
    for w_i, loss in zip(w.unbind(), losses):
        term = w_i * loss.reshape(())
        objective = term if objective is None else objective + term
    assert objective is not None
    return objective


def _finite_view(t: Tensor) -> Tensor:
    """The values whose finiteness decides ``t``'s: the stored values of a sparse tensor
    (coalesced, so that duplicate entries are checked as summed), else ``t`` itself."""
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()  # compressed sparse layouts (CSR, CSC, BSR, BSC)


def _all_finite(tensors: Iterable[Tensor | None]) -> bool:
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
            flags.append(
                torch.isfinite(_finite_view(t)).all().logical_not().to(torch.float32).cpu()
            )
    for group in groups.values():
        try:
            found = fused_nonfinite_flag(group)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - kernel unavailable
            found = torch.stack([torch.isfinite(t).all().logical_not() for t in group]).any()
        flags.append(found.reshape(()).to(torch.float32).cpu())
    return not bool(torch.stack(flags).any())


class GradBalancer(Optimizer):
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
        memory_threshold: int = _engine.DEFAULT_MEMORY_THRESHOLD,
        **method_kwargs: Any,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, GradBalancer):
            raise TypeError("optimizer is already a GradBalancer; wrap the inner optimizer once")
        if engine not in _engine.STRATEGIES:
            raise ValueError(f"engine must be one of {_engine.STRATEGIES}, got {engine!r}")
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
        if distributed not in _distributed.MODES:
            raise ValueError(
                f"distributed must be one of {_distributed.MODES}, got {distributed!r}"
            )
        if isinstance(memory_threshold, bool) or not isinstance(memory_threshold, int):
            raise TypeError(f"memory_threshold must be an int, got {memory_threshold!r}")
        if memory_threshold < 1:
            raise ValueError(
                f"memory_threshold must be a positive number of Jacobian entries, "
                f"got {memory_threshold}"
            )
        method_obj = self._build_method(method, method_kwargs)

        self._initialized = False
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._initialized = True

        self.method = method_obj
        self.nonfinite = nonfinite
        self._engine_request = engine
        self._strategy = self._initial_strategy(engine, method_obj)
        self._names: dict[int, str] = {}
        self._owners: dict[int, int] = {}
        self._shared_all, model_last = self._resolve_shared(shared)
        self._last_all: list[Tensor] | None = None
        if last_shared is not None:
            self._last_all = self._resolve_params(last_shared, "last_shared")
        elif model_last:
            self._last_all = model_last
        if method_obj.is_gradient_method() and self._shared_all == []:
            if shared is None:
                fix = "pass shared=model.shared_parameters() (or the trunk module)"
            else:
                fix = (
                    "the shared= you passed holds no parameter that requires grad (an empty "
                    "module or an exhausted generator?); the tasks must share parameters, "
                    "or use a method that only weights the losses"
                )
            raise ValueError(
                f"method {method_obj.name!r} balances the gradients of the shared parameters: {fix}"
            )
        if LAST_SHARED_GRAMIAN in method_obj.requires and not (
            self._last_all or (self._last_all is None and self._shared_all != [])
        ):
            if last_shared is not None:
                fix = "the last_shared= you passed holds no parameter"
            elif shared is not None:
                fix = (
                    "the shared= you passed holds no parameter that requires grad; pass "
                    "last_shared=model.last_shared_layer"
                )
            else:
                fix = (
                    "pass shared=... (its last layer is used) or "
                    "last_shared=model.last_shared_layer"
                )
            raise ValueError(f"method {method_obj.name!r} needs the last shared layer: {fix}")
        self._tasks: tuple[str, ...] | None = None
        self._steps = 0
        self._skipped = 0
        self._pending: list[tuple[StepInputs, Tensor]] = []
        self._skip_next_step = False
        self._last_weights: Tensor | None = None
        self._last_losses: Tensor | None = None
        self._last_gramian: Tensor | None = None
        self._distributed_request = distributed
        self._process_group = process_group
        self._sync: _distributed.Synchronizer | None = None
        self._sync_resolved = False
        self._grad_sync = True
        self._unsynced = False
        self._memory_threshold = memory_threshold
        self._memory_inner = "auto"
        # the chained path applies to gradient methods given features= (auto or "chained")
        self._chained_ok = engine in ("auto", "chained") and self._strategy != "representation"
        self._chained_batched: bool | None = None
        self._chained_timing: dict[bool, float] | None = None
        self._fallback_strategy = "auto"
        if tasks is not None:
            self._bind(_inputs.validate_task_names(list(tasks)))
        elif method_obj.is_bound:
            self._bind(method_obj.tasks)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _build_method(method: str | Method, kwargs: Mapping[str, Any]) -> Method:
        if isinstance(method, Method):
            if kwargs:
                raise TypeError(
                    f"got method options {sorted(kwargs)} together with a Method instance; "
                    "pass them to the method's constructor instead"
                )
            return method
        if isinstance(method, str):
            return _registry.get(method, **kwargs)
        raise TypeError(
            f"method must be a registered name or a gradbalance.methods.Method, got {method!r}"
        )

    @staticmethod
    def _initial_strategy(engine_name: str, method: Method) -> str:
        if FEATURES in method.requires:
            if engine_name not in ("auto", "representation"):
                raise ValueError(
                    f"method {method.name!r} works on the shared features and needs "
                    f"engine='representation' (or 'auto'), got engine={engine_name!r}"
                )
            return "representation"
        if engine_name == "memory":
            if JACOBIAN in method.requires:
                raise ValueError(
                    f"method {method.name!r} reads the task gradients themselves (JACOBIAN), "
                    "which the memory-light engine never holds; use engine='auto', 'loop' or "
                    "'batched'"
                )
            if not method.is_gradient_method():
                raise ValueError(
                    f"engine='memory' computes a Gramian, but method {method.name!r} is a loss "
                    "weighting that needs no Gramian; drop the engine argument"
                )
        if engine_name == "representation" and not method.is_gradient_method():
            raise ValueError(
                f"engine='representation' computes a Gramian of feature gradients, but method "
                f"{method.name!r} is a loss weighting that needs no Gramian; drop the engine "
                "argument"
            )
        if engine_name == "chained" and not method.is_gradient_method():
            raise ValueError(
                f"engine='chained' computes the task gradients of the shared parameters, but "
                f"method {method.name!r} is a loss weighting that needs none; drop the engine "
                "argument"
            )
        return engine_name

    def _optimizer_params(self) -> list[Tensor]:
        """The inner optimizer's parameters, each once, in group order.

        Cached between steps; the cache is keyed on the identity and length of every group's
        parameter list, so `add_param_group`, a replaced or resized ``params`` list or a loaded
        state dict rebuild it.
        """
        groups = self.optimizer.param_groups
        lists = [group["params"] for group in groups]
        sizes = [len(params) for params in lists]
        cache = self.__dict__.get("_params_cache")
        if (
            cache is not None
            and cache[1] == sizes
            and len(cache[0]) == len(lists)
            and all(a is b for a, b in zip(cache[0], lists))
        ):
            return list(cache[2])
        seen: set[int] = set()
        out = []
        for group in groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        # the cache holds the lists themselves, so their ids cannot be reused while cached
        self.__dict__["_params_cache"] = (lists, sizes, tuple(out))
        return out

    def _resolve_params(
        self, params: Iterable[Tensor] | nn.Module | None, what: str
    ) -> list[Tensor]:
        """The tensors of ``params``, each once, frozen ones included (they are filtered at
        each step). A tensor that requires grad must be in the inner optimizer."""
        if params is None:
            return []
        items: list[Tensor]
        if isinstance(params, Tensor):
            items = [params]
        elif isinstance(params, nn.Module):
            named = list(params.named_parameters())
            for name, param in named:
                self._names.setdefault(id(param), name)
            items = [param for _, param in named]
        else:
            items = list(params)
        in_optimizer = {id(p) for p in self._optimizer_params()}
        seen: set[int] = set()
        out: list[Tensor] = []
        for i, p in enumerate(items):
            if not isinstance(p, Tensor):
                raise TypeError(f"{what}[{i}] is a {type(p).__name__}, not a tensor")
            if id(p) in seen:
                continue
            if p.requires_grad and id(p) not in in_optimizer:
                raise ValueError(
                    f"{what} parameter #{i} (shape {tuple(p.shape)}) is not in the inner "
                    "optimizer; build the optimizer on all the model's parameters"
                )
            seen.add(id(p))
            out.append(p)
        return out

    def _resolve_shared(self, shared: Any) -> tuple[list[Tensor] | None, list[Tensor]]:
        """``shared=`` as ``(every shared tensor or None for "auto", the model's last layer)``."""
        if isinstance(shared, str):
            if shared != "auto":
                raise ValueError(
                    f"shared must be tensors, a module or 'auto', got the string {shared!r}"
                )
            return None, []
        declares = getattr(shared, "shared_parameters", None)
        if isinstance(shared, nn.Module) and callable(declares):
            # a model that declares its shared part (gradbalance.models.MultiTaskModel, or any
            # module with the same methods): duck-typed, so the core never imports the zoo
            for name, p in shared.named_parameters():
                self._names.setdefault(id(p), name)
            params = self._resolve_params(list(declares()), "shared")
            declares_last = getattr(shared, "last_shared_parameters", None)
            last = (
                self._resolve_params(list(declares_last()), "last_shared")
                if callable(declares_last)
                else []
            )
            return params, last
        return self._resolve_params(shared, "shared"), []

    @property
    def _shared(self) -> list[Tensor]:
        """The shared tensors of this step (resolved at the start of each `backward`)."""
        state = self.__dict__.get("_resolved")
        if state is not None:
            return state[1]
        return self._current_shared()

    @property
    def _last_shared(self) -> list[Tensor]:
        """The last shared layer of this step (resolved at the start of each `backward`)."""
        state = self.__dict__.get("_resolved")
        return [] if state is None else state[2]

    def _current_shared(self) -> list[Tensor]:
        """The shared tensors that require grad now (the last resolved set for ``"auto"``)."""
        if self._shared_all is None:
            state = self.__dict__.get("_resolved")
            return [] if state is None else [p for p in state[1] if p.requires_grad]
        in_optimizer = {id(p) for p in self._optimizer_params()}
        return [p for p in self._shared_all if p.requires_grad and id(p) in in_optimizer]

    def _resolve_step(self, tasks: tuple[str, ...], losses: list[Tensor]) -> None:
        """Resolve the shared set and the last shared layer for this step, and check that every
        loss reaches a parameter of the inner optimizer.

        Cheap while the ``requires_grad`` pattern of the watched tensors (the shared ones, or
        every parameter for ``shared="auto"``) and the optimizer's parameter list stay the
        same: one early-exit graph walk per loss. Otherwise (first step, a layer frozen or
        unfrozen) the whole graph is walked once (`gradbalance._graph.walk`). Nothing is
        stored unless every check passes.
        """
        self._optimizer_params()
        opt_params: tuple[Tensor, ...] = self.__dict__["_params_cache"][2]
        auto = self._shared_all is None
        watched: Sequence[Tensor] = opt_params if auto else self._shared_all  # type: ignore[assignment]
        pattern = tuple(p.requires_grad for p in watched)
        if self._last_all is not None:
            pattern += tuple(p.requires_grad for p in self._last_all)
        state = self.__dict__.get("_resolved")
        if state is not None and state[0][0] is opt_params and state[0][1] == pattern:
            ids = state[3]
            for task, loss in zip(tasks, losses):
                if _graph.reaches(loss, ids) is False:
                    self._raise_unreached_loss([task])
            return
        ids = {id(p) for p in opt_params}
        graph = _graph.walk(losses)
        if not graph.opaque:
            reached = [0] * len(tasks)
            for key, mask in graph.reached_by.items():
                if key in ids:
                    for i in range(len(tasks)):
                        reached[i] |= mask >> i & 1
            missing = [t for t, r in zip(tasks, reached) if not r]
            if missing:
                self._raise_unreached_loss(missing)
        if auto:
            need = min(2, len(tasks))
            shared = [
                p
                for p in opt_params
                if p.requires_grad and bin(graph.reached_by.get(id(p), 0)).count("1") >= need
            ]
        else:
            shared = []
            for p in self._shared_all:  # type: ignore[union-attr]
                if not p.requires_grad:
                    continue
                if id(p) not in ids:
                    raise OptionError(
                        f"{self._label(p)} requires grad but is not in the inner optimizer; "
                        "add it to the optimizer (add_param_group) or keep it frozen"
                    )
                shared.append(p)
        if self._last_all is not None:
            last = [p for p in self._last_all if p.requires_grad]
        else:
            last = _graph.last_layer(graph, shared)
        method = self.method
        if method.is_gradient_method() and not shared:
            if auto:
                raise UnreachedParameterError(
                    f"shared='auto' found no parameter that the losses of two or more of the "
                    f"tasks {list(tasks)} reach: they share nothing to balance; use a loss "
                    "weighting (e.g. method='equal') or check that the heads read a shared trunk"
                )
            raise UnreachedParameterError(
                f"every shared parameter is frozen (requires_grad=False), so method "
                f"{method.name!r} has nothing to balance; unfreeze some, or use a loss "
                "weighting (e.g. method='equal') while they are frozen"
            )
        if LAST_SHARED_GRAMIAN in method.requires and not last:
            raise UnreachedParameterError(
                f"method {method.name!r} needs the last shared layer, but "
                + (
                    "every tensor of last_shared= is frozen (requires_grad=False); unfreeze it "
                    "or pass another layer"
                    if self._last_all is not None
                    else "no task loss reaches a shared parameter that requires grad"
                )
            )
        self._owners = {key: mask for key, mask in graph.reached_by.items() if key in ids}
        self.__dict__["_resolved"] = ((opt_params, pattern), shared, last, ids)

    @staticmethod
    def _raise_unreached_loss(tasks: list[str]) -> None:
        raise LossError(
            f"the loss of task(s) {tasks} reaches no parameter of the inner optimizer (a "
            "constant, or computed from tensors the optimizer does not hold), so its gradient "
            "is zero everywhere and balancing it is meaningless; compute it from the model's "
            "output, or leave the task out of this step"
        )

    @staticmethod
    def _check_devices(tasks: tuple[str, ...], losses: list[Tensor]) -> None:
        """Raise `LossError` naming the tasks of each device when the losses are on several."""
        first = losses[0].device
        if all(loss.device == first for loss in losses):
            return
        by_device: dict[str, list[str]] = {}
        for task, loss in zip(tasks, losses):
            by_device.setdefault(str(loss.device), []).append(task)
        where = ", ".join(f"task(s) {names} on {dev}" for dev, names in by_device.items())
        raise LossError(
            f"the losses are on different devices: {where}; compute every loss on one device "
            "(the model's), or move them with loss.to(device)"
        )

    def _param_name(self, p: Tensor) -> str | None:
        """The name of ``p``: from ``shared=`` (a module) or the optimizer's ``param_names``."""
        name = self._names.get(id(p))
        if name is not None:
            return name
        for group in self.optimizer.param_groups:
            names = group.get("param_names")
            if names:
                for q, n in zip(group["params"], names):
                    if q is p:
                        return str(n)
        return None

    def _label(self, p: Tensor) -> str:
        """How errors name ``p``: by name when known, else by its index in ``shared=`` or by
        the task(s) whose loss reaches it; with its shape."""
        shape = tuple(p.shape)
        shared = any(p is q for q in self._shared_all or self._shared)
        mask = self._owners.get(id(p), 0)
        tasks = self._tasks or ()
        owners = [tasks[i] for i in range(min(mask.bit_length(), len(tasks))) if mask >> i & 1]
        name = self._param_name(p)
        if name is not None:
            of = f" of task {owners[0]!r}" if len(owners) == 1 and not shared else ""
            return f"{'shared ' if shared else ''}parameter {name!r}{of} (shape {shape})"
        if shared and self._shared_all:
            index = next(i for i, q in enumerate(self._shared_all) if q is p)
            return f"shared parameter #{index} (shape {shape})"
        if owners:
            which = f"task {owners[0]!r}" if len(owners) == 1 else f"tasks {owners}"
            return f"{'shared ' if shared else ''}parameter of {which} (shape {shape})"
        return f"{'shared ' if shared else ''}parameter (shape {shape})"

    def _bind(self, tasks: tuple[str, ...], *, from_backward: bool = False) -> None:
        """Bind the method to ``tasks`` and give its learnable parameters a param group.

        All or nothing: on an error the method, the tasks and the param groups are as before.
        """
        snapshot = self._snapshot()
        try:
            self.method.bind(tasks)
            self._tasks = tasks
            params = [p for p in self.method.parameters() if p.requires_grad]
            groups = self.optimizer.param_groups
            if params and not any(
                any(p is q for q in group["params"] for p in params) for group in groups
            ):
                self._check_new_group(tasks, from_backward)
                options = {
                    k: v
                    for k, v in self.method.param_group_options().items()
                    if k in self.optimizer.defaults
                }
                self.optimizer.add_param_group({"params": params, **options})
        except BaseException:
            self._restore(snapshot)
            raise

    def _check_new_group(self, tasks: tuple[str, ...], from_backward: bool) -> None:
        """Refuse a param group for the method's parameters where it cannot work."""
        name = self.method.name
        if isinstance(self.optimizer, torch.optim.LBFGS):
            raise OptionError(
                f"method {name!r} learns parameters of its own, which need a param group of the "
                "inner optimizer, but torch.optim.LBFGS steps only its first param group; use "
                "another optimizer, or a method without learnable parameters"
            )
        if from_backward and any("initial_lr" in g for g in self.optimizer.param_groups):
            raise MissingInputError(
                f"method {name!r} learns parameters of its own, which need a param group of the "
                "inner optimizer, but a learning-rate scheduler already recorded the param "
                "groups (they carry 'initial_lr'), so a group added now would break it; pass "
                f"tasks={list(tasks)!r} to GradBalancer, so that the group exists before the "
                "scheduler is built"
            )

    def _snapshot(self) -> tuple[Any, ...]:
        """What binding the tasks changes: the method, the task names, the param groups."""
        return module_snapshot(self.method), self._tasks, len(self.optimizer.param_groups)

    def _restore(self, snapshot: tuple[Any, ...]) -> None:
        modules, tasks, groups = snapshot
        module_restore(modules)
        self._tasks = tasks
        del self.optimizer.param_groups[groups:]

    # ------------------------------------------------------------------ shared Optimizer state
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if getattr(self, "_initialized", False):
            self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if getattr(self, "_initialized", False):
            self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if getattr(self, "_initialized", False):
            self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (as ``Optimizer.add_param_group``)."""
        if not getattr(self, "_initialized", False):
            return  # the base constructor replays the inner optimizer's groups: nothing to do
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_params_cache", None)
        state.pop("_resolved", None)  # keyed on the identity of the optimizer's parameter list
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return (
            f"GradBalancer(method={self.method.name!r}, tasks={self.tasks}, "
            f"engine={self._engine_request!r},\n    {inner})"
        )

    # ------------------------------------------------------------------ public read-only state
    @property
    def tasks(self) -> list[str] | None:
        """The task names in the balancer's order, or ``None`` before the first backward."""
        return None if self._tasks is None else list(self._tasks)

    @property
    def engine(self) -> str:
        """The engine strategy in use (``"auto"`` resolves on the first gradient backward)."""
        return self._strategy

    @property
    def distributed(self) -> str:
        """The distributed mode in use: ``"global"``, ``"local"`` or ``"off"``.

        ``"auto"`` until the first `backward` resolves it.
        """
        if not self._sync_resolved:
            return self._distributed_request
        return "off" if self._sync is None else self._sync.mode

    @property
    def synchronizer(self) -> _distributed.Synchronizer | None:
        """The `gradbalance.distributed.Synchronizer` in use (its counters say how much was
        sent), or ``None`` when nothing is synchronised."""
        return self._sync

    @property
    def shared_parameters(self) -> list[Tensor]:
        """The shared parameters the balancer combines task gradients on: those of ``shared=``
        that require grad now (for ``shared="auto"``: those found on the last resolving
        `backward`, empty before the first)."""
        return self._current_shared()

    @property
    def last_shared_parameters(self) -> list[Tensor]:
        """The last shared layer (GradNorm's ``W``): ``last_shared=`` (or the model's
        declaration) less its frozen tensors, else the layer found from the graph by the last
        `backward` (empty before the first)."""
        if self._last_all is not None:
            return [p for p in self._last_all if p.requires_grad]
        return list(self._last_shared)

    @property
    def steps(self) -> int:
        """How many steps were applied (skipped steps not counted)."""
        return self._steps

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite loss or gradient (``nonfinite="skip"``)."""
        return self._skipped

    @property
    def last_weights(self) -> Tensor | None:
        """The weights of the last `backward`, in the balancer's task order (a fresh copy in
        the default dtype on each access; NaN after a skipped step)."""
        w = self._last_weights
        return None if w is None else w.to(torch.get_default_dtype(), copy=True)

    @property
    def last_losses(self) -> Tensor | None:
        """The (detached, float64) losses of the last `backward`."""
        return self._last_losses

    @property
    def last_gramian(self) -> Tensor | None:
        """The Gramian of the last `backward`, for gradient methods (float64)."""
        return self._last_gramian

    # ------------------------------------------------------------------ the step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter of the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending.clear()
        self._skip_next_step = False
        self._unsynced = False

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
        previous = self._grad_sync
        self._grad_sync = False
        try:
            yield
        finally:
            self._grad_sync = previous

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
        try:
            tasks, loss_list, call_order = _inputs.parse_losses(losses, self._tasks)
            self._check_graph(loss_list)
            self._check_devices(tasks, loss_list)
            self._resolve_step(tasks, loss_list)
            kpi_tensor = (
                _inputs.parse_kpis(kpis, tasks, method.name) if KPIS in method.requires else None
            )
            feature_list: list[Tensor] = []
            if self._strategy == "representation" or (
                self._strategy == "chained" and self._engine_request == "chained"
            ):
                feature_list = _inputs.as_feature_list(features, method.name)
            elif features is not None and self._chained_ok and method.is_gradient_method():
                # engine="auto" uses features only to speed up the Jacobian: unusable ones are
                # ignored
                with contextlib.suppress(TypeError, LossError, MissingInputError):
                    feature_list = _inputs.as_feature_list(features, method.name)
            scale = self._scale_tensor(scaler, loss_list[0].device)
        except (GradBalanceError, ValueError, TypeError) as exc:
            if sync is not None:
                # an input error on one rank only: agree on it first, then raise on every rank
                # (the others would block in the next collective, or mix steps if caught)
                self._agree(sync, exc)
            raise
        if sync is not None and self._tasks is None:
            self._agree(sync, None)  # the first step: before K is known, the flags alone
        snapshot = self._snapshot() if self._tasks is None else None
        try:
            if snapshot is not None:
                self._bind(tasks, from_backward=True)
            result = self._balance(
                tasks,
                loss_list,
                call_order,
                kpi_tensor,
                feature_list,
                scale,
                retain_graph,
                sync,
                bound=snapshot is None,
            )
        except BaseException as exc:
            if snapshot is not None:
                # a failing first backward leaves no trace: tasks unbound, no method state,
                # no param group
                self._restore(snapshot)
            if isinstance(exc, (RuntimeError, NotImplementedError)) and not isinstance(
                exc, GradBalanceError
            ):
                self._explain_sparse(loss_list, exc)
            raise
        if not retain_graph:
            for loss in loss_list:
                node = loss.grad_fn
                if node is not None:
                    _node_metadata(node)[_CONSUMED] = True
        return result

    def _balance(
        self,
        tasks: tuple[str, ...],
        loss_list: list[Tensor],
        call_order: list[int],
        kpi_tensor: Tensor | None,
        feature_list: list[Tensor],
        scale: Tensor | None,
        retain_graph: bool,
        sync: _distributed.Synchronizer | None,
        bound: bool,
    ) -> Tensor:
        """`backward` once the inputs are valid (on every rank) and the tasks bound."""
        method = self.method
        loss_only = not method.is_gradient_method()
        stacked, detached = _stack_losses(loss_list, differentiable=loss_only)
        if sync is not None:
            # every rank must take the same branch below: decide on the global losses. Past the
            # first step the ranks also agree here, in the same all-reduce, that every rank's
            # inputs were valid (a rank with invalid inputs sends zeros and its flag)
            reduced = [detached]
            if kpi_tensor is not None:
                kpis_here = kpi_tensor.to(device=detached.device, dtype=torch.float64, copy=True)
                reduced.append(kpis_here)
            if bound:
                failed = sync.agree_(False, reduced, detached.device)
                if failed:
                    raise self._rank_error(failed)
            else:
                sync.mean_(reduced)
            if kpi_tensor is not None:
                kpi_tensor = kpis_here.to(kpi_tensor.device)
        # one host transfer of K numbers, checked in Python (cheaper than isfinite + all)
        bad = [tasks[i] for i, v in enumerate(detached.tolist()) if not math.isfinite(v)]
        if bad:
            where = " (on some rank)" if sync is not None else ""
            return self._nonfinite(
                f"the loss of task(s) {bad} is not finite{where}", scale, call_order
            )

        if not loss_only:
            return self._backward_gradient(
                tasks,
                loss_list,
                detached,
                kpi_tensor,
                feature_list,
                scale,
                retain_graph,
                call_order,
            )
        return self._backward_losses(
            tasks, loss_list, stacked, detached, kpi_tensor, scale, retain_graph, call_order
        )

    @staticmethod
    def _check_graph(loss_list: list[Tensor]) -> None:
        """Refuse losses whose graph an earlier `backward` consumed (``retain_graph=False``).

        Autograd itself raises only where the graph's saved tensors were freed, which the
        balancer's engines do not do alike on every step; this check makes a second backward
        raise at every step, before anything is modified.
        """
        for i, loss in enumerate(loss_list):
            node = loss.grad_fn
            if node is not None and _node_metadata(node).get(_CONSUMED):
                raise LossError(
                    f"trying to backward through the graph a second time: backward() was "
                    f"already called on these losses (loss #{i} of this call) and freed their "
                    "graph; recompute the losses (a new forward pass), or pass "
                    "retain_graph=True to the first backward() to backpropagate twice"
                )

    def _agree(self, sync: _distributed.Synchronizer, error: BaseException | None) -> None:
        """Agree with the other ranks on whether some rank's inputs were invalid.

        Sends what the valid ranks send at this point of `backward` (zeros in place of the
        losses and KPIs once the tasks are bound), so that the collectives match. Returns when
        every rank's inputs were valid; a rank with ``error`` returns too and raises it itself,
        the others raise an error that names the failing ranks.
        """
        device = self._optimizer_params()[0].device
        placeholder = []
        if error is not None and self._tasks is not None:
            k = len(self._tasks) * (2 if KPIS in self.method.requires else 1)
            placeholder = [torch.zeros(k, dtype=torch.float64, device=device)]
        failed = sync.agree_(error is not None, placeholder, device)
        if failed and error is None:
            raise self._rank_error(failed)

    @staticmethod
    def _rank_error(failed: list[int]) -> GradBalanceError:
        return GradBalanceError(
            f"backward() got invalid inputs on rank(s) {failed} (see the error raised there); "
            "nothing was applied on any rank. Every rank raises at this same step, so a "
            "training loop that catches the error and continues keeps the ranks in step"
        )

    def _explain_sparse(self, loss_list: list[Tensor], exc: BaseException) -> None:
        """After the engine failed: raise a clear error if a parameter whose per-task gradients
        the engine stacks receives sparse gradients (``nn.Embedding(sparse=True)``)."""
        if not self.method.is_gradient_method() or self._strategy == "representation":
            return
        shared = self._shared
        sparse = _graph.sparse_gradient_leaves(loss_list)
        named = [self._label(p) for p in shared if id(p) in sparse]
        if named:
            names = ", ".join(named)
            raise GradBalanceError(
                f"{names} receives sparse gradients (nn.Embedding(sparse=True)?), but method "
                f"{self.method.name!r} needs the dense per-task gradients of the shared "
                "parameters; build it with sparse=False, leave it out of shared=..., or use a "
                "loss weighting method (task-specific sparse parameters are fine)"
            ) from exc
        if self._strategy == "batched":
            shared_ids = {id(p) for p in shared}
            others = [
                self._label(p)
                for p in self._optimizer_params()
                if id(p) not in shared_ids and id(p) in sparse
            ]
            if others:
                raise GradBalanceError(
                    f"{', '.join(others)} receive(s) sparse gradients, which engine='batched' "
                    "(vmap) cannot compute; use engine='loop' or 'auto'"
                ) from exc

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
        if self._skip_next_step:
            self._skip_next_step = False
            self._pending.clear()
            return result
        if self._unsynced:
            raise RuntimeError(
                "GradBalancer.step(): .grad still holds rank-local gradients of backward() "
                "calls made inside no_sync(); call backward() once outside no_sync() before "
                "step(), so that they are averaged over the ranks"
            )
        if closure is None:
            self.optimizer.step()
        else:
            first = [result]

            def evaluate() -> Any:
                if first:
                    return first.pop()
                with torch.enable_grad():
                    return closure()

            result = self.optimizer.step(evaluate)
            # a re-evaluation skipped for a non-finite loss must not skip the next step
            self._skip_next_step = False
        balanced = bool(self._pending)
        for inputs, weights in self._pending:
            self.method.update(inputs, weights)
        self._pending.clear()
        if balanced:
            self._steps += 1
        return result

    # ------------------------------------------------------------------ backward paths
    def _backward_losses(
        self,
        tasks: tuple[str, ...],
        loss_list: list[Tensor],
        stacked: Tensor | None,
        detached: Tensor,
        kpis: Tensor | None,
        scale: Tensor | None,
        retain_graph: bool,
        call_order: list[int],
    ) -> Tensor:
        method = self.method
        last_gram = None
        if LAST_SHARED_GRAMIAN in method.requires:
            scaled = loss_list
            if scale is not None:
                scaled = [loss * scale.to(loss.dtype) for loss in loss_list]
            tg = _engine.task_gradients(
                scaled, self._last_shared, strategy="loop", retain_graph=True
            )
            sync = self._sync
            rows = tg.rows
            if sync is not None and sync.exact:
                rows = sync.mean(rows, self._last_shared, (len(tasks),))
            last_gram = self._finish_gramian(
                _engine.gramian(rows, len(tasks)),
                scale,
                rank_local=sync is not None and not sync.exact,
            )
            bad = self._nonfinite_tasks(last_gram, tasks)
            if bad:
                return self._nonfinite(
                    f"the gradient of task(s) {bad} on the last shared layer is not finite",
                    scale,
                    call_order,
                )
        inputs = StepInputs(
            tasks=tasks,
            losses=detached,
            last_shared_gramian=last_gram,
            kpis=kpis,
            step=self._steps,
        )
        weights = method.weights(inputs)
        self._check_weights(weights, len(tasks))
        objective = _weighted_sum(weights, loss_list, stacked)
        extra = method.extra_loss(inputs)
        if extra is not None:
            objective = objective + extra
        assert objective is not None
        if scale is not None:
            objective = objective * scale.to(objective.dtype)
        params = [p for p in self._optimizer_params() if p.requires_grad]
        grads = _engine.objective_gradients(objective, params, retain_graph=retain_graph)
        if self._sync is not None:
            failed = self._commit(
                params,
                grads,
                [False] * len(params),
                f"the gradient of the weighted loss of {list(tasks)}",
                scale,
                call_order,
            )
            if failed is not None:
                return failed
            return self._finish(inputs, weights, call_order, gramian=None)
        bad_params = self._nonfinite_params(params, grads)
        if bad_params:
            return self._nonfinite(
                f"the gradient of the weighted loss is not finite in {bad_params} although "
                f"every loss of {list(tasks)} is finite",
                scale,
                call_order,
            )
        self._write(params, grads)
        return self._finish(inputs, weights, call_order, gramian=None)

    def _backward_gradient(
        self,
        tasks: tuple[str, ...],
        loss_list: list[Tensor],
        detached: Tensor,
        kpis: Tensor | None,
        features: list[Tensor],
        scale: Tensor | None,
        retain_graph: bool,
        call_order: list[int],
    ) -> Tensor:
        method = self.method
        k = len(tasks)
        shared = self._shared
        shared_ids = {id(p) for p in shared}
        others = [
            p for p in self._optimizer_params() if p.requires_grad and id(p) not in shared_ids
        ]
        representation = self._strategy == "representation"
        if scale is not None:
            loss_list = [loss * scale.to(loss.dtype) for loss in loss_list]
        if representation:
            tg = _engine.task_gradients(
                loss_list, features, others, strategy="loop", retain_graph=True
            )
            missing = [tasks[i] for i in range(k) if not tg.task_reached[i]]
            if missing:
                raise LossError(
                    f"the loss of task(s) {missing} does not depend on the features passed to "
                    "backward(); pass the shared representation every head reads"
                )
        else:
            if not shared:
                raise UnreachedParameterError("no shared parameter requires grad")
            if self._strategy == "auto" and self._wants_memory(k):
                self._strategy = "memory"
            if self._strategy == "memory":
                return self._backward_memory(
                    tasks, loss_list, detached, kpis, others, scale, retain_graph, call_order
                )
            chained = (
                self._chained(loss_list, features, shared, others, retain_graph)
                if features and self._chained_ok
                else None
            )
            tg = (
                chained
                if chained is not None
                else self._parameter_rows(loss_list, shared, others, retain_graph)
            )
            if self._sync is not None and self._sync.exact:
                # the global batch's Jacobian is the mean of the ranks' Jacobians
                tg.rows = self._sync.mean(tg.rows, shared, (k,))
            _check_reached(shared, tg.reached, self._label)
        sync = self._sync
        gram = self._finish_gramian(
            tg.gramian(k),
            scale,
            rank_local=sync is not None and (representation or not sync.exact),
            # feature gradients of different ranks belong to different samples:
            # G = Σ_r G_r / R², the Gramian of the global batch's mean loss
            samples_per_rank=representation,
        )
        bad = self._nonfinite_tasks(gram, tasks)
        if bad:
            return self._nonfinite(
                f"the gradient of task(s) {bad} on the shared "
                f"{'features' if representation else 'parameters'} is not finite",
                scale,
                call_order,
            )
        bad_params = [] if sync is not None else self._nonfinite_params(others, tg.others)
        if bad_params:
            return self._nonfinite(
                f"the gradient of the {', '.join(bad_params)} is not finite", scale, call_order
            )
        inputs = StepInputs(
            tasks=tasks,
            losses=detached,
            gramian=gram,
            kpis=kpis,
            step=self._steps,
            jacobian=self._jacobian_for(method, tg, scale),
        )
        weights = method.weights(inputs).detach()
        self._check_weights(weights, k)
        if inputs.jacobian is not None:
            combined = self._method_combine(method, inputs, weights, tg.rows, scale)
        else:
            combined = tg.combine(weights)
        if representation:
            shared_grads = _engine.backprop_features(
                features, shared, combined, retain_graph=retain_graph
            )
            unreached = [self._label(p) for p, g in zip(shared, shared_grads) if g is None]
            if unreached:
                raise UnreachedParameterError(
                    f"the features passed to backward() do not depend on {', '.join(unreached)}; "
                    "remove it from shared=... or pass the features computed from it"
                )
            bad_params = [] if sync is not None else self._nonfinite_params(shared, shared_grads)
            if bad_params:
                return self._nonfinite(
                    f"the trunk gradient is not finite in {bad_params}", scale, call_order
                )
            update, update_global = shared_grads, False
        else:
            update, update_global = combined, sync is not None and sync.exact
        if sync is not None:
            failed = self._commit(
                [*shared, *others],
                [*update, *tg.others],
                [update_global] * len(shared) + [False] * len(others),
                "the balanced gradient",
                scale,
                call_order,
            )
            if failed is not None:
                return failed
            return self._finish(inputs, weights, call_order, gramian=gram)
        self._write(shared, update)
        self._write(others, tg.others)
        return self._finish(inputs, weights, call_order, gramian=gram)

    def _chained(
        self,
        loss_list: list[Tensor],
        features: list[Tensor],
        shared: list[Tensor],
        others: list[Tensor],
        retain_graph: bool,
    ) -> _engine.TaskGradients | None:
        """The shared Jacobian by the chained path (`gradbalance.engine.chained_gradients`),
        or ``None`` (and no more tries) when the heads reach shared parameters other than
        through the features."""
        batched = self._chained_batched
        if batched is None:
            # first use: try the vmapped trunk backward on a kept graph; settle on K ordinary
            # trunk backwards if vmap fails or would hit slow fallbacks
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tg = _engine.chained_gradients(
                        loss_list, features, shared, others, retain_graph=True
                    )
            except (RuntimeError, NotImplementedError) as exc:
                logger.info("chained engine: vmap through the trunk failed (%s); looping", exc)
                self._chained_batched = False
                return self._chained(loss_list, features, shared, others, retain_graph)
            slow = [w for w in caught if "batching rule" in str(w.message).lower()]
            for w in caught:
                if w not in slow:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self._chained_batched = not slow
            if (
                not slow
                and tg is not None
                and loss_list[0].device.type == "cpu"
                and not torch.are_deterministic_algorithms_enabled()
            ):
                # on CPU, K ordinary trunk backwards can beat the vmapped one (MLP trunks):
                # time one step of each and keep the faster (both give the same Jacobian up to
                # rounding; under torch.use_deterministic_algorithms(True) we skip the timing
                # and keep the vmapped trunk, so fresh runs agree bit for bit)
                self._chained_timing = {}
        elif self._chained_timing is not None:
            trial = False in self._chained_timing  # the looped trunk first, then the vmapped
            start = time.perf_counter()
            tg = _engine.chained_gradients(
                loss_list, features, shared, others, retain_graph=retain_graph, batched=trial
            )
            self._chained_timing[trial] = time.perf_counter() - start
            if len(self._chained_timing) == 2:
                self._chained_batched = self._chained_timing[True] <= self._chained_timing[False]
                logger.info(
                    "chained engine: trunk backward %s (timed %.3g s vmapped, %.3g s looped)",
                    "vmapped" if self._chained_batched else "looped",
                    self._chained_timing[True],
                    self._chained_timing[False],
                )
                self._chained_timing = None
        else:
            tg = _engine.chained_gradients(
                loss_list, features, shared, others, retain_graph=retain_graph, batched=batched
            )
        if tg is None:
            self._chained_ok = False
            if self._strategy == "chained":
                logger.warning(
                    "gradbalance: engine='chained' needs task losses that reach the shared "
                    "parameters only through the features passed to backward(); they do not, "
                    "so the loop engine is used instead"
                )
                self._strategy = "loop"
            return None
        if self._strategy == "auto":
            self._strategy = "chained"
        return tg

    def _parameter_rows(
        self,
        loss_list: list[Tensor],
        shared: list[Tensor],
        others: list[Tensor],
        retain_graph: bool,
    ) -> _engine.TaskGradients:
        """The shared Jacobian by the loop or batched engine (resolving ``"auto"``)."""
        strategy = self._strategy
        if strategy == "chained":
            # auto settled on the chained path, but this step passed no features
            strategy = self._fallback_strategy
        if strategy == "auto":
            if loss_list[0].device.type == "cpu":
                # measured (benchmarks/step.py): on CPU, K backwards beat one vmapped backward
                # at every K on both benchmark models; vmap pays on accelerators. The graph is
                # kept on this resolving step, as the batched probe keeps it.
                tg = _engine.task_gradients(
                    loss_list, shared, others, strategy="loop", retain_graph=True
                )
                strategy = "loop"
            else:
                tg, strategy = _engine.probe_batched(loss_list, shared, others, retain_graph)
            self._fallback_strategy = strategy
            if self._strategy == "auto":
                self._strategy = strategy
            return tg
        return _engine.task_gradients(
            loss_list, shared, others, strategy=strategy, retain_graph=retain_graph
        )

    def _wants_memory(self, k: int) -> bool:
        """Whether ``engine="auto"`` takes the memory-light path for ``k`` tasks."""
        return (
            JACOBIAN not in self.method.requires
            and _engine.jacobian_numel(self._shared, k) > self._memory_threshold
        )

    def _backward_memory(
        self,
        tasks: tuple[str, ...],
        loss_list: list[Tensor],
        detached: Tensor,
        kpis: Tensor | None,
        others: list[Tensor],
        scale: Tensor | None,
        retain_graph: bool,
        call_order: list[int],
    ) -> Tensor:
        """The memory-light gradient path: Gramian group by group, then one weighted backward.

        ``loss_list`` is already scaled by the GradScaler's scale, if any.
        """
        k = len(tasks)
        shared = self._shared
        sync = self._sync
        hook = None
        if sync is not None and sync.exact:

            def hook(rows: list[Tensor | None], tensors: list[Tensor]) -> list[Tensor | None]:
                return sync.mean(rows, tensors, (k,))

        mg = _engine.memory_gramian(
            loss_list,
            shared,
            others,
            budget=self._memory_threshold,
            strategy=self._memory_inner,
            rows_hook=hook,
        )
        self._memory_inner = mg.strategy
        _check_reached(shared, mg.reached, self._label)
        gram = self._finish_gramian(
            mg.gramian, scale, rank_local=sync is not None and not sync.exact
        )
        bad = self._nonfinite_tasks(gram, tasks)
        if bad:
            return self._nonfinite(
                f"the gradient of task(s) {bad} on the shared parameters is not finite",
                scale,
                call_order,
            )
        inputs = StepInputs(tasks=tasks, losses=detached, gramian=gram, kpis=kpis, step=self._steps)
        weights = self.method.weights(inputs).detach()
        self._check_weights(weights, k)
        update = _engine.weighted_gradients(loss_list, weights, shared, retain_graph=retain_graph)
        params, grads = [*shared, *others], [*update, *mg.others]
        if sync is not None:
            failed = self._commit(
                params, grads, [False] * len(params), "the balanced gradient", scale, call_order
            )
            if failed is not None:
                return failed
        else:
            bad_params = self._nonfinite_params(params, grads)
            if bad_params:
                return self._nonfinite(
                    f"the balanced gradient is not finite in {bad_params}", scale, call_order
                )
            self._write(params, grads)
        return self._finish(inputs, weights, call_order, gramian=gram)

    def _finish_gramian(
        self,
        gram: Tensor,
        scale: Tensor | None,
        *,
        rank_local: bool,
        samples_per_rank: bool = False,
    ) -> Tensor:
        """The Gramian every rank uses: averaged over ranks when it was computed from
        rank-local gradients (``samples_per_rank``: from per-rank feature gradients under
        ``"global"``, where the global batch's Gramian is ``Σ_r G_r / R²``), then unscaled."""
        sync = self._sync
        if sync is not None and rank_local:
            sync.mean_([gram])
            if samples_per_rank and sync.exact:
                gram.div_(sync.world_size)
        if scale is not None:
            gram = gram / scale.to(torch.float64) ** 2
        return gram

    def _synchronizer(self) -> _distributed.Synchronizer | None:
        """Resolve ``distributed=`` on the first backward (the process group exists by then)."""
        if not self._sync_resolved:
            sync = _distributed.resolve(self._distributed_request, self._process_group)
            if sync is not None and not sync.exact and JACOBIAN in self.method.requires:
                raise ValueError(
                    f"method {self.method.name!r} builds its update from the task gradients "
                    "themselves (JACOBIAN), which distributed='local' leaves rank-local; use "
                    "distributed='global'"
                )
            self._sync = sync
            self._sync_resolved = True
        return self._sync

    def _commit(
        self,
        params: list[Tensor],
        grads: list[Tensor | None],
        is_global: list[bool],
        what: str,
        scale: Tensor | None,
        call_order: list[int],
    ) -> Tensor | None:
        """Average what is still rank-local, check finiteness on every rank alike, write.

        Only used when a `Synchronizer` is active. ``is_global[i]`` marks gradients that are
        already the same on every rank (computed from averaged rows). Returns the NaN weights
        of a skipped step, else ``None`` (and ``.grad`` holds the update).
        """
        sync = self._sync
        assert sync is not None
        device = params[0].device
        if not self._grad_sync:
            # inside no_sync(): keep the gradients rank-local; agree only on finiteness
            bad = self._nonfinite_params(params, grads)
            if sync.any(bool(bad), device):
                return self._nonfinite(
                    f"{what} is not finite in {bad or 'the parameters of another rank'}",
                    scale,
                    call_order,
                )
            self._write(params, grads)
            self._unsynced = True
            return None
        grads = list(grads)
        if self._unsynced:
            # fold in the rank-local gradients accumulated inside no_sync(): .grad is linear
            # in the micro-batches, so averaging the sum is exact
            positions = {id(p): i for i, p in enumerate(params)}
            params = list(params)
            for q in self._optimizer_params():
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
        bad = self._nonfinite_params(params, grads)
        if bad:
            return self._nonfinite(f"{what} is not finite in {bad}", scale, call_order)
        if self._unsynced:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g.to(p.dtype).detach()
            self._unsynced = False
        else:
            self._write(params, grads)
        return None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _jacobian_for(
        method: Method, tg: _engine.TaskGradients, scale: Tensor | None
    ) -> tuple[Tensor | None, ...] | None:
        """The unscaled Jacobian rows for methods that require them, else ``None``."""
        if JACOBIAN not in method.requires:
            return None
        rows = tg.rows
        if scale is None:
            return tuple(rows)
        return tuple(None if r is None else r / scale.to(r.dtype) for r in rows)

    @staticmethod
    def _method_combine(
        method: Method,
        inputs: StepInputs,
        weights: Tensor,
        rows: list[Tensor | None],
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

    @staticmethod
    def _scale_tensor(scaler: Any, device: torch.device) -> Tensor | None:
        if scaler is None:
            return None
        if not hasattr(scaler, "scale") or not hasattr(scaler, "is_enabled"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), device=device, dtype=torch.float32))

    @staticmethod
    def _check_weights(weights: Tensor, k: int) -> None:
        if not isinstance(weights, Tensor) or weights.shape != (k,):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise SolverError(f"the method returned weights of shape {shape}, expected ({k},)")
        if not all(math.isfinite(v) for v in weights.detach().tolist()):
            raise SolverError(
                f"the method returned non-finite weights {weights.detach().tolist()}; "
                "nothing was applied"
            )

    @staticmethod
    def _nonfinite_tasks(gram: Tensor, tasks: tuple[str, ...]) -> list[str]:
        """The tasks whose own gradient is not finite: ``G_ii = ‖g_i‖²`` (a NaN in ``g_i``
        spreads through row and column ``i`` of ``G`` to every task, but only ``G_ii`` is
        task ``i``'s own); every task with a non-finite row if the diagonal is finite."""
        if math.isfinite(gram.sum().item()):  # a finite sum has only finite terms
            return []
        own_ok = torch.isfinite(torch.diagonal(gram))
        if bool(own_ok.all()):
            own_ok = torch.isfinite(gram).all(dim=1)
        return [tasks[i] for i, ok in enumerate(own_ok.tolist()) if not ok]

    def _nonfinite_params(self, params: list[Tensor], grads: list[Tensor | None]) -> list[str]:
        if _all_finite(grads):
            return []
        # rare path: name the offending tensors one by one
        checks = [(i, g) for i, g in enumerate(grads) if g is not None]
        flags = torch.stack([torch.isfinite(_finite_view(g)).all() for _, g in checks])
        if bool(flags.all()):
            return []
        return [self._label(params[i]) for (i, _), ok in zip(checks, flags.tolist()) if not ok]

    def _nonfinite(
        self,
        reason: str,
        scale: Tensor | None,
        call_order: list[int],
    ) -> Tensor:
        k = len(call_order)
        nan = torch.full((k,), math.nan)
        if scale is not None:
            # Under a GradScaler an overflow is expected: mark the gradients non-finite so that
            # scaler.step() skips the inner step and scaler.update() lowers the scale.
            target = self._shared[0] if self._shared else self._optimizer_params()[0]
            inf = torch.full_like(target, math.inf)
            target.grad = inf if target.grad is None else target.grad.add_(inf)
            self._last_weights = nan
            return nan
        if self.nonfinite == "skip":
            self._skipped += 1
            self._skip_next_step = True
            logger.warning("gradbalance: skipping the step: %s", reason)
            self._last_weights = nan
            return nan
        raise NonFiniteError(
            f"{reason}; nothing was applied. Lower the learning rate, check the data, or "
            "build the balancer with nonfinite='skip' to skip such steps"
        )

    @staticmethod
    def _write(params: list[Tensor], grads: list[Tensor | None]) -> None:
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

    def _finish(
        self, inputs: StepInputs, weights: Tensor, call_order: list[int], gramian: Tensor | None
    ) -> Tensor:
        w = weights.detach() if weights.requires_grad else weights
        self._pending.append((inputs, w))
        self._last_weights = w  # `last_weights` converts (and copies) on access
        self._last_losses = inputs.losses
        self._last_gramian = gramian
        if call_order == list(range(len(call_order))):
            return w.to(torch.get_default_dtype(), copy=True)
        return w[call_order].to(torch.get_default_dtype())

    def _check_method_state(self, saved: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``saved`` has the keys of the method's state, in their
        shapes. Keys the method does not hold yet are left to its own loader (some methods
        create state lazily and accept it from a checkpoint; others refuse it)."""
        expected = self.method.state_dict()
        missing = sorted(set(expected) - set(saved))
        where = f"method {self.method.name!r} (tasks {self.tasks})"
        if missing:
            raise ValueError(
                f"the method state in the state dict does not fit {where}: it lacks {missing}; "
                "was it saved with other tasks or method options?"
            )
        for key, value in expected.items():
            if isinstance(value, Tensor) and (
                not isinstance(saved[key], Tensor) or saved[key].shape != value.shape
            ):
                got = tuple(saved[key].shape) if isinstance(saved[key], Tensor) else saved[key]
                raise ValueError(
                    f"the method state in the state dict does not fit {where}: {key!r} is "
                    f"{got}, expected shape {tuple(value.shape)}"
                )

    def _check_optimizer_state(self, saved: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``saved``'s param groups match the inner optimizer's."""
        groups = saved["param_groups"]
        current = self.optimizer.param_groups
        if not isinstance(saved["state"], Mapping) or not isinstance(groups, Sequence):
            raise ValueError("the optimizer state in the state dict is not an optimizer state dict")
        if len(groups) != len(current):
            note = ""
            if any(p.requires_grad for p in self.method.parameters()):
                note = " (the method's learnable parameters have a group of their own)"
            raise ValueError(
                f"the optimizer state in the state dict has {len(groups)} param group(s), this "
                f"balancer's inner optimizer has {len(current)}{note}"
            )
        for i, (group, mine) in enumerate(zip(groups, current)):
            params = group.get("params") if isinstance(group, Mapping) else None
            if not isinstance(params, Sequence) or len(params) != len(mine["params"]):
                size = len(params) if isinstance(params, Sequence) else params
                raise ValueError(
                    f"param group {i} of the optimizer state in the state dict holds {size} "
                    f"parameters, this balancer's inner optimizer holds {len(mine['params'])}; "
                    "was it saved for another model?"
                )

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
        return _checkpoint.pack(
            self.optimizer.state_dict(),
            self.method.state_dict(),
            {
                "method": self.method.name,
                "tasks": self.tasks,
                "steps": self._steps,
                "skipped_steps": self._skipped,
                "engine": self._strategy,
                # the chained engine's timed choice, so that a resumed run makes the same one
                "chained_trunk": (
                    None
                    if self._chained_batched is None or self._chained_timing is not None
                    else ("vmapped" if self._chained_batched else "looped")
                ),
            },
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a `state_dict` into this balancer (built like the saved one).

        All or nothing: the task names, the method's state (keys and shapes) and the inner
        optimizer's param groups are checked before anything is loaded; on any error the
        balancer, its method and the inner optimizer are left as they were. Reads the current
        layout and the older ``{"optimizer", "method", "balancer"}`` one.
        """
        optimizer_state, method_state, meta = _checkpoint.unpack(state_dict)
        if meta.get("method") != self.method.name:
            raise ValueError(
                f"state dict was saved with method {meta.get('method')!r}, this balancer uses "
                f"{self.method.name!r}"
            )
        saved_tasks = meta.get("tasks")
        if saved_tasks is not None:
            saved_tasks = _inputs.validate_task_names(saved_tasks)
            if self._tasks is not None and self._tasks != saved_tasks:
                raise ValueError(
                    f"state dict was saved for tasks {list(saved_tasks)}, this balancer has "
                    f"{self.tasks}"
                )
        counters = {}
        for key in ("steps", "skipped_steps"):
            value = meta.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state dict has {key}={value!r}; expected an int >= 0")
            counters[key] = value
        snapshot = self._snapshot()
        inner = self.optimizer.state, self.optimizer.param_groups
        backup = None
        try:
            if saved_tasks is not None and self._tasks is None:
                self._bind(saved_tasks)
            self._check_method_state(method_state)
            self._check_optimizer_state(optimizer_state)
            if snapshot[1] is not None:
                # the method was bound: keep its values, to put them back if loading fails
                backup = {
                    k: v.detach().clone() if isinstance(v, Tensor) else v
                    for k, v in self.method.state_dict().items()
                }
            self.optimizer.load_state_dict(optimizer_state)
            self.method.load_state_dict(method_state)
        except BaseException:
            self.optimizer.__setstate__({"state": inner[0], "param_groups": inner[1]})
            self._restore(snapshot)  # drops what binding (or a lazy loader) created
            if backup is not None:
                self.method.load_state_dict(backup)
            raise
        self._steps = counters["steps"]
        self._skipped = counters["skipped_steps"]
        engine_used = meta.get("engine")
        if self._engine_request == "auto" and engine_used in ("loop", "batched", "chained"):
            self._strategy = engine_used
        trunk = meta.get("chained_trunk")
        if self._chained_ok and trunk in ("vmapped", "looped"):
            self._chained_batched = trunk == "vmapped"
            self._chained_timing = None
        self._pending.clear()
        self._skip_next_step = False
