"""The base class every balancing method derives from, and the inputs it receives.

A method is a map from a few small things to one weight per task::

    losses (K,) + Gramian (K, K) + optional KPIs / step  ->  weights (K,)

`Method` is an `torch.nn.Module` so that its state (learnable log-variances, loss
histories, random-generator state, ...) lives in parameters, buffers and ``extra_state`` and
travels through ``state_dict`` / ``load_state_dict`` like any module's.

The life cycle of one training step is split in two phases so that nothing is half-applied when
an error occurs or a step is skipped:

1. `Method.weights` computes the weights from `StepInputs`. It must not change any
   state of the method.
2. `Method.update` commits the method's own state change (a new history entry, a weight
   update, ...). The balancer calls it only after the inner optimizer really stepped, so a step
   skipped for a non-finite gradient or by ``torch.amp.GradScaler`` leaves the method untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "FEATURES",
    "GRAMIAN",
    "JACOBIAN",
    "KPIS",
    "LAST_SHARED_GRAMIAN",
    "LOSSES",
    "Method",
    "StepInputs",
]

#: The method reads the (detached) task losses.
LOSSES = "losses"
#: The method reads the Gramian ``G = J Jᵀ`` of the task gradients on the shared parameters.
GRAMIAN = "gramian"
#: The Gramian is taken of the gradients w.r.t. the shared *features* (``backward(features=)``).
FEATURES = "features"
#: The method reads one KPI per task in ``[0, 1]`` (``backward(kpis=)``).
KPIS = "kpis"
#: The method reads the Gramian of the task gradients restricted to the last shared layer.
LAST_SHARED_GRAMIAN = "last_shared_gramian"
#: The method reads the task gradients themselves (the Jacobian rows, tensor by tensor) and
#: may build the shared update from them with `Method.combine` (GradDrop, MoCo). Implies
#: ``GRAMIAN``'s gradient path; not available on the memory-light path.
JACOBIAN = "jacobian"

_KNOWN_REQUIREMENTS = frozenset({LOSSES, GRAMIAN, FEATURES, KPIS, LAST_SHARED_GRAMIAN, JACOBIAN})


@dataclass(frozen=True)
class StepInputs:
    """What a method may read to compute the weights of one step.

    Attributes:
        tasks: the task names, in the balancer's task order.
        losses: the task losses, detached, shape ``(K,)``, float64.
        gramian: ``G = J Jᵀ`` (``(K, K)``, float64) of the per-task gradients on the shared
            parameters (or on the shared features for methods that require ``FEATURES``), or
            ``None`` when the method does not require it.
        last_shared_gramian: the Gramian restricted to the last shared layer, or ``None``.
        kpis: one KPI per task in ``[0, 1]`` (``(K,)``, float64), or ``None``.
        step: how many steps the balancer has completed before this one.
        jacobian: for methods that require `JACOBIAN`, the per-task gradients on the shared
            parameters (or features) as one tensor of shape ``(K, *p.shape)`` per shared
            tensor (``None`` where no task reaches it), in the gradients' own dtype; else
            ``None``. Read-only: do not modify these tensors in place.
    """

    tasks: tuple[str, ...]
    losses: Tensor
    gramian: Tensor | None = None
    last_shared_gramian: Tensor | None = None
    kpis: Tensor | None = None
    step: int = 0
    jacobian: tuple[Tensor | None, ...] | None = None

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``K``."""
        return len(self.tasks)


