"""`ParameterSet`: which parameters a step balances, and how errors name them.

It resolves ``shared=`` (tensors, a module, a model that declares its shared part, or
``"auto"``) and ``last_shared=``, finds at each step the shared set and the last shared layer
from the autograd graph where needed, checks that every loss reaches a parameter of the inner
optimizer, and names a parameter in errors by its name, its index in ``shared=`` or the tasks
whose loss reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from gradbalance import _graph
from gradbalance.errors import LossError, OptionError, UnreachedParameterError
from gradbalance.methods import LAST_SHARED_GRAMIAN, Method

__all__ = ["ParameterSet", "check_declared", "check_reached", "raise_unreached_loss"]


def check_reached(
    shared: Sequence[Tensor], reached: Sequence[bool], label: Callable[[Tensor], str]
) -> None:
    """Raise `UnreachedParameterError` naming the shared tensors no task loss reaches."""
    unreached = [label(p) for p, r in zip(shared, reached) if not r]
    if unreached:
        raise UnreachedParameterError(
            f"no task loss reaches {', '.join(unreached)}; remove it from shared=... "
            "or check that the model uses it"
        )


class ParameterSet:
    """The parameters of one balancer: the inner optimizer's, the shared ones, the last shared
    layer, and the task names (for labels).

    Args:
        optimizer: the inner optimizer.
        shared: ``shared=`` as the balancer takes it.
        last_shared: ``last_shared=`` as the balancer takes it, or ``None``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        shared: Any,
        last_shared: Iterable[Tensor] | nn.Module | None,
    ) -> None:
        self.optimizer = optimizer
        self.tasks: tuple[str, ...] | None = None
        self.names: dict[int, str] = {}
        self.owners: dict[int, int] = {}
        self._params_cache: tuple[Any, ...] | None = None
        self._resolved: tuple[Any, ...] | None = None
        self.shared_all, model_last = self._resolve_shared(shared)
        self.last_all: list[Tensor] | None = None
        if last_shared is not None:
            self.last_all = self.resolve(last_shared, "last_shared")
        elif model_last:
            self.last_all = model_last

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_params_cache"] = None
        state["_resolved"] = None  # keyed on the identity of the optimizer's parameter list
        return state

    # ------------------------------------------------------------------ the inner optimizer's
    def optimizer_params(self) -> list[Tensor]:
        """The inner optimizer's parameters, each once, in group order.

        Cached between steps; the cache is keyed on the identity and length of every group's
        parameter list, so ``add_param_group``, a replaced or resized ``params`` list or a
        loaded state dict rebuild it.
        """
        groups = self.optimizer.param_groups
        lists = [group["params"] for group in groups]
        sizes = [len(params) for params in lists]
        cache = self._params_cache
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
        self._params_cache = (lists, sizes, tuple(out))
        return out

    def resolve(self, params: Iterable[Tensor] | nn.Module | None, what: str) -> list[Tensor]:
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
                self.names.setdefault(id(param), name)
            items = [param for _, param in named]
        else:
            items = list(params)
        in_optimizer = {id(p) for p in self.optimizer_params()}
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
                self.names.setdefault(id(p), name)
            params = self.resolve(list(declares()), "shared")
            declares_last = getattr(shared, "last_shared_parameters", None)
            last = (
                self.resolve(list(declares_last()), "last_shared")
                if callable(declares_last)
                else []
            )
            return params, last
        return self.resolve(shared, "shared"), []

    # ------------------------------------------------------------------ this step's sets
    @property
    def shared(self) -> list[Tensor]:
        """The shared tensors of this step (resolved at the start of each `backward`)."""
        if self._resolved is not None:
            return self._resolved[1]
        return self.current_shared()

    @property
    def last_shared(self) -> list[Tensor]:
        """The last shared layer of this step (resolved at the start of each `backward`)."""
        return [] if self._resolved is None else self._resolved[2]

    def current_shared(self) -> list[Tensor]:
        """The shared tensors that require grad now (the last resolved set for ``"auto"``)."""
        if self.shared_all is None:
            return (
                [] if self._resolved is None else [p for p in self._resolved[1] if p.requires_grad]
            )
        in_optimizer = {id(p) for p in self.optimizer_params()}
        return [p for p in self.shared_all if p.requires_grad and id(p) in in_optimizer]

    def current_last_shared(self) -> list[Tensor]:
        """``last_shared=`` less its frozen tensors, else the layer found by the last step."""
        if self.last_all is not None:
            return [p for p in self.last_all if p.requires_grad]
        return list(self.last_shared)

    def resolve_step(self, tasks: tuple[str, ...], losses: list[Tensor], method: Method) -> None:
        """Resolve the shared set and the last shared layer for this step, and check that every
        loss reaches a parameter of the inner optimizer.

        Cheap while the ``requires_grad`` pattern of the watched tensors (the shared ones, or
        every parameter for ``shared="auto"``) and the optimizer's parameter list stay the
        same: one early-exit graph walk per loss. Otherwise (first step, a layer frozen or
        unfrozen) the whole graph is walked once (`gradbalance._graph.walk`). Nothing is
        stored unless every check passes.
        """
        self.optimizer_params()
        assert self._params_cache is not None
        opt_params: tuple[Tensor, ...] = self._params_cache[2]
        auto = self.shared_all is None
        watched: Sequence[Tensor] = opt_params if auto else self.shared_all  # type: ignore[assignment]
        pattern = tuple(p.requires_grad for p in watched)
        if self.last_all is not None:
            pattern += tuple(p.requires_grad for p in self.last_all)
        state = self._resolved
        if state is not None and state[0][0] is opt_params and state[0][1] == pattern:
            ids = state[3]
            for task, loss in zip(tasks, losses):
                if _graph.reaches(loss, ids) is False:
                    raise_unreached_loss([task])
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
                raise_unreached_loss(missing)
        if auto:
            need = min(2, len(tasks))
            shared = [
                p
                for p in opt_params
                if p.requires_grad and bin(graph.reached_by.get(id(p), 0)).count("1") >= need
            ]
        else:
            shared = []
            for p in self.shared_all:  # type: ignore[union-attr]
                if not p.requires_grad:
                    continue
                if id(p) not in ids:
                    raise OptionError(
                        f"{self.label(p)} requires grad but is not in the inner optimizer; "
                        "add it to the optimizer (add_param_group) or keep it frozen"
                    )
                shared.append(p)
        if self.last_all is not None:
            last = [p for p in self.last_all if p.requires_grad]
        else:
            last = _graph.last_layer(graph, shared)
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
                    if self.last_all is not None
                    else "no task loss reaches a shared parameter that requires grad"
                )
            )
        self.owners = {key: mask for key, mask in graph.reached_by.items() if key in ids}
        self._resolved = ((opt_params, pattern), shared, last, ids)

    # ------------------------------------------------------------------ names for errors
    def name_of(self, p: Tensor) -> str | None:
        """The name of ``p``: from ``shared=`` (a module) or the optimizer's ``param_names``."""
        name = self.names.get(id(p))
        if name is not None:
            return name
        for group in self.optimizer.param_groups:
            names = group.get("param_names")
            if names:
                for q, n in zip(group["params"], names):
                    if q is p:
                        return str(n)
        return None

    def label(self, p: Tensor) -> str:
        """How errors name ``p``: by name when known, else by its index in ``shared=`` or by
        the task(s) whose loss reaches it; with its shape."""
        shape = tuple(p.shape)
        shared = any(p is q for q in self.shared_all or self.shared)
        mask = self.owners.get(id(p), 0)
        tasks = self.tasks or ()
        owners = [tasks[i] for i in range(min(mask.bit_length(), len(tasks))) if mask >> i & 1]
        name = self.name_of(p)
        if name is not None:
            of = f" of task {owners[0]!r}" if len(owners) == 1 and not shared else ""
            return f"{'shared ' if shared else ''}parameter {name!r}{of} (shape {shape})"
        if shared and self.shared_all:
            index = next(i for i, q in enumerate(self.shared_all) if q is p)
            return f"shared parameter #{index} (shape {shape})"
        if owners:
            which = f"task {owners[0]!r}" if len(owners) == 1 else f"tasks {owners}"
            return f"{'shared ' if shared else ''}parameter of {which} (shape {shape})"
        return f"{'shared ' if shared else ''}parameter (shape {shape})"


