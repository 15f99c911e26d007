"""SegNet (VGG-16 encoder, max-pooling indices, mirrored decoder) and the MTAN paper's
baselines on it: single-task networks, Split (standard, wide, deep) and Dense.

References:
    Badrinarayanan, Kendall, Cipolla. *SegNet: A Deep Convolutional Encoder-Decoder
    Architecture for Image Segmentation.* TPAMI 2017.

    Liu, Johns, Davison. *End-to-End Multi-Task Learning with Attention.* CVPR 2019
    (Section 4 baselines, Table 3 ``#P`` column).

Layout (at ``width=1``): five encoder stages of 2, 2, 3, 3, 3 ``Conv3×3-BN-ReLU`` layers with
64, 128, 256, 512, 512 channels, each followed by ``2×2`` max pooling that keeps its indices;
the decoder mirrors it: stage ``s`` unpools with stage ``s``'s indices, maps ``c_s -> c_{s-1}``
with its first layer and keeps ``c_{s-1}`` in the others. The decoder output has 64 channels
at input resolution; each task head is ``Conv3×3(64 -> 64) -> Conv1×1(64 -> out)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance.errors import OptionError
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
from gradbalance.models.layers import ConvBNReLU, TaskHead, conv_layer
from gradbalance.tasks import TaskSpec

__all__ = [
    "VGG16_DEPTHS",
    "VGG16_WIDTHS",
    "WIDE_WIDTHS",
    "Dense",
    "SegNet",
    "SegNetBackbone",
    "SegNetStage",
    "Split",
]

#: VGG-16 channel widths of SegNet's five encoder stages.
VGG16_WIDTHS = (64, 128, 256, 512, 512)
#: Number of 3×3 convolution layers in each VGG-16 stage.
VGG16_DEPTHS = (2, 2, 3, 3, 3)
#: The MTAN paper's *Split, Wide* widths (the last stage doubled).
WIDE_WIDTHS = (64, 128, 256, 512, 1024)


def pool(x: Tensor) -> tuple[Tensor, Tensor, torch.Size]:
    """``2×2`` max pooling that keeps the indices and the size before pooling."""
    size = x.shape[-2:]
    if min(size) < 2:
        raise ValueError(
            f"the input is too small: a 2×2 pooling stage got a {size[0]}×{size[1]} feature map; "
            "SegNet-based models pool 5 times and need images of at least 32×32"
        )
    y, idx = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
    return y, idx, size


def unpool(x: Tensor, idx: Tensor, size: torch.Size) -> Tensor:
    """Max unpooling with the indices of `pool`, back to ``size``."""
    return F.max_unpool2d(x, idx, kernel_size=(2, 2), stride=(2, 2), output_size=size)


class SegNetStage(nn.Module):
    """One SegNet stage: a first layer ``in -> out`` then ``depth - 1`` layers ``out -> out``.

    MTAN reads the output of the first layer (``u``) and of the whole stage (``p``), so the
    two parts are kept apart.

    With ``mid_channels``, the first layer maps ``in -> mid`` and the second ``mid -> out``
    (the *Dense* task networks' last decoder stage, ``2c -> 2c -> c`` as in the reference code).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int,
        repeat: int = 1,
        mid_channels: int | None = None,
    ) -> None:
        super().__init__()
        mid = out_channels if mid_channels is None else mid_channels
        if mid != out_channels and depth < 2:
            raise OptionError(
                f"SegNetStage: mid_channels={mid} differs from out_channels={out_channels}, which "
                f"needs a second layer, but depth={depth}; use depth >= 2 or mid_channels=None"
            )
        self.first = conv_layer(in_channels, mid, repeat)
        self.rest = nn.Sequential(
            *[
                conv_layer(mid if i == 0 else out_channels, out_channels, repeat)
                for i in range(depth - 1)
            ]
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.first(x))

    def last_layer(self) -> ConvBNReLU:
        """The stage's last ``Conv-BN-ReLU``."""
        return [m for m in self.modules() if isinstance(m, ConvBNReLU)][-1]


