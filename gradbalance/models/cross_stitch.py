"""Cross-Stitch networks on SegNet columns.

Reference:
    Misra, Shrivastava, Gupta, Hebert. *Cross-stitch Networks for Multi-task Learning.*
    CVPR 2016.

One network (*column*) per task; after each stage a cross-stitch unit mixes the tasks'
activations linearly:

```text
x̃_i = Σ_j α_ij x_j                 (one α per task pair, or per pair and channel)
```

The paper initialises the units near identity, ``α_ii = 0.9`` and ``α_ij = 0.1`` for two tasks
(here ``α_ij = 0.1 / (T - 1)`` for ``T`` tasks, so each row sums to one), and trains them with a
higher learning rate than the columns; `param_groups` returns that group (multiplier
``unit_lr_mult``, default 100, our choice).

As in the MTAN paper's Cross-Stitch baseline, the columns are SegNets and a unit follows every
encoder stage (after pooling; each column unpools with its own indices) and every decoder stage
but the last: ``2 × 5 - 1 = 9`` units. The parameters are about ``T`` single-task SegNets
(``#P ≈ 3`` for NYUv2).

Parameter partition: a parameter is shared when more than one task's loss reaches it, the
definition of ``GradBalancer(shared="auto")``. Through the units every task's loss reaches every
column up to the last unit, so the shared parameters are the units *and* each column's encoder
and decoder stages but its last; each column's last decoder stage (after the last unit) and its
head belong to its task. A gradient method thus balances the columns too (with only the units
shared, each column would get the plain sum of the task gradients, and the method would act on
a handful of mixing weights). The last shared layer (GradNorm's ``W``) is the last unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from gradbalance.models.base import (
    NYUV2_TASKS,
    Member,
    MultiTaskModel,
    TasksLike,
    check_image,
    init_weights,
    parse_tasks,
)
from gradbalance.models.layers import TaskHead
from gradbalance.models.segnet import SegNetBackbone, pool, unpool

__all__ = ["CrossStitch", "CrossStitchUnit", "mixing_init"]


def mixing_init(num_tasks: int, self_weight: float) -> Tensor:
    """A ``T×T`` matrix with ``self_weight`` on the diagonal and rows summing to one.

    Examples:
        >>> mixing_init(2, 0.9)
        tensor([[0.9000, 0.1000],
                [0.1000, 0.9000]])
    """
    if not 0.0 <= self_weight <= 1.0:
        raise ValueError(f"self_weight must be in [0, 1], got {self_weight}")
    if num_tasks == 1:
        return torch.ones(1, 1)
    other = (1.0 - self_weight) / (num_tasks - 1)
    eye = torch.eye(num_tasks)
    return eye * self_weight + (1 - eye) * other


class CrossStitchUnit(nn.Module):
    """``x̃_i = Σ_j α_ij x_j`` over ``T`` task features of equal shape ``(B, C, ...)``.

    Args:
        num_tasks: ``T``.
        channels: with ``per_channel``, the channel count ``C`` (one ``α`` per channel).
        per_channel: learn ``α`` of shape ``(T, T, C)`` instead of ``(T, T)``.
        self_weight: initial ``α_ii``; the rest of each row is spread evenly.

    Examples:
        >>> import torch
        >>> unit = CrossStitchUnit(2)
        >>> a, b = torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
        >>> [round(y.mean().item(), 4) for y in unit([a, b])]
        [0.9, 0.1]
    """

    def __init__(
        self,
        num_tasks: int,
        channels: int | None = None,
        *,
        per_channel: bool = False,
        self_weight: float = 0.9,
    ) -> None:
        super().__init__()
        if per_channel and channels is None:
            raise ValueError("per_channel=True needs the channel count")
        init = mixing_init(num_tasks, self_weight)
        if per_channel and channels is not None:
            init = init[:, :, None].repeat(1, 1, int(channels))
        self.num_tasks = num_tasks
        self.per_channel = per_channel
        self.alpha = nn.Parameter(init)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        if len(xs) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task features, got {len(xs)}")
        stacked = torch.stack(list(xs))
        if self.per_channel:
            mixed = torch.einsum("ijc,jbc...->ibc...", self.alpha, stacked)
        else:
            mixed = torch.einsum("ij,j...->i...", self.alpha, stacked)
        return list(mixed.unbind(0))


class ColumnNet(MultiTaskModel):
    """One SegNet column per task with a fusion unit after every stage but the last.

    Subclasses build ``self.units`` (in execution order) after calling ``_build_columns``.
    """

    in_channels: int
    columns: nn.ModuleDict  # {task: SegNetBackbone}
    heads: nn.ModuleDict  # {task: TaskHead}
    units: nn.ModuleList
    unit_lr_mult: float

    def _build_columns(self, width: float, in_channels: int) -> list[int]:
        self.in_channels = in_channels
        columns = {t: SegNetBackbone(in_channels, width) for t in self.tasks}
        self.columns = nn.ModuleDict(columns)
        c = next(iter(columns.values())).channels
        self.heads = nn.ModuleDict({t: TaskHead(s, c[0]) for t, s in self.tasks.items()})
        n = len(c)
        # channels after each fused stage: encoder stages 0..n-1, decoder stages n-1..1
        return [c[s] for s in range(n)] + [c[s - 1] for s in reversed(range(1, n))]

    def _columns(self) -> list[SegNetBackbone]:
        """The tasks' SegNet columns, in task order."""
        return cast("list[SegNetBackbone]", list(self.columns.values()))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_image(x, self.in_channels, type(self).__name__)
        tasks = list(self.tasks)
        cols = cast("list[SegNetBackbone]", [self.columns[t] for t in tasks])
        n = cols[0].num_stages
        xs = [x] * len(tasks)
        where: list[list[tuple[Tensor, torch.Size]]] = [[] for _ in tasks]
        k = 0
        for s in range(n):
            for i, col in enumerate(cols):
                y, idx, size = pool(col.enc[s](xs[i]))
                xs[i] = y
                where[i].append((idx, size))
            xs = self.units[k](xs)
            k += 1
        for s in reversed(range(n)):
            xs = [col.dec_stage(s)(unpool(xs[i], *where[i][s])) for i, col in enumerate(cols)]
            if s > 0:
                xs = self.units[k](xs)
                k += 1
        return {t: self.heads[t](xs[i]) for i, t in enumerate(tasks)}

    def param_groups(self, lr: float) -> list[dict]:
        """Two groups: the columns and heads at ``lr``, the units at ``lr * unit_lr_mult``.

        Examples:
            >>> import torch, gradbalance as gb
            >>> model = gb.models.create("cross-stitch", width=1 / 16)
            >>> opt = torch.optim.SGD(model.param_groups(lr=0.01), lr=0.01)
            >>> [g["lr"] for g in opt.param_groups]
            [0.01, 1.0]
        """
        unit_ids = {id(p) for p in self.units.parameters()}
        rest = [p for p in self.parameters() if id(p) not in unit_ids]
        return [
            {"params": rest, "lr": lr},
            {"params": list(self.units.parameters()), "lr": lr * self.unit_lr_mult},
        ]

    def _column_shared(self) -> list[Member]:
        """Every column's layers before the last fusion unit: each task's loss reaches them
        (through the units), so they are shared in the sense of `shared_parameters`."""
        members: list[Member] = []
        for col in self._columns():
            last = col.dec_stage(0)
            members += [col.enc, *(stage for stage in col.dec if stage is not last)]
        return members

    def _shared_members(self) -> list[Member]:
        return [*self._column_shared(), self.units]

    def _task_members(self, task: str) -> list[Member]:
        # after the last unit, each column's last decoder stage and head serve one task only
        column = cast(SegNetBackbone, self.columns[task])
        return [column.dec_stage(0), self.heads[task]]

    def _last_shared_members(self) -> list[Member]:
        return [self.units[-1]]


