"""MTAN: Multi-Task Attention Network, on SegNet and on any staged backbone.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance.models.base import (
    NYUV2_TASKS,
    Member,
    MultiTaskModel,
    TasksLike,
    check_image,
    check_width,
    init_weights,
    parse_tasks,
    scaled,
)
from gradbalance.models.layers import ConvBNReLU, TaskHead, resize
from gradbalance.models.segnet import SegNetBackbone, SegNetStage, pool, unpool

__all__ = ["MTAN", "STAN", "AttentionModule", "BasicBlock", "SegNetMTAN", "resnet_mtan"]


class AttentionModule(nn.Sequential):
    """MTAN's task-specific attention: ``Conv1×1-BN-ReLU -> Conv1×1-BN -> Sigmoid``.

    Examples:
        >>> import torch
        >>> mask = AttentionModule(8, 4, 4)(torch.randn(2, 8, 5, 5))
        >>> bool(((mask >= 0) & (mask <= 1)).all())
        True
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 1),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )


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


class MTAN(MultiTaskModel):
    """Task attention added to any backbone given as a sequence of stages.

    Stage ``j`` must be an `torch.nn.Sequential` of at least two modules: ``u^(j)`` is
    the output of all but its last module and ``p^(j)`` the output of the last. Task ``i``'s
    mask at stage ``j`` reads ``[u^(j) ; f^(j-1)(â_i^(j-1))]`` (just ``u^(0)`` at stage 0), with
    the shared ``f^(j-1)`` = ``Conv3×3-BN-ReLU`` mapping to ``u^(j)``'s channels, resized to its
    resolution (adaptive max pooling down, bilinear up). The last stage's attended features
    feed the heads; dense heads upsample their output to the input size.

    Args:
        stages: the shared backbone's stages, in order (``nn.Sequential`` each).
        channels: channels of each stage's output ``p^(j)``.
        tasks: the tasks; see `parse_tasks`.
        u_channels: channels of each ``u^(j)`` (default: ``channels``, true of residual stages).
        heads: optional ``{task: module}`` replacing the default `TaskHead`; a custom
            head is called with the attended features only.
        in_channels: input channels, checked on 4-D inputs (``None`` skips the check).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> def block(i, o):
        ...     return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())
        >>> stages = [nn.Sequential(block(3, 8), block(8, 8)),
        ...           nn.Sequential(nn.MaxPool2d(2), block(8, 16), block(16, 16))]
        >>> model = MTAN(stages, [8, 16], {"segmentation": 4, "label": ("classification", 3)})
        >>> out = model(torch.randn(2, 3, 16, 16))
        >>> tuple(out["segmentation"].shape), tuple(out["label"].shape)
        ((2, 4, 16, 16), (2, 3))
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        channels: Sequence[int],
        tasks: TasksLike,
        *,
        u_channels: Sequence[int] | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__(parse_tasks(tasks))
        stages = list(stages)
        if not stages:
            raise ValueError("MTAN needs at least one stage")
        for j, st in enumerate(stages):
            if not isinstance(st, nn.Sequential) or len(st) < 2:
                raise TypeError(
                    f"stage {j} must be an nn.Sequential of at least two modules "
                    "(u is the output of all but the last, p of the last)"
                )
        n = len(stages)
        channels = [int(ch) for ch in channels]
        u_ch = list(channels) if u_channels is None else [int(ch) for ch in u_channels]
        if len(channels) != n or len(u_ch) != n:
            raise ValueError(
                f"got {n} stages but {len(channels)} channels and {len(u_ch)} u_channels"
            )
        self.in_channels = in_channels
        self._channels, self._u_channels = tuple(channels), tuple(u_ch)
        self.stages = nn.ModuleList(stages)
        self.shared_f = nn.ModuleList(ConvBNReLU(channels[j], u_ch[j + 1]) for j in range(n - 1))
        self.att = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    AttentionModule(u_ch[j] * (1 if j == 0 else 2), channels[j], channels[j])
                    for j in range(n)
                )
                for t in self.tasks
            }
        )
        if heads is not None:
            missing = set(self.tasks) - set(heads)
            if missing:
                raise ValueError(f"heads is missing task(s) {sorted(missing)}")
            self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        else:
            self.heads = nn.ModuleDict(
                {t: TaskHead(spec, channels[-1]) for t, spec in self.tasks.items()}
            )
        init_weights(self.shared_f)
        init_weights(self.att)

    def _run(self, x: Tensor, keep_masks: bool) -> tuple[dict[str, Tensor], dict[str, list]]:
        if self.in_channels is not None and x.dim() == 4:
            check_image(x, self.in_channels, type(self).__name__)
        us, ps = [], []
        h = x
        for j, st in enumerate(cast("Iterable[nn.Sequential]", self.stages)):
            u = st[:-1](h)
            h = st[-1](u)
            if u.shape[1] != self._u_channels[j] or h.shape[1] != self._channels[j]:
                raise ValueError(
                    f"stage {j} gives u with {u.shape[1]} and p with {h.shape[1]} channels, but "
                    f"the model was built with u_channels={self._u_channels[j]} and "
                    f"channels={self._channels[j]}; pass the stages' real channel counts"
                )
            us.append(u)
            ps.append(h)
        size = tuple(x.shape[-2:]) if x.dim() == 4 else None
        out: dict[str, Tensor] = {}
        masks: dict[str, list[Tensor]] = {}
        for t in self.tasks:
            kept = []
            att = cast(nn.ModuleList, self.att[t])
            a: Tensor | None = None
            for j in range(len(self.stages)):
                if a is None:
                    inp = us[j]
                else:
                    prev = resize(self.shared_f[j - 1](a), us[j].shape[-2:])
                    inp = torch.cat([us[j], prev], 1)
                mask = att[j](inp)
                a = mask * ps[j]
                if keep_masks:
                    kept.append(mask)
            head = self.heads[t]
            out[t] = head(a, size=size) if isinstance(head, TaskHead) else head(a)
            masks[t] = kept
        return out, masks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self._run(x, keep_masks=False)[0]

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """The attention masks of every task, one per stage."""
        return self._run(x, keep_masks=True)[1]

    def _shared_members(self) -> list[Member]:
        return [self.stages, self.shared_f]

    def _task_members(self, task: str) -> list[Member]:
        return [self.att[task], self.heads[task]]

    def _last_shared_members(self) -> list[Member]:
        # the last convolution or linear layer of the last stage (any module with parameters
        # when it has none)
        layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
        found: list[nn.Module] = [m for m in self.stages[-1].modules() if isinstance(m, layers)]
        if not found:
            found = [
                m for m in self.stages.modules() if next(m.parameters(False), None) is not None
            ]
        # with the shared f of the last stage's attention, applied as late (its output feeds
        # only the task-specific masks of that stage)
        shared_f: list[Member] = (
            [cast(ConvBNReLU, self.shared_f[-1])[0]] if len(self.shared_f) else []
        )
        return [*found[-1:], *shared_f]


class BasicBlock(nn.Module):
    """ResNet's basic residual block: two ``Conv3×3-BN`` with an identity (or ``1×1``
    projection) shortcut, then ReLU (He et al., CVPR 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def resnet_mtan(
    tasks: TasksLike = None,
    *,
    width: float = 1.0,
    blocks: Sequence[int] = (2, 2, 2, 2),
    in_channels: int = 3,
) -> MTAN:
    """MTAN on a ResNet-18-style backbone: the `MTAN` wrapper's worked example.

    Stage 0 is the stem (``Conv7×7/2-BN-ReLU``, ``MaxPool3×3/2``) and the first residual layer;
    stages 1-3 are the other layers (stride 2). Widths 64, 128, 256, 512 times ``width``.
    Dense heads predict at 1/32 resolution and upsample to the input size.

    Args:
        tasks: the tasks (default `NYUV2_TASKS`).
        width: channel multiplier.
        blocks: residual blocks per layer, each at least 2 (``u`` is the output of all but
            the last block).
        in_channels: input image channels.

    Examples:
        >>> import torch
        >>> model = resnet_mtan(width=1 / 16)
        >>> tuple(model(torch.randn(2, 3, 64, 64))["depth"].shape)
        (2, 1, 64, 64)
    """
    width = check_width(width)
    if len(blocks) != 4 or min(blocks) < 2:
        raise ValueError(f"blocks must be 4 counts of at least 2, got {tuple(blocks)}")
    widths = [scaled(w, width) for w in (64, 128, 256, 512)]
    stem = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    )
    stages = []
    prev = widths[0]
    for j, (w, n) in enumerate(zip(widths, blocks)):
        layer: list[nn.Module] = [BasicBlock(prev, w, 1 if j == 0 else 2)]
        layer += [BasicBlock(w, w) for _ in range(n - 1)]
        if j == 0:
            layer = [stem, *layer]
        stages.append(nn.Sequential(*layer))
        prev = w
    model = MTAN(stages, widths, parse_tasks(tasks, default=NYUV2_TASKS), in_channels=in_channels)
    for st in model.stages:
        for m in st.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
