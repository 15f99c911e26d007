"""The linear algebra shared by the engines and the methods: the Gramian ``G = J Jᵀ``, the
combined update ``Jᵀw``, and the flattening of a list of tensors into one vector and back.

The Jacobian ``J`` arrives as *rows*: one tensor of shape ``(K, *p.shape)`` per shared tensor
``p`` (row ``i`` is task ``i``'s gradient), or ``None`` where no task reaches ``p``. ``G`` is
accumulated in float64 over column blocks of ``J`` (converted block by block), so its precision
does not depend on the model's dtype. Nothing here runs autograd or imports from the package
other than `gradbalance._torch_compat`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradbalance._torch_compat import flatten_dense as flatten
from gradbalance._torch_compat import unflatten_dense as unflatten

__all__ = ["add_gramian_", "combine", "flatten", "gramian", "unflatten"]

#: Entries (``K ×`` columns) of float32/float16 rows converted to float64 at a time when
#: accumulating ``G``: small enough to stay in cache (a 2**20 chunk was twice as slow at K = 32).
_GRAMIAN_CHUNK = 2**15

#: Tensors of at most this many entries share one product in `combine`.
_COMBINE_SMALL = 4096


def gramian(rows: Sequence[Tensor | None], num_tasks: int) -> Tensor:
    """``G = J Jᵀ`` in float64, accumulated tensor by tensor from the Jacobian rows.

    Examples:
        >>> import torch
        >>> gramian([torch.tensor([[1.0, 0.0], [1.0, 1.0]])], 2)
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    device = next((r.device for r in rows if r is not None), torch.device("cpu"))
    g = torch.zeros((num_tasks, num_tasks), dtype=torch.float64, device=device)
    # small tensors (biases, norms) are gathered into one block of up to a chunk's columns,
    # so that each costs one copy instead of a conversion and a product of its own
    limit = max(1, _GRAMIAN_CHUNK // max(num_tasks, 1))
    pending: list[Tensor] = []
    columns = 0
    for row in rows:
        if row is None:
            continue
        flat = row.reshape(num_tasks, -1)
        n = flat.shape[1]
        if n >= limit // 4 or flat.dtype == torch.float64:
            add_gramian_(g, flat)
            continue
        if pending and (
            pending[0].dtype != flat.dtype
            or pending[0].device != flat.device
            or columns + n > limit
        ):
            add_gramian_(g, torch.cat(pending, dim=1))
            pending, columns = [], 0
        pending.append(flat)
        columns += n
    if pending:
        add_gramian_(g, pending[0] if len(pending) == 1 else torch.cat(pending, dim=1))
    return g


def add_gramian_(g: Tensor, row: Tensor) -> None:
    """``g += J_p J_pᵀ`` in float64; lower-precision rows are converted in column chunks so the
    float64 copy never exceeds ``K × _GRAMIAN_CHUNK / K`` entries."""
    k = g.shape[0]
    flat = row.reshape(k, -1)
    if flat.dtype == torch.float64:
        g.addmm_(flat, flat.T)
        return
    step = max(1, _GRAMIAN_CHUNK // max(k, 1))
    for start in range(0, flat.shape[1], step):
        part = flat[:, start : start + step].to(torch.float64)
        g.addmm_(part, part.T)


def combine(rows: Sequence[Tensor | None], weights: Tensor) -> list[Tensor | None]:
    """``Jᵀw`` tensor by tensor: the weighted sum of the task gradients.

    Examples:
        >>> import torch
        >>> combine([torch.tensor([[1.0, 0.0], [0.0, 1.0]])], torch.tensor([0.25, 0.75]))
        [tensor([0.2500, 0.7500])]
    """
    out: list[Tensor | None] = [None] * len(rows)
    cast: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    # small tensors of one (device, dtype) share one product on their concatenated rows
    small: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = {}
    for i, row in enumerate(rows):
        if row is None:
            continue
        key = (row.device, row.dtype)
        w = cast.get(key)
        if w is None:
            w = cast[key] = weights.to(device=row.device, dtype=row.dtype)
        k = row.shape[0]
        flat = row.reshape(k, -1)
        if flat.shape[1] <= _COMBINE_SMALL:
            small.setdefault(key, []).append((i, flat))
            continue
        # one vector-matrix product per tensor (what tensordot does, without its overhead)
        out[i] = (w @ flat).view(row.shape[1:])
    for key, items in small.items():
        joined = cast[key] @ (
            items[0][1] if len(items) == 1 else torch.cat([f for _, f in items], 1)
        )
        for (i, _), part in zip(items, joined.split([f.shape[1] for _, f in items])):
            out[i] = part.view(rows[i].shape[1:])  # type: ignore[union-attr]
    return out