class SegNetBackbone(nn.Module):
    """SegNet encoder-decoder without heads: ``(B, in, H, W) -> (B, c_0, H, W)``.

    Args:
        in_channels: input image channels.
        width: channel multiplier (channels are scaled and rounded, at least 1).
        widths: channels of the encoder stages at ``width=1``.
        depths: layers per stage.
        repeat: ``Conv-BN-ReLU`` blocks per layer (2 builds the *Split, Deep* network).
        fuse: stage inputs (all but the first encoder stage) are the concatenation of this
            network's features with equally wide external features (the *Dense* baseline's
            task networks), so their input channels double; the last decoder stage then keeps
            the doubled width in its first layer (``2c_0 -> 2c_0 -> c_0``), as in the MTAN
            reference code's Dense network.
        decoder_stages: how many decoder stages to build, deepest first (default: all).

    Attributes:
        channels: the scaled encoder widths.
        enc: the encoder stages, shallow to deep.
        dec: the decoder stages in execution order (deepest first); see `dec_stage`.

    Examples:
        >>> import torch
        >>> net = SegNetBackbone(width=1 / 16)
        >>> tuple(net(torch.randn(2, 3, 32, 32)).shape)
        (2, 4, 32, 32)
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: float = 1.0,
        widths: Sequence[int] = VGG16_WIDTHS,
        depths: Sequence[int] = VGG16_DEPTHS,
        repeat: int = 1,
        fuse: bool = False,
        decoder_stages: int | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} differ in length")
        width = check_width(width)
        c = [scaled(w, width) for w in widths]
        n = len(c)
        k = 2 if fuse else 1
        self.channels = tuple(c)
        self.enc = nn.ModuleList(
            SegNetStage(in_channels if s == 0 else k * c[s - 1], c[s], depths[s], repeat)
            for s in range(n)
        )
        n_dec = n if decoder_stages is None else decoder_stages
        self.dec = nn.ModuleList(
            SegNetStage(
                k * c[s],
                c[s - 1] if s > 0 else c[0],
                depths[s],
                repeat,
                mid_channels=k * c[0] if s == 0 and fuse and depths[0] > 1 else None,
            )
            for s in reversed(range(n - n_dec, n))
        )

    @property
    def num_stages(self) -> int:
        """Number of encoder stages."""
        return len(self.enc)

    def dec_stage(self, s: int) -> SegNetStage:
        """The decoder stage working at encoder stage ``s``'s resolution."""
        return cast(SegNetStage, self.dec[self.num_stages - 1 - s])

    def forward(self, x: Tensor) -> Tensor:
        pooled: list[tuple[Tensor, torch.Size]] = []
        for stage in self.enc:
            x, idx, size = pool(stage(x))
            pooled.append((idx, size))
        for s in reversed(range(self.num_stages)):
            idx, size = pooled[s]
            x = self.dec_stage(s)(unpool(x, idx, size))
        return x


def _heads(tasks: Mapping[str, TaskSpec], in_channels: int) -> nn.ModuleDict:
    return nn.ModuleDict({t: TaskHead(spec, in_channels) for t, spec in tasks.items()})


class SegNet(MultiTaskModel):
    """Single-task learning: one independent SegNet per task (the MTAN paper's *One Task*).

    With one task this is the plain SegNet that the ``#P`` ratios are relative to. With several
    tasks the networks share nothing, so `shared_parameters` is empty (use loss-only
    methods, or train them one by one).

    Args:
        tasks: the tasks (default `NYUV2_TASKS`); see `parse_tasks`.
        width: channel multiplier.
        in_channels: input image channels.

    Examples:
        >>> import torch, gradbalance as gb
        >>> net = gb.models.SegNet({"depth": 1}, width=1 / 16)
        >>> tuple(net(torch.randn(2, 3, 32, 32))["depth"].shape)
        (2, 1, 32, 32)
    """

    def __init__(self, tasks: TasksLike = None, *, width: float = 1.0, in_channels: int = 3):
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        self.in_channels = in_channels
        nets = {t: SegNetBackbone(in_channels, width) for t in self.tasks}
        self.nets = nn.ModuleDict(nets)
        c0 = next(iter(nets.values())).channels[0]
        self.heads = _heads(self.tasks, c0)
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_image(x, self.in_channels, type(self).__name__)
        return {t: self.heads[t](self.nets[t](x)) for t in self.tasks}

    def _shared_members(self) -> list[Member]:
        return []

    def _task_members(self, task: str) -> list[Member]:
        return [self.nets[task], self.heads[task]]


