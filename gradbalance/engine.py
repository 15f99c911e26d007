"""Per-task gradients on the shared parameters, their Gramian, and the combined update.

These strategies compute the task Jacobian ``J`` (one row per task):

``"loop"``
    ``K`` calls of `torch.autograd.grad`, one per task loss, keeping the graph between
    them. Works for every model; peak memory is one backward's.
``"batched"``
    one call with ``is_grads_batched=True``: autograd runs the ``K`` backwards as one vmapped
    backward. Fastest when every operation of the model has a batching rule; needs ``K`` times
    the gradient memory of one backward.
``"chained"``
    the same ``J`` on the shared parameters through the shared *features* ``z``
    (`chained_gradients`): ``K`` backwards through the task heads to ``∂L_i/∂z``, then one
    `torch.vmap`-batched backward through the trunk. Exact where the heads reach the shared
    parameters only through ``z`` (checked by walking the graph each step).
``"representation"``
    gradients w.r.t. the shared *features* ``z`` instead of the shared parameters (MGDA-UB):
    ``K`` backwards through the task heads only, then one backward through the trunk with the
    combined feature gradient ``Σ_i w_i ∇_z L_i``.
``"memory"``
    the memory-light Gramian (`memory_gramian`): the shared tensors are split into groups whose
    rows ``(K, *p.shape)`` fit in a budget of Jacobian entries; each group's rows are computed
    (one batched backward per group, on the retained graph), added into ``G`` and freed, so
    the ``K × P`` Jacobian never exists at once. The update ``Jᵀw`` then comes from one
    ordinary backward of ``Σ_i w_i L_i`` (`weighted_gradients`).

The Gramian ``G = J Jᵀ`` is accumulated in float64 over column blocks of ``J`` (converted to
float64 block by block), so its precision does not depend on the model's dtype. ``loop`` (and
``chained`` from 16 shared tensors on) hold ``J`` as one ``(K, P)`` matrix; only ``memory``
never holds all of it.

Everything here is free of side effects: nothing writes ``.grad``; the balancer does that once
every check has passed. `gramian` and `combine` live in `gradbalance._linalg` (the methods use
them too) and are re-exported here; the private torch calls (the direct autograd-engine call
behind the loop, the flattening of many tensors in one call) live in `gradbalance._torch_compat`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradbalance._linalg import add_gramian_, combine, flatten, gramian, unflatten
from gradbalance._torch_compat import autograd_grad as _grad

__all__ = [
    "DEFAULT_MEMORY_THRESHOLD",
    "STRATEGIES",
    "MemoryGramian",
    "TaskGradients",
    "backprop_features",
    "chained_gradients",
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

logger = logging.getLogger(__name__)

#: The engine strategies a user can ask for.
STRATEGIES = ("auto", "loop", "batched", "chained", "representation", "memory")

#: Jacobian entries (``K ×`` shared parameters) above which ``engine="auto"`` picks the
#: memory-light path; also the budget of Jacobian entries one group of it may hold at once.
#: ``2**27`` entries are 512 MiB of float32 rows (e.g. ``K = 8`` tasks on 16.7 M parameters).
DEFAULT_MEMORY_THRESHOLD = 2**27


class TaskGradients:
    """The task Jacobian on the shared tensors and the summed gradient of the other parameters.

    The Jacobian is held either as per-tensor ``rows`` or, from the loop strategy, as one
    ``(K, P)`` matrix (`flat`) whose rows are task gradients flattened in the order of the
    shared tensors: `gramian` and `combine` then cost one product each instead of one per
    tensor, and per-tensor ``rows`` (views of it) are built only when read.

    Attributes:
        rows: one tensor of shape ``(K, *shape)`` per shared tensor (parameter or feature); row
            ``i`` is task ``i``'s gradient (zeros where the task does not reach the tensor), or
            ``None`` when no task reaches it. Assigning new rows drops `flat`.
        others: one tensor per other (task-specific) parameter: the sum over tasks of their
            unweighted gradients, or ``None`` when no task reaches the parameter.
        task_reached: for each task, whether its loss reached at least one shared tensor. The
            batched strategy cannot tell from autograd which rows are structural zeros: there
            it is computed on first access, a task counting as reached where one of its rows is
            non-zero (one pass over the rows, skipped when nobody reads it).
        flat: the ``(K, P)`` matrix, or ``None``.
    """

    __slots__ = ("_like", "_rows", "_task_reached", "flat", "others")

    def __init__(
        self,
        rows: list[Tensor | None] | None,
        others: list[Tensor | None],
        task_reached: list[bool] | None = None,
        *,
        flat: Tensor | None = None,
        like: list[Tensor | None] | None = None,
    ) -> None:
        if rows is None and (flat is None or like is None):
            raise ValueError("TaskGradients needs rows, or flat with like")
        self._rows = rows
        self.others = others
        self._task_reached = task_reached
        self.flat = flat
        # with flat: per shared tensor, a tensor of its shape (where some task reaches it)
        self._like = like

    @property
    def rows(self) -> list[Tensor | None]:
        if self._rows is None:
            assert self.flat is not None and self._like is not None
            k = self.flat.shape[0]
            rows: list[Tensor | None] = []
            offset = 0
            for t in self._like:
                if t is None:
                    rows.append(None)
                    continue
                n = t.numel()
                rows.append(self.flat[:, offset : offset + n].view(k, *t.shape))
                offset += n
            self._rows = rows
        return self._rows

    @rows.setter
    def rows(self, value: list[Tensor | None]) -> None:
        self._rows = value
        self.flat = None

    @property
    def reached(self) -> list[bool]:
        """For each shared tensor, whether some task reaches it (without building ``rows``)."""
        present = self._rows if self._rows is not None else self._like
        assert present is not None
        return [t is not None for t in present]

    @property
    def task_reached(self) -> list[bool]:
        if self._task_reached is None:
            self._task_reached = _nonzero_tasks(self.rows)
        return self._task_reached

    @task_reached.setter
    def task_reached(self, value: list[bool]) -> None:
        self._task_reached = value

    def gramian(self, num_tasks: int) -> Tensor:
        """``G = J Jᵀ`` (float64): see `gramian`."""
        if self.flat is not None:
            g = torch.zeros((num_tasks, num_tasks), dtype=torch.float64, device=self.flat.device)
            add_gramian_(g, self.flat)
            return g
        return gramian(self.rows, num_tasks)

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``Jᵀw`` per shared tensor: see `combine`."""
        if self.flat is None:
            return combine(self.rows, weights)
        assert self._like is not None
        joined = weights.to(device=self.flat.device, dtype=self.flat.dtype) @ self.flat
        present = [t for t in self._like if t is not None]
        parts = iter(unflatten(joined, present))
        return [None if t is None else next(parts) for t in self._like]

    def __repr__(self) -> str:
        return (
            f"TaskGradients(rows={self.rows!r}, others={self.others!r}, "
            f"task_reached={self.task_reached!r})"
        )


