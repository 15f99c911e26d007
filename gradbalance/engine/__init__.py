"""Per-task gradients on the shared parameters, their Gramian, and the combined update.

Every engine answers one `Request` (the losses, the shared tensors, the other parameters, the
features) with one immutable `TaskGradients`, through the `Engine` protocol:

``"loop"`` (`LoopEngine`)
    ``K`` calls of `torch.autograd.grad`, one per task loss, keeping the graph between
    them. Works for every model; peak memory is one backward's.
``"batched"`` (`BatchedEngine`)
    one call with ``is_grads_batched=True``: autograd runs the ``K`` backwards as one vmapped
    backward. Fastest when every operation of the model has a batching rule; needs ``K`` times
    the gradient memory of one backward.
``"chained"`` (`ChainedEngine`)
    the same ``J`` on the shared parameters through the shared *features* ``z``
    (`chained_gradients`): ``K`` backwards through the task heads to ``∂L_i/∂z``, then one
    `torch.vmap`-batched backward through the trunk. Exact where the heads reach the shared
    parameters only through ``z`` (checked by walking the graph each step; `NotApplicable`
    otherwise).
``"representation"`` (`RepresentationEngine`)
    gradients w.r.t. the shared *features* ``z`` instead of the shared parameters (MGDA-UB):
    ``K`` backwards through the task heads only, then one backward through the trunk with the
    combined feature gradient ``Σ_i w_i ∇_z L_i``.
``"memory"`` (`MemoryEngine`)
    the memory-light Gramian (`memory_gramian`): the shared tensors are split into groups whose
    rows ``(K, *p.shape)`` fit in a budget of Jacobian entries; each group's rows are computed
    (one batched backward per group, on the retained graph), added into ``G`` and freed, so
    the ``K × P`` Jacobian never exists at once. The update ``Jᵀw`` then comes from one
    ordinary backward of ``Σ_i w_i L_i`` (`weighted_gradients`).

`EngineChoice` (``engine="auto"`` and the fallbacks) picks among them at each step. The Gramian
``G = J Jᵀ`` is accumulated in float64 over column blocks of ``J``, so its precision does not
depend on the model's dtype. Nothing here writes ``.grad``: the balancer does that once every
check has passed. `gramian` and `combine` live in `gradbalance._linalg` (the methods use them
too) and are re-exported here; the private torch calls live in `gradbalance._torch_compat`.

Adding an engine: a module with a class that has ``name``, ``compute`` and ``update``, and its
place in `EngineChoice`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from gradbalance._linalg import combine, gramian
from gradbalance.engine.auto import EngineChoice, check_request, check_threshold
from gradbalance.engine.base import (
    DEFAULT_MEMORY_THRESHOLD,
    STRATEGIES,
    Engine,
    NotApplicable,
    ParameterEngine,
    Request,
    RowsHook,
    objective_gradients,
)
from gradbalance.engine.batched import BatchedEngine, batched_gradients, probe_batched
from gradbalance.engine.chained import (
    ChainedEngine,
    chained_gradients,
    heads_reach_shared_only_through,
)
from gradbalance.engine.loop import LoopEngine, loop_gradients
from gradbalance.engine.memory import (
    MemoryEngine,
    MemoryGramian,
    jacobian_numel,
    memory_gramian,
    plan_groups,
    weighted_gradients,
)
from gradbalance.engine.representation import RepresentationEngine, backprop_features
from gradbalance.engine.result import TaskGradients

__all__ = [
    "DEFAULT_MEMORY_THRESHOLD",
    "ENGINES",
    "STRATEGIES",
    "BatchedEngine",
    "ChainedEngine",
    "Engine",
    "EngineChoice",
    "LoopEngine",
    "MemoryEngine",
    "MemoryGramian",
    "NotApplicable",
    "ParameterEngine",
    "RepresentationEngine",
    "Request",
    "RowsHook",
    "TaskGradients",
    "backprop_features",
    "chained_gradients",
    "check_request",
    "check_threshold",
    "combine",
    "gramian",
    "heads_reach_shared_only_through",
    "jacobian_numel",
    "memory_gramian",
    "objective_gradients",
    "plan_groups",
    "probe_batched",
    "task_gradients",
    "weighted_gradients",
]

ENGINES: dict[str, type] = {
    "loop": LoopEngine,
    "batched": BatchedEngine,
    "chained": ChainedEngine,
    "representation": RepresentationEngine,
    "memory": MemoryEngine,
}
"""Every concrete engine, by name (``"auto"`` is the policy `EngineChoice`, not an engine).
`EngineChoice` knows only these built-in engines: adding a class here does not make
``GradBalancer(engine=...)`` accept it."""


def task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor] = (),
    *,
    strategy: str = "loop",
    retain_graph: bool = False,
) -> TaskGradients:
    """Per-task gradients of ``losses`` w.r.t. ``shared`` and their sum w.r.t. ``others``.

    Args:
        losses: ``K`` scalar losses.
        shared: the tensors whose per-task gradients are needed (shared parameters, or shared
            features for the representation strategy).
        others: tensors whose gradient is only needed summed over tasks (task-specific
            parameters).
        strategy: ``"loop"`` or ``"batched"``.
        retain_graph: keep the graph after the last backward.

    Returns:
        A `TaskGradients`.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> tg = task_gradients([w.sum(), (w ** 2).sum()], [w])
        >>> tg.rows[0]
        tensor([[1., 1.],
                [2., 4.]])
    """
    if strategy == "loop":
        return loop_gradients(losses, shared, others, retain_graph)
    if strategy == "batched":
        return batched_gradients(losses, shared, others, retain_graph)
    raise ValueError(f"strategy must be 'loop' or 'batched', got {strategy!r}")
