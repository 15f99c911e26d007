"""NDDR-CNN: layerwise feature fusion by neural discriminative dimensionality reduction.

Reference:
    Gao, Ma, Zhao, Liu, Yuille. *NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by
    Neural Discriminative Dimensionality Reduction.* CVPR 2019.

One network per task; after each stage, every task's features are concatenated along the
channels (``T·C``) and each task gets back ``C`` channels through its own NDDR layer:

```text
F_i ← ReLU(BN(W_i * [F_1 ; … ; F_T]))        W_i: 1×1 convolution, T·C -> C, no bias
```

``W_i`` is initialised to favour task ``i``'s own features: ``[β I, …, α I, …, β I]`` with
``α = 0.9`` on its own block and ``β = 0.1`` on the other (two tasks; for ``T`` tasks the other
blocks get ``0.1 / (T - 1)`` each, so the blocks sum to the identity). BatchNorm starts at
unit scale and zero shift.

Backbone: the same SegNet columns and fusion points as `CrossStitch` (after every
encoder stage and every decoder stage but the last). The paper inserts NDDR layers between the
stages of VGG-16 and ResNet backbones; putting SegNet here keeps the zoo comparable.
`param_groups` trains the NDDR layers with a larger learning rate.

Parameter partition (as in `gradbalance.models.cross_stitch`: shared means reached by more than
one task's loss): the NDDR layers but the last, and each column's stages before the last NDDR
layer, are shared. In the last NDDR layer, task ``i``'s convolution and BatchNorm feed only task
``i``'s column, so they belong to task ``i`` with the column's last decoder stage and its head.
The last shared layer (GradNorm's ``W``) is then the last convolution of every column's
second-to-last decoder stage, one per column, all applied just before the last NDDR layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from gradbalance.models.base import NYUV2_TASKS, Member, TasksLike, init_weights, parse_tasks
from gradbalance.models.cross_stitch import ColumnNet, mixing_init

__all__ = ["NDDRCNN", "NDDRLayer"]


class NDDRLayer(nn.Module):
    """Concatenate ``T`` task features and reduce them back to ``C`` channels per task.

    Args:
        num_tasks: ``T``.
        channels: ``C``, the channels of each task's features.
        self_weight: ``α``, the initial weight of a task's own features.

    Examples:
        >>> import torch
        >>> layer = NDDRLayer(2, 4)
        >>> [tuple(y.shape) for y in layer([torch.randn(2, 4, 3, 3)] * 2)]
        [(2, 4, 3, 3), (2, 4, 3, 3)]
    """

    def __init__(self, num_tasks: int, channels: int, self_weight: float = 0.9) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        convs = [nn.Conv2d(num_tasks * channels, channels, 1, bias=False) for _ in range(num_tasks)]
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_tasks))
        mix = mixing_init(num_tasks, self_weight)
        eye = torch.eye(channels)
        with torch.no_grad():
            for i, conv in enumerate(convs):
                blocks = [mix[i, j] * eye for j in range(num_tasks)]
                conv.weight.copy_(torch.cat(blocks, dim=1)[:, :, None, None])

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        if len(xs) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task features, got {len(xs)}")
        cat = torch.cat(list(xs), dim=1)
        return [torch.relu(bn(conv(cat))) for conv, bn in zip(self.convs, self.bns)]


class NDDRCNN(ColumnNet):
    """NDDR-CNN on SegNet columns.

    Args:
        tasks: the tasks (default `NYUV2_TASKS`).
        width: channel multiplier.
        in_channels: input image channels.
        self_weight: ``α`` of the NDDR initialisation (0.9).
        unit_lr_mult: learning-rate multiplier of the NDDR layers in `param_groups`.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.NDDRCNN({"segmentation": 7, "depth": 1}, width=1 / 16)
        >>> tuple(model(torch.randn(2, 3, 32, 32))["segmentation"].shape)
        (2, 7, 32, 32)
    """

    def __init__(
        self,
        tasks: TasksLike = None,
        *,
        width: float = 1.0,
        in_channels: int = 3,
        self_weight: float = 0.9,
        unit_lr_mult: float = 100.0,
    ) -> None:
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        fused = self._build_columns(width, in_channels)
        init_weights(self)
        self.unit_lr_mult = float(unit_lr_mult)
        self.units = nn.ModuleList(
            NDDRLayer(len(self.tasks), ch, self_weight=self_weight) for ch in fused
        )

    def _shared_members(self) -> list[Member]:
        return [*self._column_shared(), *self.units[:-1]]

    def _task_members(self, task: str) -> list[Member]:
        i = list(self.tasks).index(task)
        last = cast(NDDRLayer, self.units[-1])
        return [*super()._task_members(task), last.convs[i], last.bns[i]]

    def _last_shared_members(self) -> list[Member]:
        return [col.dec_stage(1).last_layer()[0] for col in self._columns()]