def _nonzero_tasks(rows: Sequence[Tensor | None]) -> list[bool]:
    """For each task, whether one of its rows holds a non-zero (or NaN) entry."""
    present = [r for r in rows if r is not None]
    if not present:
        return []
    k = present[0].shape[0]
    reached = torch.zeros(k, dtype=torch.bool, device=present[0].device)
    for row in present:
        # the largest magnitude per row: one reduction pass, no K x P temporary
        peak = torch.linalg.vector_norm(row.reshape(k, -1), ord=float("inf"), dim=1)
        reached |= peak.ne(0)
    out = [bool(v) for v in reached.tolist()]
    if not any(out):
        out = [True] * k
    return out


def _as_scalar_stack(losses: Sequence[Tensor]) -> Tensor:
    flat = [loss.reshape(()) for loss in losses]
    dtypes = {t.dtype for t in flat}
    if len(dtypes) > 1:
        common = torch.float32 if all(d.itemsize <= 4 for d in dtypes) else torch.float64
        flat = [t.to(common) for t in flat]
    return torch.stack(flat)


def _loop(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> TaskGradients:
    k = len(losses)
    n_shared = len(shared)
    by_task: list[tuple[Tensor | None, ...]] = []
    summed: list[Tensor | None] = [None] * len(others)
    inputs = (*shared, *others)
    for i, loss in enumerate(losses):
        grads = _grad(loss, inputs, retain_graph or i < k - 1)
        by_task.append(tuple(grads[:n_shared]))
        for j in range(len(others)):
            g = grads[n_shared + j]
            if g is None:
                continue
            acc = summed[j]
            summed[j] = g if acc is None else acc.add_(g)
    return _loop_result(by_task, shared, summed)


def _loop_result(
    by_task: list[tuple[Tensor | None, ...]],
    shared: Sequence[Tensor],
    summed: list[Tensor | None],
    task_reached: list[bool] | None = None,
) -> TaskGradients:
    """The loop strategy's Jacobian as one ``(K, P)`` matrix: one flatten of all the task
    gradients, task after task (zeros where a task misses a tensor another task reaches);
    per-tensor stacks when the shared tensors differ in dtype or device. ``task_reached``
    defaults to whether each task reaches some shared tensor."""
    k = len(by_task)
    complete = [all(g is not None for g in grads) for grads in by_task]
    if task_reached is None:
        task_reached = [
            c or any(g is not None for g in grads) for c, grads in zip(complete, by_task)
        ]
    if all(complete):  # the common case: every task reaches every shared tensor
        firsts: list[Tensor | None] = list(by_task[0]) if by_task else []
    else:
        firsts = [next((g for g in col if g is not None), None) for col in zip(*by_task)]
    present = [f for f in firsts if f is not None]
    if not present:
        return TaskGradients(rows=[None] * len(shared), others=summed, task_reached=task_reached)
    dtype, device = present[0].dtype, present[0].device
    if any(f.dtype != dtype or f.device != device for f in present):
        per_tensor = [list(col) for col in zip(*by_task)]
        return TaskGradients(rows=_stack_rows(per_tensor), others=summed, task_reached=task_reached)
    if all(complete):
        pieces = [g for grads in by_task for g in grads]
    else:
        # autograd returns each gradient in its input's dtype and device
        pieces = [
            g if g is not None else torch.zeros_like(f)
            for grads in by_task
            for g, f in zip(grads, firsts)
            if f is not None
        ]
    flat = flatten(pieces).view(k, -1)  # type: ignore[arg-type]
    like: list[Tensor | None] = [s if f is not None else None for s, f in zip(shared, firsts)]
    return TaskGradients(None, summed, task_reached, flat=flat, like=like)


def _stack_rows(per_task: list[list[Tensor | None]]) -> list[Tensor | None]:
    """One ``(K, *shape)`` tensor per shared tensor from per-task gradients (zeros where a task
    does not reach it), or ``None`` where no task does."""
    rows: list[Tensor | None] = []
    for grads in per_task:
        first = next((g for g in grads if g is not None), None)
        if first is None:
            rows.append(None)
            continue
        dtype = first.dtype
        zero = None
        parts = []
        for g in grads:
            if g is None:
                if zero is None:
                    zero = torch.zeros(first.shape, dtype=dtype, device=first.device)
                g = zero
            parts.append(g if g.dtype == dtype else g.to(dtype))
        rows.append(torch.stack(parts))
    return rows


def _batched(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> TaskGradients:
    stacked = _as_scalar_stack(losses)
    k = stacked.shape[0]
    eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked,
        [*shared, *others],
        grad_outputs=eye,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
    n_shared = len(shared)
    # autograd.grad is typed as returning tensors; with allow_unused=True entries may be None
    rows: list[Tensor | None] = list(grads[:n_shared])
    summed: list[Tensor | None] = [None if g is None else g.sum(dim=0) for g in grads[n_shared:]]
    if all(r is None for r in rows):
        return TaskGradients(rows=rows, others=summed, task_reached=[False] * k)
    # which tasks reach a shared tensor is computed only when read (see TaskGradients)
    return TaskGradients(rows=rows, others=summed)


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
        return _loop(losses, shared, others, retain_graph)
    if strategy == "batched":
        return _batched(losses, shared, others, retain_graph)
    raise ValueError(f"strategy must be 'loop' or 'batched', got {strategy!r}")


def _head_walk(
    losses: Sequence[Tensor],
    features: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
) -> tuple[list[list[int]], bool] | None:
    """Walk each loss's graph down to the features' edges (the task heads only).

    Returns, for each loss, the indices of the ``others`` it reaches without going through the
    features, and whether two losses share a node of their heads; or ``None`` as soon as a loss
    reaches a ``shared`` tensor that way.
    """
    shared_ids = {id(p) for p in shared}
    other_index = {id(p): j for j, p in enumerate(others)}
    feature_edges = set()
    feature_leaves = set()
    for f in features:
        if f.grad_fn is None:
            feature_leaves.add(id(f))
        else:
            feature_edges.add((f.grad_fn, f.output_nr))
    reached: list[list[int]] = []
    visited: set = set()
    overlap = False
    for loss in losses:
        if loss.grad_fn is None:
            if id(loss) in shared_ids and id(loss) not in feature_leaves:
                return None
            reached.append([other_index[id(loss)]] if id(loss) in other_index else [])
            continue
        found: list[int] = []
        seen = {loss.grad_fn}
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            variable = getattr(node, "variable", None)
            if variable is not None:  # an AccumulateGrad node: a leaf tensor
                key = id(variable)
                if key in feature_leaves:
                    continue
                if key in shared_ids:
                    return None
                if key in other_index:
                    found.append(other_index[key])
                continue
            for edge_node, output_nr in node.next_functions:
                if edge_node is None or edge_node in seen:
                    continue
                if (edge_node, output_nr) in feature_edges:
                    continue
                seen.add(edge_node)
                stack.append(edge_node)
        reached.append(sorted(found))
        overlap = overlap or not visited.isdisjoint(seen)
        visited |= seen
    return reached, overlap


def _vmapped_vjp(
    outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor], retain_graph: bool
) -> list[Tensor | None]:
    """``K`` vector-Jacobian products of ``outputs`` w.r.t. ``inputs`` in one backward, batched
    by `torch.vmap` over the leading dimension of the cotangents (``None`` where an input is
    unreached). `torch.vmap` has batching rules for more backward operations (convolutions,
    batch norm) than ``autograd.grad(..., is_grads_batched=True)``'s older vmap, and is faster
    here (SegNet trunk at K = 8: 25 ms vs 37 ms)."""
    present: list[int] = []

    def vjp(*grad_outputs: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=list(grad_outputs),
            retain_graph=retain_graph,
            allow_unused=True,
        )
        present[:] = [j for j, g in enumerate(grads) if g is not None]
        if not present:  # vmap needs a batched output
            return (grad_outputs[0].sum() * 0,)
        return tuple(grads[j] for j in present)

    batched = torch.vmap(vjp)(*cotangents)
    out: list[Tensor | None] = [None] * len(inputs)
    for j, g in zip(present, batched):
        out[j] = g
    return out


def heads_reach_shared_only_through(
    losses: Sequence[Tensor], features: Sequence[Tensor], shared: Sequence[Tensor]
) -> bool:
    """Whether every path from ``losses`` to a ``shared`` tensor goes through ``features``.

    Walks the autograd graph from each loss and stops at the features' edges, so only the
    task heads are visited (and the walk ends at the first shared tensor found outside them).
    When this holds, the chain rule ``∂L_i/∂θ = (∂z/∂θ)ᵀ ∂L_i/∂z`` gives every task's exact
    gradient on the shared parameters ``θ`` (see `chained_gradients`).

    Examples:
        >>> import torch
        >>> w = torch.ones(2, requires_grad=True)
        >>> z = 2 * w
        >>> heads_reach_shared_only_through([z.sum(), (z ** 2).sum()], [z], [w])
        True
        >>> heads_reach_shared_only_through([z.sum() + w.sum()], [z], [w])
        False
    """
    return _head_walk(losses, features, shared, ()) is not None


def chained_gradients(
    losses: Sequence[Tensor],
    features: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor] = (),
    *,
    retain_graph: bool = False,
    batched: bool = True,
) -> TaskGradients | None:
    """The exact task Jacobian on ``shared`` through the shared features ``z``: ``K`` backwards
    through the heads, then one vmapped backward through the trunk.

    Task ``i``'s gradient on the shared parameters is ``(∂z/∂θ)ᵀ ∂L_i/∂z`` when the losses
    reach ``θ`` only through ``z``. A walk of the graph from each loss down to ``z`` checks
    that and finds the task-specific tensors each head reaches. The ``K`` feature gradients
    (and each head's own gradients) come from ``K`` backwards that stop at ``z``; the ``K``
    rows on ``θ`` then come from one backward through the trunk with
    ``is_grads_batched=True`` (or ``K`` backwards through the trunk when ``batched=False``).
    Same Jacobian as the loop strategy, with the trunk traversed once instead of ``K`` times.
    An ``others`` tensor upstream of ``z`` (a trunk parameter not declared shared) gets the
    part of its gradient that flows through ``z`` from that trunk backward.

    Args:
        losses: ``K`` scalar losses.
        features: the shared representation(s) every head reads.
        shared: the shared parameters whose Jacobian rows are needed.
        others: tensors whose gradient is only needed summed over tasks (task-specific
            parameters).
        retain_graph: keep the graph after the trunk backward.
        batched: one vmapped trunk backward (default) or ``K`` ordinary ones.

    Returns:
        A `TaskGradients` on ``shared``, or ``None`` when some loss reaches a shared tensor
        other than through ``features`` (`heads_reach_shared_only_through`): then the chain
        rule through ``z`` alone would miss terms, and nothing has been computed.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> z = 3 * w
        >>> tg = chained_gradients([z.sum(), (z ** 2).sum()], [z], [w])
        >>> tg.rows[0]
        tensor([[ 3.,  3.],
                [18., 36.]])
    """
    features = list(features)
    walk = _head_walk(losses, features, shared, others)
    if walk is None:
        return None
    reach, overlap = walk
    # the head backwards never run the trunk's nodes; the heads' own buffers can go after
    # each backward unless two losses share a head node (or the caller keeps the graph)
    keep_heads = retain_graph or overlap
    k = len(losses)
    n_features = len(features)
    per_feature: list[list[Tensor | None]] = [[None] * k for _ in features]
    summed: list[Tensor | None] = [None] * len(others)
    task_reached = [False] * k
    grads: tuple = ()
    for i, loss in enumerate(losses):
        grads = _grad(loss, (*features, *(others[j] for j in reach[i])), keep_heads)
        for m in range(n_features):
            if grads[m] is not None:
                task_reached[i] = True
                per_feature[m][i] = grads[m]
        for j, g in zip(reach[i], grads[n_features:]):
            if g is not None:
                acc = summed[j]
                summed[j] = g if acc is None else acc.add_(g)
    stacked = _stack_rows(per_feature)
    del per_feature, grads  # the stacked copy is all that is needed from here
    pairs = [(f, r) for f, r in zip(features, stacked) if r is not None]
    del stacked
    if not pairs:
        return TaskGradients(rows=[None] * len(shared), others=summed, task_reached=task_reached)
    outputs = [f for f, _ in pairs]
    cotangents = [r if r.dtype == f.dtype else r.to(f.dtype) for f, r in pairs]
    inputs = [*shared, *others]
    n_shared = len(shared)
    if batched:
        trunk = _vmapped_vjp(outputs, inputs, cotangents, retain_graph)
        other_rows = trunk[n_shared:]
    else:
        by_task: list[tuple[Tensor | None, ...]] = []
        other_rows = [None] * len(others)
        per_other: list[list[Tensor | None]] = [[None] * k for _ in others]
        for i in range(k):
            grads = torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=[c[i] for c in cotangents],
                retain_graph=retain_graph or i < k - 1,
                allow_unused=True,
            )
            by_task.append(tuple(grads[:n_shared]))
            for j, g in enumerate(grads[n_shared:]):
                per_other[j][i] = g
        other_rows = _stack_rows(per_other) if others else []
    for j, row in enumerate(other_rows):
        if row is None:
            continue
        # a task that reaches this tensor in its head already has its full gradient (the head
        # backward followed every path); the others reach it only through z
        through_z = [i for i in range(k) if j not in reach[i]]
        if not through_z:
            continue
        part = row[through_z].sum(dim=0)
        acc = summed[j]
        summed[j] = part if acc is None else acc.add_(part)
    if not batched:
        return _loop_result(by_task, shared, summed, task_reached)
    return _rows_result(trunk[:n_shared], shared, summed, task_reached)