class CrossStitch(ColumnNet):
    """Cross-Stitch network: SegNet columns joined by cross-stitch units (`CrossStitchUnit`).

    Args:
        tasks: the tasks (default `NYUV2_TASKS`).
        width: channel multiplier.
        in_channels: input image channels.
        per_channel: one ``α`` per task pair and channel instead of per task pair.
        self_weight: initial ``α_ii`` (0.9 as in the paper).
        unit_lr_mult: learning-rate multiplier of the units in `param_groups`.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.CrossStitch({"segmentation": 7, "depth": 1}, width=1 / 16)
        >>> tuple(model(torch.randn(2, 3, 32, 32))["depth"].shape)
        (2, 1, 32, 32)
        >>> len(model.units)
        9
    """

    def __init__(
        self,
        tasks: TasksLike = None,
        *,
        width: float = 1.0,
        in_channels: int = 3,
        per_channel: bool = False,
        self_weight: float = 0.9,
        unit_lr_mult: float = 100.0,
    ) -> None:
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        fused = self._build_columns(width, in_channels)
        init_weights(self)
        self.unit_lr_mult = float(unit_lr_mult)
        self.units = nn.ModuleList(
            CrossStitchUnit(len(self.tasks), ch, per_channel=per_channel, self_weight=self_weight)
            for ch in fused
        )
