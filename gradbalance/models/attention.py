"""MTAN's task attention, on any backbone given as a sequence of stages.

Reference:
    Liu, Johns, Davison. *End-to-End Multi-Task Learning with Attention.* CVPR 2019.

`AttentionModule` is the task-specific mask ``h(g(·))``; `MTAN` adds one per task and stage to a
shared staged backbone (see `gradbalance.models.mtan` for the attention equations, and
`SegNetMTAN` there for the paper's SegNet network). `gradbalance.models.resnet.resnet_mtan` is
the wrapper's worked example.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from gradbalance.models.base import (
    Member,
    MultiTaskModel,
    TasksLike,
    check_image,
    init_weights,
    parse_tasks,
)
from gradbalance.models.layers import ConvBNReLU, TaskHead, resize

__all__ = ["MTAN", "AttentionModule"]


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
