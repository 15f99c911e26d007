"""Walks of the autograd graph behind the task losses: which parameters each task reaches, and
which shared layer is the last one.

Nothing here runs a backward or changes a tensor: the walks follow ``grad_fn.next_functions``
down to the ``AccumulateGrad`` nodes, whose ``variable`` is the leaf tensor (a parameter) that
would receive a gradient. `GradBalancer` walks the full graph only on its first backward and
when the ``requires_grad`` pattern of its parameters changes; `reaches` (one early-exit walk
per loss) is the per-step check.

The walks see what autograd records: a parameter used only inside a reentrant
``torch.utils.checkpoint`` segment (``use_reentrant=True``) is hidden behind the segment's node,
so such a segment's parameters count as reached by no task (non-reentrant checkpointing, the
default in recent torch, keeps them visible).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance._torch_compat import saves_sparse_gradient

__all__ = ["LossGraph", "last_layer", "reaches", "sparse_gradient_leaves", "walk"]


def _accumulate_type() -> type | None:
    leaf = torch.zeros(1, requires_grad=True)
    node = leaf.expand(1).grad_fn
    if node is None or not node.next_functions:  # pragma: no cover - other torch
        return None
    return type(node.next_functions[0][0])


#: The class of autograd's ``AccumulateGrad`` nodes (``None``: fall back to ``hasattr``).
_ACCUMULATE: Any = _accumulate_type()


def _leaf(node: Any) -> Tensor | None:
    """The tensor of an ``AccumulateGrad`` node, else ``None``."""
    if _ACCUMULATE is not None:
        return node.variable if type(node) is _ACCUMULATE else None
    return getattr(node, "variable", None)  # pragma: no cover - other torch


def reaches(loss: Tensor, targets: set[int]) -> bool | None:
    """Whether ``loss``'s graph reaches a leaf tensor whose ``id`` is in ``targets``.

    Depth first, stopping at the first such leaf (a task head's parameters are a few nodes
    below its loss, so this usually visits a handful of nodes). Returns ``None`` when the walk
    met a node it cannot see through (an operation with no recorded inputs, such as a
    reentrant checkpoint): the answer is unknown then.
    """
    root = loss.grad_fn
    if root is None:
        return id(loss) in targets
    seen = {root}
    stack = [root]
    opaque = False
    while stack:
        node = stack.pop()
        variable = _leaf(node)
        if variable is not None:
            if id(variable) in targets:
                return True
            continue
        edges = node.next_functions
        if not edges:
            opaque = True
            continue
        for child, _ in edges:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return None if opaque else False


class LossGraph:
    """The graph behind ``K`` losses, walked once (see `walk`).

    Attributes:
        reached_by: ``id(leaf)`` -> bit mask of the tasks whose loss reaches that leaf tensor
            (bit ``i`` for task ``i``).
        leaves: ``id(leaf)`` -> the leaf tensor, for every leaf some loss reaches.
        opaque: whether some node could not be seen through (its inputs are unknown).
    """

    __slots__ = ("_children", "_roots", "leaves", "opaque", "reached_by")

    def __init__(self) -> None:
        self.reached_by: dict[int, int] = {}
        self.leaves: dict[int, Tensor] = {}
        self.opaque = False
        self._children: dict[Any, tuple[Any, ...]] = {}
        self._roots: list[Any] = []

    def tasks_reaching(self, tensor: Tensor) -> list[int]:
        """The indices of the tasks whose loss reaches ``tensor``."""
        mask = self.reached_by.get(id(tensor), 0)
        return [i for i in range(mask.bit_length()) if mask >> i & 1]

    def _children_of(self, node: Any) -> tuple[Any, ...]:
        children = self._children.get(node)
        if children is None:
            if _leaf(node) is not None:
                children = ()
            else:
                edges = node.next_functions
                if not edges:
                    self.opaque = True
                # each distinct input once, in order
                children = tuple(dict.fromkeys(c for c, _ in edges if c is not None))
            self._children[node] = children
        return children


def sparse_gradient_leaves(losses: Sequence[Tensor]) -> set[int]:
    """The ``id``s of the leaf tensors that an operation with sparse gradients (an
    ``nn.Embedding(sparse=True)``) feeds directly, in the graphs of ``losses``.

    Reads only node attributes, which outlive a freed graph: usable after a failed backward, to
    explain it.
    """
    found: set[int] = set()
    roots = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    seen = set(roots)
    stack = list(roots)
    while stack:
        node = stack.pop()
        sparse = saves_sparse_gradient(node)
        for child, _ in node.next_functions:
            if child is None or child in seen:
                continue
            seen.add(child)
            variable = _leaf(child)
            if variable is not None:
                if sparse:
                    found.add(id(variable))
            else:
                stack.append(child)
    return found


def walk(losses: Sequence[Tensor]) -> LossGraph:
    """Walk the whole graph of every loss and record which leaf tensors each one reaches.

    Each loss is walked on its own (``K`` walks; nodes are read once and shared between
    them), so the cost is that of ``K`` Python traversals of the graph: use it once, not on
    every step.
    """
    graph = LossGraph()
    for i, loss in enumerate(losses):
        bit = 1 << i
        root = loss.grad_fn
        if root is None:
            if loss.requires_grad:
                graph.reached_by[id(loss)] = graph.reached_by.get(id(loss), 0) | bit
                graph.leaves[id(loss)] = loss
            continue
        graph._roots.append(root)
        seen = {root}
        stack = [root]
        while stack:
            node = stack.pop()
            variable = _leaf(node)
            if variable is not None:
                key = id(variable)
                graph.reached_by[key] = graph.reached_by.get(key, 0) | bit
                graph.leaves[key] = variable
                graph._children.setdefault(node, ())
                continue
            for child in graph._children_of(node):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    return graph


def last_layer(graph: LossGraph, shared: Sequence[Tensor]) -> list[Tensor]:
    """The shared tensors of the last shared layer(s) in execution order (GradNorm's ``W``).

    A shared tensor of at least 2 dimensions (a weight) belongs to the last layer when one of
    the operations that consume it feeds no operation consuming another such weight: no shared
    weight is applied after it on the way to the losses. On a sequential trunk that is its last
    layer; parallel branches (the experts of MMoE, the columns of a soft-sharing network) give
    one such layer per branch. The 1-D shared tensors (a bias) consumed by the same operation
    come along. When no shared tensor has 2 dimensions, every shared tensor is a candidate.

    An operation *consumes* a tensor when it reads it directly or through view, transpose and
    dtype-cast nodes (``nn.Linear``'s ``t()``, autocast's copies). Returns the tensors in the
    order of ``shared``; empty when no loss reaches a shared tensor.
    """
    shared_ids = {id(p): p for p in shared}
    weights = {key for key, p in shared_ids.items() if p.dim() >= 2 and key in graph.reached_by}
    if not weights:
        weights = {key for key in shared_ids if key in graph.reached_by}
    if not weights:
        return []
    children = graph._children
    memo: dict[Any, int | None] = {}

    def leaf_of(node: Any) -> int | None:
        """``id`` of the leaf tensor ``node`` is a unary transform of (or is), else ``None``."""
        path = []
        current = node
        result: int | None = None
        while True:
            if current in memo:
                result = memo[current]
                break
            variable = _leaf(current)
            if variable is not None:
                result = id(variable)
                memo[current] = result
                break
            path.append(current)
            kids = children.get(current, ())
            if len(kids) != 1:
                result = None
                break
            current = kids[0]
        for n in path:
            memo[n] = result
        return result

    # operations consuming a candidate weight: node -> the weights it consumes
    consumers: dict[Any, list[int]] = {}
    roots = set(graph._roots)
    for node, kids in children.items():
        if not kids or (node not in roots and leaf_of(node) is not None):
            continue  # a leaf, or a link of a unary chain: the consumer is above it
        for child in kids:
            key = leaf_of(child)
            if key in weights:
                consumers.setdefault(node, []).append(key)
    if not consumers:  # pragma: no cover - every candidate is reached, hence consumed
        return []
    # every node below a consuming operation is applied before it
    below: set[Any] = set()
    stack = [child for node in consumers for child in children.get(node, ())]
    while stack:
        node = stack.pop()
        if node in below:
            continue
        below.add(node)
        stack.extend(children.get(node, ()))
    last: set[int] = set()
    for node, keys in consumers.items():
        if node in below:
            continue
        last.update(keys)
        for child in children.get(node, ()):  # the bias read by the same operation
            key = leaf_of(child)
            if key is not None and key in shared_ids and shared_ids[key].dim() <= 1:
                last.add(key)
    return [p for p in shared if id(p) in last]