class Split(MultiTaskModel):
    """Hard parameter sharing: one SegNet shared by all tasks, split at the prediction layer.

    The MTAN paper's *Split* baseline. To compare at a size close to MTAN's, its *Wide* variant
    widens the last encoder stage to 1024 channels and its *Deep* variant doubles every
    convolution layer (two ``Conv-BN-ReLU`` per layer): ``#P`` 1.75 and 2.0 on NYUv2.

    The decoder output is the hard-shared representation: `encode` returns it
    and `decode` applies the heads (MGDA-UB).

    Args:
        tasks: the tasks (default `NYUV2_TASKS`).
        variant: ``"standard"``, ``"wide"`` or ``"deep"``.
        width: channel multiplier.
        in_channels: input image channels.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.Split(width=1 / 16)
        >>> z = model.encode(torch.randn(2, 3, 32, 32))
        >>> sorted(model.decode(z))
        ['depth', 'normal', 'segmentation']
    """

    has_shared_features = True
    VARIANTS = ("standard", "wide", "deep")

    def __init__(
        self,
        tasks: TasksLike = None,
        *,
        variant: str = "standard",
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        self.variant = variant
        self.in_channels = in_channels
        self.backbone = SegNetBackbone(
            in_channels,
            width,
            widths=WIDE_WIDTHS if variant == "wide" else VGG16_WIDTHS,
            repeat=2 if variant == "deep" else 1,
        )
        self.heads = _heads(self.tasks, self.backbone.channels[0])
        init_weights(self)

    def encode(self, x: Tensor) -> Tensor:
        """The shared decoder output, ``(B, c_0, H, W)``."""
        check_image(x, self.in_channels, type(self).__name__)
        return self.backbone(x)

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        """The task heads applied to the shared features."""
        return {t: self.heads[t](features) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def _shared_members(self) -> list[Member]:
        return [self.backbone]

    def _task_members(self, task: str) -> list[Member]:
        return [self.heads[task]]

    def _last_shared_members(self) -> list[Member]:
        # the convolution of the last Conv-BN-ReLU (its BatchNorm's 1-D scale and shift are no
        # layer weights): the last shared layer in execution order
        return [self.backbone.dec_stage(0).last_layer()[0]]


class Dense(MultiTaskModel):
    """The MTAN paper's *Dense* baseline: a shared SegNet plus one SegNet per task whose every
    stage also reads the shared network's features at that stage (no attention).

    Task network ``k``, encoder stage ``s >= 1``: input ``[T_k^{s-1} ; P^{s-1}]`` (its own
    pooled features and the shared network's); decoder stage ``s``: input
    ``[unpool(T_k) ; U^s]`` with ``U^s`` the shared decoder's unpooled input at that stage. Each
    task network unpools with its own indices. As in the reference code
    (``im2im_pred/model_segnet_dense.py``), a task network's last decoder stage keeps the
    doubled width in its first layer: ``Conv3×3(2c_0 -> 2c_0)`` then ``Conv3×3(2c_0 -> c_0)``
    (``c_0 = 64``), where its other decoder stages map to ``c_{s-1}`` in their first layer.

    Deviation: the reference implementation also builds the shared network's last decoder
    stage (``Conv3×3(64 -> 64)``, ``Conv3×3(64 -> 13)``, with BN: 44,583 parameters, 0.18 % of
    one SegNet), whose output no task reads; it is left out here so that every parameter
    receives a gradient. Otherwise the networks are the same size: 123,699,409 parameters for
    NYUv2's three tasks against the reference's 123,743,992 (``#P`` 4.952 against 4.954).

    Args:
        tasks: the tasks (default `NYUV2_TASKS`).
        width: channel multiplier.
        in_channels: input image channels.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.Dense(width=1 / 16)
        >>> tuple(model(torch.randn(2, 3, 32, 32))["segmentation"].shape)
        (2, 13, 32, 32)
    """

    def __init__(self, tasks: TasksLike = None, *, width: float = 1.0, in_channels: int = 3):
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        self.in_channels = in_channels
        self.shared = SegNetBackbone(in_channels, width, decoder_stages=len(VGG16_WIDTHS) - 1)
        self.columns = nn.ModuleDict(
            {t: SegNetBackbone(in_channels, width, fuse=True) for t in self.tasks}
        )
        self.heads = _heads(self.tasks, self.shared.channels[0])
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_image(x, self.in_channels, type(self).__name__)
        n = self.shared.num_stages
        # shared network: pooled encoder outputs P^s and unpooled decoder inputs U^s
        pooled: list[Tensor] = []
        where: list[tuple[Tensor, torch.Size]] = []
        h = x
        for stage in self.shared.enc:
            h, idx, size = pool(stage(h))
            pooled.append(h)
            where.append((idx, size))
        ups: list[Tensor] = [h] * n
        for s in reversed(range(n)):
            ups[s] = unpool(h, *where[s])
            if s > 0:
                h = self.shared.dec_stage(s)(ups[s])
        out = {}
        for t in self.tasks:
            col = cast(SegNetBackbone, self.columns[t])
            y = x
            own: list[tuple[Tensor, torch.Size]] = []
            for s, stage in enumerate(col.enc):
                y, idx, size = pool(stage(y if s == 0 else torch.cat([y, pooled[s - 1]], 1)))
                own.append((idx, size))
            for s in reversed(range(n)):
                y = col.dec_stage(s)(torch.cat([unpool(y, *own[s]), ups[s]], 1))
            out[t] = self.heads[t](y)
        return out

    def _shared_members(self) -> list[Member]:
        return [self.shared]

    def _task_members(self, task: str) -> list[Member]:
        return [self.columns[task], self.heads[task]]

    def _last_shared_members(self) -> list[Member]:
        return [self.shared.dec_stage(1).last_layer()[0]]  # its convolution (not the BN)
