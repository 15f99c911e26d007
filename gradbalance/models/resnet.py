"""MTAN on a ResNet-18-style backbone: the `MTAN` wrapper's worked example.

Reference:
    He, Zhang, Ren, Sun. *Deep Residual Learning for Image Recognition.* CVPR 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance.models.attention import MTAN
from gradbalance.models.base import NYUV2_TASKS, TasksLike, check_width, parse_tasks, scaled

__all__ = ["BasicBlock", "resnet_mtan"]


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