class Method(nn.Module):
    """Base class of the balancing methods.

    Subclasses set the class attributes and implement `weights`; stateful methods also
    implement `update` (and create their parameters/buffers in `build`, which the first `bind`
    runs).

    Class attributes:
        name: the registry name (``"equal"``, ``"mgda"``, ...).
        requires: what the method reads: a subset of `LOSSES`, `GRAMIAN`,
            `FEATURES`, `KPIS`, `LAST_SHARED_GRAMIAN`. A method that requires
            ``GRAMIAN`` or ``FEATURES`` is a *gradient method*: its weights combine the task
            gradients of the shared parameters (``Jᵀw``) while task-specific parameters get their
            own task's gradient. Any other method is a *loss weighting*: the balancer backpropagates
            ``Σ w_i L_i`` (plus `extra_loss`) through the whole model, as the papers do.
        paper: the citation of the method's paper.
        stateful: whether the method keeps state of its own beyond the task names (buffers,
            learnable parameters, a seed, ...) that `state_dict` must carry. ``None`` (default):
            `gradbalance.methods.describe` infers it.
        stochastic: whether the method draws random numbers (seeded, reproducible from its
            state); ``False`` by default.
        extra_dependencies: the optional packages the method needs (``("cvxpy",)``).
        scale_invariant: what stays unchanged when every loss, and so every task gradient, is
            multiplied by the same ``c > 0`` along a whole run (the method's own state updates
            included, learnable parameters not stepped): ``"weights"`` (the weights; the update
            is multiplied by ``c``), ``"update"`` (the update of the shared parameters itself),
            or ``None`` (default: no claim).
        non_conflicting: whether the update provably has a non-negative inner product with
            every task gradient (``False`` by default: no claim).

    Examples:
        >>> import torch
        >>> from gradbalance.methods import Method, StepInputs, LOSSES
        >>> class Double(Method):
        ...     name = "double"
        ...     requires = frozenset({LOSSES})
        ...     def weights(self, inputs: StepInputs) -> torch.Tensor:
        ...         return torch.full((inputs.num_tasks,), 2.0, dtype=torch.float64)
        >>> m = Double()
        >>> m.bind(("a", "b"))
        >>> m.weights(StepInputs(tasks=("a", "b"), losses=torch.ones(2)))
        tensor([2., 2.], dtype=torch.float64)
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset({LOSSES})
    paper: ClassVar[str] = ""
    stateful: ClassVar[bool | None] = None
    stochastic: ClassVar[bool] = False
    extra_dependencies: ClassVar[tuple[str, ...]] = ()
    scale_invariant: ClassVar[str | None] = None
    non_conflicting: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._tasks: tuple[str, ...] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.requires) - _KNOWN_REQUIREMENTS
        if unknown:
            raise TypeError(
                f"{cls.__name__}.requires has unknown entries {sorted(unknown)}; "
                f"use some of {sorted(_KNOWN_REQUIREMENTS)}"
            )
        if cls.scale_invariant not in (None, "weights", "update"):
            raise TypeError(
                f"{cls.__name__}.scale_invariant must be None, 'weights' or 'update', "
                f"got {cls.scale_invariant!r}"
            )

    # ------------------------------------------------------------------ kind of method
    @classmethod
    def is_gradient_method(cls) -> bool:
        """Whether the method combines task gradients (``Jᵀw``) rather than weighting losses."""
        return bool(cls.requires & {GRAMIAN, FEATURES, JACOBIAN})

    @classmethod
    def example_options(cls, tasks: tuple[str, ...]) -> dict[str, Any]:
        """Constructor options that build a working instance for ``tasks``.

        For tools that sweep over every registered method (benchmarks, tests): ``{}`` for
        methods whose arguments all have defaults; methods with required arguments (``fixed``'s
        hand-tuned weights) override it with placeholder values.

        Examples:
            >>> import gradbalance as gb
            >>> cls = gb.methods.get_class("fixed")
            >>> cls(**cls.example_options(("a", "b")))
            Fixed(weights=[1.0, 1.0])
        """
        return {}

    # ------------------------------------------------------------------ life cycle
    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The task names the method is bound to, or ``None`` before `bind`."""
        return self._tasks

    @property
    def is_bound(self) -> bool:
        """Whether `bind` has been called."""
        return self._tasks is not None

    def bind(self, tasks: tuple[str, ...]) -> None:
        """Tell the method the task names (and so ``K``). Called once, before the first step.

        The first call runs `build`; later calls with the same tasks do nothing, and other tasks
        raise ``ValueError``.
        """
        tasks = tuple(tasks)
        if self._tasks is not None:
            if tasks != self._tasks:
                raise ValueError(
                    f"method {self.name!r} is bound to tasks {list(self._tasks)}, "
                    f"cannot rebind it to {list(tasks)}"
                )
            return
        self.build(tasks)
        self._tasks = tasks

    def build(self, tasks: tuple[str, ...]) -> None:
        """Create what depends on the tasks (buffers, parameters, per-task options).

        Called by the first `bind`, before the method counts as bound: subclasses that need
        ``K`` override this, validate their per-task options first and raise to refuse the
        tasks (the method then stays unbound). Does nothing by default.
        """

    def weights(self, inputs: StepInputs) -> Tensor:
        """Return one weight per task (shape ``(K,)``) without changing any state.

        Loss weightings may return weights that require grad w.r.t. the method's own parameters
        (e.g. uncertainty weighting's log-variances); the balancer then backpropagates into them.
        """
        raise NotImplementedError

    def combine(self, inputs: StepInputs, weights: Tensor) -> list[Tensor | None]:
        """The update of the shared parameters (or features) from the task gradients.

        Only called for methods that require `JACOBIAN`, with ``inputs.jacobian`` set; returns
        one tensor of shape ``p.shape`` (or ``None``) per entry of ``inputs.jacobian``. The
        default is ``Jᵀw``; methods whose update is not a weighted sum of the task gradients
        (GradDrop's sign masks, MoCo's tracked gradients) override it. Like `weights` it must
        not change the method's state: commit state in `update`.
        """
        from gradbalance._linalg import combine

        assert inputs.jacobian is not None
        return combine(inputs.jacobian, weights)

    def extra_loss(self, inputs: StepInputs) -> Tensor | None:
        """An extra scalar added to ``Σ w_i L_i`` by loss weightings (e.g. a regulariser)."""
        return None

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        """Commit the method's state change after the inner optimizer stepped (default: none)."""

    def update_masked(self, inputs: StepInputs, weights: Tensor, skip: Tensor) -> None:
        """`update`, unless ``skip`` (a 0-dim bool tensor on the device) is true.

        Off the CPU a step's skip may be decided on the device (``nonfinite="skip"``); the
        balancer then calls this instead of `update` for methods that override it, so that
        committing their state reads nothing on the host. The override must not read
        ``skip``: write the change through it (``torch.where``). For the other methods with
        an `update` the balancer reads the flag once and calls `update` if it is false.
        Not implemented by default.
        """
        raise NotImplementedError(f"method {self.name!r} has no update_masked")

    def end_epoch(self) -> None:
        """Hook: an epoch of training ended (``GradBalancer.end_epoch`` calls it).

        For methods that work per epoch (DWA closes its epoch average here). Does nothing by
        default.
        """

    def observe(self, losses: Any) -> bool:
        """Hook: the task losses measured again after the step (``GradBalancer.observe``).

        ``losses`` are the losses of the step's batch recomputed after ``opt.step()`` (a dict
        task -> loss, a sequence in task order, or a tensor). For methods that learn from the
        change of the losses (FAMO's exact mode). Returns whether the method's state changed:
        ``False`` by default (the losses are ignored).
        """
        return False

    def param_group_options(self) -> Mapping[str, Any]:
        """Options of the param group that holds the method's learnable parameters.

        Only used when the method has parameters. Keys the inner optimizer does not know are
        dropped by the balancer.
        """
        return {"weight_decay": 0.0}

    def extra_repr(self) -> str:
        return "" if self._tasks is None else f"tasks={list(self._tasks)}"

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"tasks": list(self._tasks) if self._tasks is not None else None}

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Buffers and parameters of stateful methods are created by bind(); a method loaded
        # before it is bound binds itself to the saved tasks first, so they exist to load into.
        extra = state_dict.get(prefix + "_extra_state")
        if self._tasks is None and isinstance(extra, Mapping) and extra.get("tasks") is not None:
            self.bind(tuple(extra["tasks"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Any) -> None:
        tasks = state.get("tasks") if isinstance(state, Mapping) else None
        if tasks is not None:
            if self._tasks is None:
                self.bind(tuple(tasks))
            elif tuple(tasks) != self._tasks:
                raise ValueError(
                    f"state of method {self.name!r} was saved for tasks {tasks}, "
                    f"but this method is bound to {list(self._tasks)}"
                )


def as_float64(x: Tensor) -> Tensor:
    """``x`` detached and in float64 (helper for methods)."""
    return x.detach().to(torch.float64)