def raise_unreached_loss(tasks: list[str]) -> None:
    raise LossError(
        f"the loss of task(s) {tasks} reaches no parameter of the inner optimizer (a "
        "constant, or computed from tensors the optimizer does not hold), so its gradient "
        "is zero everywhere and balancing it is meaningless; compute it from the model's "
        "output, or leave the task out of this step"
    )


def check_declared(params: ParameterSet, method: Method, shared: Any, last_shared: Any) -> None:
    """Raise ``ValueError`` at construction when ``shared=`` / ``last_shared=`` cannot serve
    ``method``: nothing shared for a gradient method, no last layer for GradNorm."""
    if method.is_gradient_method() and params.shared_all == []:
        if shared is None:
            fix = "pass shared=model.shared_parameters() (or the trunk module)"
        else:
            fix = (
                "the shared= you passed holds no parameter that requires grad (an empty "
                "module or an exhausted generator?); the tasks must share parameters, "
                "or use a method that only weights the losses"
            )
        raise ValueError(
            f"method {method.name!r} balances the gradients of the shared parameters: {fix}"
        )
    if LAST_SHARED_GRAMIAN in method.requires and not (
        params.last_all or (params.last_all is None and params.shared_all != [])
    ):
        if last_shared is not None:
            fix = "the last_shared= you passed holds no parameter"
        elif shared is not None:
            fix = (
                "the shared= you passed holds no parameter that requires grad; pass "
                "last_shared=model.last_shared_layer"
            )
        else:
            fix = "pass shared=... (its last layer is used) or last_shared=model.last_shared_layer"
        raise ValueError(f"method {method.name!r} needs the last shared layer: {fix}")
