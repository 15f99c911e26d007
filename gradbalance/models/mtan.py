"""MTAN: Multi-Task Attention Network on SegNet, and STAN, its single-task baseline.

Reference:
    Liu, Johns, Davison. *End-to-End Multi-Task Learning with Attention.* CVPR 2019.

A single shared network is the *global feature pool*. For each task ``i`` and each stage ``j``
a soft attention module computes a mask from the stage's first-layer features ``u^(j)`` and the
task's previous attended features, and selects from the stage output ``p^(j)``:

```text
a_i^(j) = h_i^(j)( g_i^(j)( [u^(j) ; f^(j)(â_i^(j-1))] ) )      (mask, in [0, 1])
â_i^(j) = a_i^(j) ⊙ p^(j)
```

with ``g`` = ``Conv1×1-BN-ReLU``, ``h`` = ``Conv1×1-BN-Sigmoid`` (task-specific) and ``f`` a
``Conv3×3-BN-ReLU`` block shared by all tasks, followed by pooling in the encoder and preceded
by bilinear upsampling in the decoder. The attended features of the last decoder stage feed
the task head.

The attention module and the `MTAN` wrapper for any staged backbone live in
`gradbalance.models.attention`, its ResNet example `resnet_mtan` in `gradbalance.models.resnet`;
both are importable from here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance.models.attention import MTAN, AttentionModule
from gradbalance.models.base import (
    NYUV2_TASKS,
    Member,
    MultiTaskModel,
    TasksLike,
    check_image,
    init_weights,
    parse_tasks,
)
from gradbalance.models.layers import ConvBNReLU, TaskHead
from gradbalance.models.resnet import BasicBlock, resnet_mtan
from gradbalance.models.segnet import SegNetBackbone, SegNetStage, pool, unpool

__all__ = ["MTAN", "STAN", "AttentionModule", "BasicBlock", "SegNetMTAN", "resnet_mtan"]


class SegNetMTAN(MultiTaskModel):
    """MTAN on SegNet, as in the paper's image-to-image experiments.

    Encoder stage ``j`` (``c_j`` channels): the mask reads ``u^(j)`` (first layer output) and,
    for ``j > 0``, the previous attended features after the shared ``f^(j-1)``
    (``Conv3×3 c_{j-1} -> c_j``) and ``2×2`` max pooling; it multiplies the stage output
    ``p^(j)``. Decoder stage ``j``: the previous attended features are upsampled (bilinear) to
    the stage's resolution and passed through the shared ``f`` (``c_in -> c_out``); the mask
    reads them with the stage's unpooled input ``u`` and multiplies the stage output.

    At ``width=1`` with NYUv2's three tasks this has 1.77 times the parameters of one
    single-task SegNet, and 1.65 times with CityScapes' two tasks (the paper's ``#P``).

    No single tensor is read by every head (each task reads the shared pool at every stage), so
    `has_shared_features` is ``False``.

    Args:
        tasks: the tasks (default `NYUV2_TASKS`).
        width: channel multiplier.
        in_channels: input image channels.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.SegNetMTAN(width=1 / 16)
        >>> out = model(torch.randn(2, 3, 32, 32))
        >>> tuple(out["normal"].shape)
        (2, 3, 32, 32)
        >>> masks = model.attention_masks(torch.randn(2, 3, 32, 32))
        >>> len(masks["depth"])  # 5 encoder + 5 decoder stages
        10
    """

    def __init__(self, tasks: TasksLike = None, *, width: float = 1.0, in_channels: int = 3):
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        self.in_channels = in_channels
        self.backbone = SegNetBackbone(in_channels, width)
        c = self.backbone.channels
        n = len(c)
        dec_out = [c[s - 1] if s > 0 else c[0] for s in range(n)]
        # shared f: encoder c_j -> c_{j+1} (last stage keeps c_{n-1}); decoder c_j -> out_j
        self.enc_f = nn.ModuleList(ConvBNReLU(c[j], c[min(j + 1, n - 1)]) for j in range(n))
        self.dec_f = nn.ModuleList(ConvBNReLU(c[j], dec_out[j]) for j in range(n))
        self.enc_att = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    AttentionModule(c[j] if j == 0 else 2 * c[j], c[j], c[j]) for j in range(n)
                )
                for t in self.tasks
            }
        )
        self.dec_att = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    AttentionModule(c[j] + dec_out[j], dec_out[j], dec_out[j]) for j in range(n)
                )
                for t in self.tasks
            }
        )
        self.heads = nn.ModuleDict({t: TaskHead(s, c[0]) for t, s in self.tasks.items()})
        init_weights(self)

    def _run(self, x: Tensor, keep_masks: bool) -> tuple[dict[str, Tensor], dict[str, list]]:
        check_image(x, self.in_channels, type(self).__name__)
        bb = self.backbone
        n = bb.num_stages
        enc_u, enc_p, where = [], [], []
        h = x
        for stage in cast("Iterable[SegNetStage]", bb.enc):
            u = stage.first(h)
            p = stage.rest(u)
            h, idx, size = pool(p)
            enc_u.append(u)
            enc_p.append(p)
            where.append((idx, size))
        dec_u: list[Tensor] = [h] * n
        dec_p: list[Tensor] = [h] * n
        for s in reversed(range(n)):
            dec_u[s] = unpool(h, *where[s])
            h = dec_p[s] = bb.dec_stage(s)(dec_u[s])

        out: dict[str, Tensor] = {}
        masks: dict[str, list[Tensor]] = {}
        for t in self.tasks:
            kept: list[Tensor] = []
            enc_att = cast(nn.ModuleList, self.enc_att[t])
            dec_att = cast(nn.ModuleList, self.dec_att[t])
            a: Tensor | None = None
            for j in range(n):
                inp = enc_u[j] if a is None else torch.cat([enc_u[j], a], 1)
                mask = enc_att[j](inp)
                a = F.max_pool2d(self.enc_f[j](mask * enc_p[j]), kernel_size=2, stride=2)
                if keep_masks:
                    kept.append(mask)
            assert a is not None
            for j in reversed(range(n)):
                a = F.interpolate(a, size=dec_u[j].shape[-2:], mode="bilinear", align_corners=True)
                a = self.dec_f[j](a)
                mask = dec_att[j](torch.cat([dec_u[j], a], 1))
                a = mask * dec_p[j]
                if keep_masks:
                    kept.append(mask)
            out[t] = self.heads[t](a)
            masks[t] = kept
        return out, masks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self._run(x, keep_masks=False)[0]

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """The attention masks of every task: encoder stages shallow to deep, then decoder
        stages deep to shallow."""
        return self._run(x, keep_masks=True)[1]

    def _shared_members(self) -> list[Member]:
        return [self.backbone, self.enc_f, self.dec_f]

    def _task_members(self, task: str) -> list[Member]:
        return [self.enc_att[task], self.dec_att[task], self.heads[task]]

    def _last_shared_members(self) -> list[Member]:
        # the last shared layers in execution order: the shared network's last convolution
        # (its output p^(0) is what the last masks select from) and the shared f^(0) of the
        # last decoder attention stage (its output feeds only the task-specific masks)
        return [self.backbone.dec_stage(0).last_layer()[0], cast(ConvBNReLU, self.dec_f[0])[0]]


class STAN(MultiTaskModel):
    """Single-Task Attention Networks: one `SegNetMTAN` per task, sharing nothing.

    The MTAN paper's *STAN* baseline (``#P`` 4.56 for NYUv2's three tasks).

    Args:
        tasks: the tasks (default `NYUV2_TASKS`).
        width: channel multiplier.
        in_channels: input image channels.
    """

    def __init__(self, tasks: TasksLike = None, *, width: float = 1.0, in_channels: int = 3):
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        self.nets = nn.ModuleDict(
            {
                t: SegNetMTAN({t: spec}, width=width, in_channels=in_channels)
                for t, spec in self.tasks.items()
            }
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.nets[t](x)[t] for t in self.tasks}

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """The attention masks of each task's network."""
        return {t: cast(SegNetMTAN, self.nets[t]).attention_masks(x)[t] for t in self.tasks}

    def _shared_members(self) -> list[Member]:
        return []

    def _task_members(self, task: str) -> list[Member]:
        return [self.nets[task]]