#: From this many shared tensors on, `_rows_result` copies per-tensor rows into one ``(K, P)``
#: matrix: the copy costs less than one Python-level product per tensor in `gramian` and
#: `combine` (SegNet's 104 tensors: 0.7 vs 1.3 ms at K = 2; an MLP's 6: a loss at every K).
_FLAT_MIN_TENSORS = 16


def _rows_result(
    rows: list[Tensor | None],
    shared: Sequence[Tensor],
    summed: list[Tensor | None],
    task_reached: list[bool],
) -> TaskGradients:
    """Per-tensor rows as `TaskGradients`, copied into one ``(K, P)`` matrix when there are
    many tensors of one dtype and device."""
    present = [r for r in rows if r is not None]
    if len(present) < _FLAT_MIN_TENSORS or any(
        r.dtype != present[0].dtype or r.device != present[0].device for r in present
    ):
        return TaskGradients(rows=rows, others=summed, task_reached=task_reached)
    k = present[0].shape[0]
    flat = torch.cat([r.reshape(k, -1) for r in present], dim=1)
    like: list[Tensor | None] = [s if r is not None else None for s, r in zip(shared, rows)]
    return TaskGradients(None, summed, task_reached, flat=flat, like=like)


def probe_batched(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool,
) -> tuple[TaskGradients, str]:
    """Try the batched strategy; fall back to the loop where vmap fails or is slow.

    Returns the gradients and the strategy to use from now on (``"batched"`` or ``"loop"``).
    The graph is kept during the try so the loop can still run after a failure. A model whose
    backward hits an operation without a vmap batching rule makes torch warn about a
    "performance drop"; the probe then settles on the loop, which is faster for such models.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _batched(losses, shared, others, retain_graph=True)
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("batched engine unavailable for this model (%s); using the loop", exc)
        return _loop(losses, shared, others, retain_graph), "loop"
    slow = [w for w in caught if "batching rule" in str(w.message).lower()]
    for w in caught:
        if w not in slow:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if slow:
        logger.info("batched engine would hit vmap fallbacks (%s); using the loop", slow[0].message)
        return result, "loop"
    return result, "batched"


def backprop_features(
    features: Sequence[Tensor],
    shared: Sequence[Tensor],
    feature_grads: Sequence[Tensor | None],
    *,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """Gradients of the shared parameters given the gradient w.r.t. the shared features.

    One backward through the trunk: ``(∂z/∂θ)ᵀ g_z``.
    """
    pairs = [(f, g) for f, g in zip(features, feature_grads) if g is not None]
    if not pairs:
        return [None] * len(shared)
    return list(
        torch.autograd.grad(
            [f for f, _ in pairs],
            list(shared),
            grad_outputs=[g.to(f.dtype) for f, g in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
        )
    )


def objective_gradients(
    objective: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
) -> list[Tensor | None]:
    """One ordinary backward of a scalar objective w.r.t. ``params`` (``None`` where unused)."""
    return list(_grad(objective, tuple(params), retain_graph))


# ---------------------------------------------------------------------- memory-light Gramian
#: Called with one group's rows and tensors; returns the rows to use (e.g. all-reduced).
RowsHook = Callable[[list[Tensor | None], list[Tensor]], list[Tensor | None]]


@dataclass
class MemoryGramian:
    """What the memory-light path returns: the Gramian without the Jacobian.

    Attributes:
        gramian: ``G = J Jᵀ`` (``(K, K)``, float64).
        reached: for each shared tensor, whether some task reaches it.
        others: as `TaskGradients.others`: one summed gradient per other parameter, or
            ``None``.
        task_reached: for each task, whether its loss reached at least one shared tensor.
        strategy: how the rows of each group were computed: ``"batched"`` or ``"loop"``.
        peak_rows_numel: the most Jacobian entries (rows of shared and other tensors) that
            were alive at once.
    """

    gramian: Tensor
    reached: list[bool]
    others: list[Tensor | None]
    task_reached: list[bool]
    strategy: str
    peak_rows_numel: int


def jacobian_numel(shared: Sequence[Tensor], num_tasks: int) -> int:
    """The number of entries ``K × P`` of the Jacobian on ``shared``.

    Examples:
        >>> import torch
        >>> jacobian_numel([torch.zeros(3, 4), torch.zeros(4)], 5)
        80
    """
    return num_tasks * sum(t.numel() for t in shared)


def plan_groups(numels: Sequence[int], num_tasks: int, budget: int) -> list[range]:
    """Split consecutive tensors into groups of at most ``budget`` Jacobian entries.

    A group holds tensors ``i`` with ``K × Σ numel_i ≤ budget``; a tensor larger than the
    budget on its own forms a group alone.

    Examples:
        >>> plan_groups([10, 10, 30, 5], num_tasks=2, budget=40)
        [range(0, 2), range(2, 3), range(3, 4)]
    """
    if budget < 1:
        raise ValueError(f"budget must be a positive number of Jacobian entries, got {budget}")
    groups: list[range] = []
    start, size = 0, 0
    for i, n in enumerate(numels):
        if i > start and (size + n) * num_tasks > budget:
            groups.append(range(start, i))
            start, size = i, 0
        size += n
    if len(numels) > start:
        groups.append(range(start, len(numels)))
    return groups


def memory_gramian(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor] = (),
    *,
    budget: int = DEFAULT_MEMORY_THRESHOLD,
    strategy: str = "auto",
    rows_hook: RowsHook | None = None,
) -> MemoryGramian:
    """The Gramian of the task gradients on ``shared`` without ever holding the whole Jacobian.

    The tensors ``[*shared, *others]`` are split into consecutive groups of at most ``budget``
    Jacobian entries (`plan_groups`). For each group, the rows ``(K, *p.shape)`` of its
    tensors are computed on the retained graph (one backward with ``is_grads_batched=True``,
    or ``K`` backwards for ``strategy="loop"``), ``J_p J_pᵀ`` is added to ``G`` in float64
    (in column chunks), the rows of ``others`` are summed over tasks, and the rows are freed
    before the next group. The graph is always kept: apply the update with
    `weighted_gradients` afterwards.

    Cost: one (batched) backward per group, each from the losses down to that group's
    tensors: between one and ``#groups`` full batched backwards.

    Args:
        losses: ``K`` scalar losses.
        shared: the tensors whose Gramian is needed.
        others: tensors whose gradient is only needed summed over tasks.
        budget: the most Jacobian entries a group may hold.
        strategy: ``"batched"``, ``"loop"``, or ``"auto"`` (batched, falling back to the
            loop as `probe_batched` does).
        rows_hook: optional; called with each group's shared rows (``None`` where no task
            reaches a tensor) and the group's shared tensors, returns the rows to use (the
            distributed code all-reduces them here). It may modify the rows in place.

    Returns:
        A `MemoryGramian`.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> b = torch.tensor([3.0], requires_grad=True)
        >>> losses = [w.sum() + b.sum(), (w ** 2).sum() + 2 * b.sum()]
        >>> mg = memory_gramian(losses, [w, b], budget=4)
        >>> mg.gramian
        tensor([[ 3.,  8.],
                [ 8., 24.]], dtype=torch.float64)
        >>> mg.peak_rows_numel  # two groups: w's rows (2 × 2), then b's (2 × 1)
        4
        >>> weighted_gradients(losses, torch.tensor([1.0, 1.0]), [w, b])
        [tensor([3., 5.]), tensor([3.])]
    """
    if strategy not in ("auto", "batched", "loop"):
        raise ValueError(f"strategy must be 'auto', 'batched' or 'loop', got {strategy!r}")
    k = len(losses)
    tensors = [*shared, *others]
    n_shared = len(shared)
    batched_groups = False
    device = next((loss.device for loss in losses), torch.device("cpu"))
    g = torch.zeros((k, k), dtype=torch.float64, device=device)
    reached = [False] * n_shared
    summed: list[Tensor | None] = [None] * len(others)
    task_reached = [False] * k
    peak = 0
    for group in plan_groups([t.numel() for t in tensors], k, budget):
        sh = [i for i in group if i < n_shared]
        ot = [i - n_shared for i in group if i >= n_shared]
        args = (losses, [shared[i] for i in sh], [others[j] for j in ot])
        if strategy == "auto":
            tg, strategy = probe_batched(*args, retain_graph=True)
        else:
            tg = task_gradients(*args, strategy=strategy, retain_graph=True)
        alive = sum(r.numel() for r in tg.rows if r is not None)
        alive += k * sum(others[j].numel() for j, s in zip(ot, tg.others) if s is not None)
        peak = max(peak, alive)
        rows = tg.rows
        if rows_hook is not None:
            rows = rows_hook(list(rows), [shared[i] for i in sh])
        for i, row in zip(sh, rows):
            if row is not None:
                reached[i] = True
                add_gramian_(g, row)
        summed_group = tg.others
        for j, s in zip(ot, summed_group):
            summed[j] = s
        if strategy == "loop":
            task_reached = [a or b for a, b in zip(task_reached, tg.task_reached)]
        else:
            batched_groups = True
        del tg, rows, summed_group
    if batched_groups:
        # a batched group's task reaches a shared tensor where its row is non-zero, i.e. where
        # it adds to G_ii = |J_i|^2 (float64 squares of float32 entries never underflow)
        diagonal = [not (v == 0.0) for v in g.diagonal().tolist()]
        if not any(diagonal) and any(reached):
            diagonal = [True] * k
        task_reached = [a or b for a, b in zip(task_reached, diagonal)]
    return MemoryGramian(
        gramian=g,
        reached=reached,
        others=summed,
        task_reached=task_reached,
        strategy="batched" if strategy == "auto" else strategy,
        peak_rows_numel=peak,
    )


def weighted_gradients(
    losses: Sequence[Tensor],
    weights: Tensor,
    params: Sequence[Tensor],
    *,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """``Jᵀw`` by one ordinary backward of ``Σ_i w_i L_i`` w.r.t. ``params``.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> weighted_gradients([w.sum(), (w ** 2).sum()], torch.tensor([0.5, 1.0]), [w])
        [tensor([2.5000, 4.5000])]
    """
    stacked = _as_scalar_stack(losses)
    objective = (stacked * weights.to(device=stacked.device, dtype=stacked.dtype)).sum()
    return objective_gradients(objective, params, retain_graph=retain_graph)
