"""Building blocks shared by the zoo: convolution blocks and per-task prediction heads."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance.tasks import TaskSpec, lookup

__all__ = ["ConvBNReLU", "TaskHead", "conv_layer", "resize"]


class ConvBNReLU(nn.Sequential):
    """``Conv2d(k×k, padding k//2) -> BatchNorm2d -> ReLU``: SegNet's (and VGG's) unit layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


def conv_layer(in_channels: int, out_channels: int, repeat: int = 1) -> nn.Sequential:
    """``repeat`` `ConvBNReLU` blocks, the first mapping ``in -> out``, the rest
    ``out -> out``. ``repeat=2`` is the MTAN paper's *Split, Deep* layer."""
    blocks = [ConvBNReLU(in_channels, out_channels)]
    blocks += [ConvBNReLU(out_channels, out_channels) for _ in range(repeat - 1)]
    return nn.Sequential(*blocks)


def resize(x: Tensor, size: tuple[int, int] | list[int] | tuple[int, ...]) -> Tensor:
    """Bring ``x`` to the spatial ``size``: unchanged when equal, adaptive max pooling when
    smaller, bilinear interpolation (``align_corners=True``) when larger."""
    size = (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if size[0] <= h and size[1] <= w:
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class TaskHead(nn.Module):
    """The prediction layer of one task, chosen by its kind.

    Dense kinds (segmentation, depth, normal) use the MTAN reference prediction layer,
    ``Conv3×3(c -> c) -> Conv1×1(c -> out)``, optionally upsampled (bilinear) to ``size``;
    kinds whose `gradbalance.tasks.KIND_TABLE` row sets ``unit_vectors`` (surface normals) are
    then L2-normalised over channels. Per-sample kinds (classification, regression) use
    ``Conv3×3(c -> c) -> ReLU -> global average pool -> Linear(c -> out)``.
    Segmentation and classification heads return logits.

    Args:
        spec: the task.
        in_channels: channels of the features the head reads.

    Examples:
        >>> import torch
        >>> head = TaskHead(TaskSpec("normal", 3), 8)
        >>> out = head(torch.randn(2, 8, 4, 4), size=(16, 16))
        >>> tuple(out.shape), bool(torch.allclose(out.norm(dim=1), torch.ones(2, 16, 16)))
        ((2, 3, 16, 16), True)
    """

    def __init__(self, spec: TaskSpec, in_channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.unit_vectors = lookup(spec).unit_vectors
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        if spec.dense:
            self.out: nn.Module = nn.Conv2d(in_channels, spec.channels, 1)
        else:
            self.out = nn.Linear(in_channels, spec.channels)

    def forward(self, x: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
        if self.spec.dense:
            y = self.out(self.conv(x))
            if size is not None and tuple(y.shape[-2:]) != tuple(size):
                y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
            if self.unit_vectors:
                y = F.normalize(y, p=2.0, dim=1)
            return y
        return self.out(F.relu(self.conv(x)).mean(dim=(2, 3)))
