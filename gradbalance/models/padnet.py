"""PAD-Net: multi-task guided prediction-and-distillation network.

Reference:
    Xu, Ouyang, Wang, Sebe. *PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network
    for Simultaneous Depth Estimation and Scene Parsing.* CVPR 2018.

A shared encoder feeds one *initial prediction* branch per task, including auxiliary tasks that
are only predicted there (the paper predicts surface normals and contours as auxiliary tasks
for depth and scene parsing). Each branch yields features ``F_k^i`` and a deeply supervised
intermediate prediction. A multi-modal distillation module then passes messages from every
other task's features into each main task, and a decoder makes the final prediction:

```text
F_k^o = F_k^i + Σ_{l≠k} σ(W_{k,l} ⊛ F_l^i) ⊙ F_l^i          ("attention", default)
F_k^o = F_k^i + σ(W_k^g ⊛ F_k^i) ⊙ Σ_{l≠k} W_{k,l} ⊛ F_l^i  ("gated", the paper's
                                                            attention-guided passing)
```

``W`` are ``3×3`` convolutions; the sum runs over main and auxiliary tasks.

Deviations (plain torch, no pretrained weights): the encoder is the VGG-16/SegNet encoder of
this zoo (its first ``encoder_stages`` stages, output stride ``2**encoder_stages``) instead of
the paper's pretrained front-end; each decoder is two ``4×4`` stride-2 transposed convolutions
(the paper's "deconvolutional" layers) and a ``1×1`` prediction, bilinearly resized to the
input size; intermediate predictions are resized to the input size too, so the same losses and
targets serve both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, cast

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
from gradbalance.models.layers import ConvBNReLU
from gradbalance.models.segnet import VGG16_DEPTHS, VGG16_WIDTHS, SegNetStage
from gradbalance.tasks import TaskSpec, lookup, task_loss

__all__ = ["PADNet", "PADNetOutput"]


class PADNetOutput(NamedTuple):
    """The final predictions of the main tasks and the initial ones of every task."""

    final: dict[str, Tensor]
    initial: dict[str, Tensor]


def _finish(spec: TaskSpec, y: Tensor, size: tuple[int, int] | None) -> Tensor:
    if size is not None and tuple(y.shape[-2:]) != tuple(size):
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    if lookup(spec).unit_vectors:
        y = F.normalize(y, p=2.0, dim=1)
    return y


class _Distill(nn.Module):
    """Messages from the other tasks into one main task."""

    def __init__(self, sources: list[str], channels: int, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.sources = sources
        self.msg = nn.ModuleDict(
            {s: nn.Conv2d(channels, channels, 3, padding=1, bias=False) for s in sources}
        )
        if variant == "gated":
            self.gate = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, own: Tensor, feats: Mapping[str, Tensor]) -> Tensor:
        if not self.sources:
            return own
        if self.variant == "attention":
            return own + sum(torch.sigmoid(self.msg[s](feats[s])) * feats[s] for s in self.sources)
        passed = sum(self.msg[s](feats[s]) for s in self.sources)
        return own + torch.sigmoid(self.gate(own)) * passed


class PADNet(MultiTaskModel):
    """PAD-Net with a VGG-16 encoder.

    ``forward(x)`` returns the final predictions of the main tasks (`tasks`);
    `predict` returns those and the initial predictions of every task (main and
    auxiliary) for deep supervision, and `deep_supervision_losses` turns them into one
    loss per task of `all_tasks`.

    The encoder output is the hard-shared representation (`encode`/`decode`).

    Args:
        tasks: the main tasks (default `NYUV2_TASKS`); per-pixel kinds only.
        auxiliary: tasks only predicted initially (e.g. ``{"contour": ("segmentation", 2)}``).
        width: channel multiplier.
        in_channels: input image channels.
        encoder_stages: VGG-16 stages in the encoder (1-5; output stride ``2**stages``).
        features: channels of the task features ``F`` at ``width=1`` (default 256).
        distillation: ``"attention"`` (default) or ``"gated"``; see the module docstring.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.PADNet({"segmentation": 5, "depth": 1}, auxiliary={"normal": 3},
        ...                          width=1 / 16)
        >>> final, initial = model.predict(torch.randn(2, 3, 32, 32))
        >>> sorted(final), sorted(initial)
        (['depth', 'segmentation'], ['depth', 'normal', 'segmentation'])
        >>> model.all_tasks
        ('segmentation', 'depth', 'normal')
    """

    has_shared_features = True
    VARIANTS = ("attention", "gated")

    def __init__(
        self,
        tasks: TasksLike = None,
        *,
        auxiliary: TasksLike = None,
        width: float = 1.0,
        in_channels: int = 3,
        encoder_stages: int = 4,
        features: int = 256,
        distillation: str = "attention",
    ) -> None:
        super().__init__(parse_tasks(tasks, default=NYUV2_TASKS))
        if distillation not in self.VARIANTS:
            raise ValueError(f"distillation must be one of {self.VARIANTS}, got {distillation!r}")
        if not 1 <= encoder_stages <= len(VGG16_WIDTHS):
            raise ValueError(f"encoder_stages must be in 1..5, got {encoder_stages}")
        self.auxiliary: dict[str, TaskSpec] = {} if auxiliary is None else parse_tasks(auxiliary)
        per_sample = [t for t, sp in {**self.tasks, **self.auxiliary}.items() if not sp.dense]
        if per_sample:
            raise ValueError(f"PAD-Net predicts per pixel; task(s) {per_sample} are per-sample")
        clash = set(self.auxiliary) & set(self.tasks)
        if clash:
            raise ValueError(f"task(s) {sorted(clash)} are both main and auxiliary")
        width = check_width(width)
        self.in_channels = in_channels
        self.encoder_stages = encoder_stages
        self.distillation = distillation
        c = [scaled(w, width) for w in VGG16_WIDTHS[:encoder_stages]]
        self.encoder = nn.ModuleList(
            SegNetStage(in_channels if s == 0 else c[s - 1], c[s], VGG16_DEPTHS[s])
            for s in range(encoder_stages)
        )
        f = scaled(features, width)
        every = {**self.tasks, **self.auxiliary}
        self.initial = nn.ModuleDict(
            {t: nn.Sequential(ConvBNReLU(c[-1], f), ConvBNReLU(f, f)) for t in every}
        )
        self.initial_out = nn.ModuleDict(
            {t: nn.Conv2d(f, spec.channels, 1) for t, spec in every.items()}
        )
        self.distill = nn.ModuleDict(
            {t: _Distill([s for s in every if s != t], f, distillation) for t in self.tasks}
        )
        f2, f4 = scaled(features // 2, width), scaled(features // 4, width)
        self.decoders = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.ConvTranspose2d(f, f2, 4, stride=2, padding=1),
                    nn.BatchNorm2d(f2),
                    nn.ReLU(),
                    nn.ConvTranspose2d(f2, f4, 4, stride=2, padding=1),
                    nn.BatchNorm2d(f4),
                    nn.ReLU(),
                    nn.Conv2d(f4, spec.channels, 1),
                )
                for t, spec in self.tasks.items()
            }
        )
        init_weights(self)

    @property
    def all_tasks(self) -> tuple[str, ...]:
        """Main tasks then auxiliary tasks."""
        return (*self.tasks, *self.auxiliary)

    @property
    def stride(self) -> int:
        """The encoder's output stride."""
        return 2**self.encoder_stages

    def encode(self, x: Tensor) -> Tensor:
        """The shared encoder features ``(B, C, H / stride, W / stride)``."""
        check_image(x, self.in_channels, type(self).__name__)
        for stage in self.encoder:
            x = F.max_pool2d(stage(x), kernel_size=2, stride=2)
        return x

    def _decode_all(self, z: Tensor, size: tuple[int, int] | None) -> PADNetOutput:
        if size is None:
            size = (z.shape[-2] * self.stride, z.shape[-1] * self.stride)
        every = {**self.tasks, **self.auxiliary}
        feats = {t: self.initial[t](z) for t in every}
        initial = {
            t: _finish(spec, self.initial_out[t](feats[t]), size) for t, spec in every.items()
        }
        final = {
            t: _finish(spec, self.decoders[t](self.distill[t](feats[t], feats)), size)
            for t, spec in self.tasks.items()
        }
        return PADNetOutput(final, initial)

    def decode(
        self, features: Tensor, output_size: tuple[int, int] | None = None
    ) -> dict[str, Tensor]:
        """Final predictions from the encoder features, resized to ``output_size`` (default:
        ``stride`` times the feature size, the input size when it is a multiple of it)."""
        return self._decode_all(features, output_size).final

    def predict(self, x: Tensor) -> PADNetOutput:
        """Final predictions of the main tasks and initial predictions of every task."""
        return self._decode_all(self.encode(x), (x.shape[-2], x.shape[-1]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.predict(x).final

    def deep_supervision_losses(
        self,
        outputs: PADNetOutput,
        targets: Mapping[str, Tensor],
        loss_fn: Callable[[TaskSpec, Tensor, Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """One loss per task of `all_tasks`: ``L(final) + L(initial)`` for main tasks,
        ``L(initial)`` for auxiliary ones.

        Args:
            outputs: what `predict` returned.
            targets: a target per task of `all_tasks`.
            loss_fn: ``(spec, prediction, target) -> loss``; default
                `gradbalance.tasks.task_loss`.
        """
        if loss_fn is None:
            loss_fn = task_loss
        missing = [t for t in self.all_tasks if t not in targets]
        if missing:
            raise ValueError(f"targets are missing task(s) {missing}")
        every = {**self.tasks, **self.auxiliary}
        losses = {}
        for t, spec in every.items():
            loss = loss_fn(spec, outputs.initial[t], targets[t])
            if t in self.tasks:
                loss = loss + loss_fn(spec, outputs.final[t], targets[t])
            losses[t] = loss
        return losses

    def _shared_members(self) -> list[Member]:
        return [self.encoder]

    def _task_members(self, task: str) -> list[Member]:
        members: list[Member] = [self.initial[task], self.initial_out[task]]
        if task in self.tasks:
            members += [self.distill[task], self.decoders[task]]
        return members

    def _last_shared_members(self) -> list[Member]:
        # the convolution of the encoder's last Conv-BN-ReLU (not its 1-D BatchNorm tensors)
        return [cast(SegNetStage, self.encoder[-1]).last_layer()[0]]
