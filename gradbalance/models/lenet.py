"""MultiLeNet: the MultiMNIST network of the MGDA paper.

Reference:
    Sener, Koltun. *Multi-Task Learning as Multi-Objective Optimization.* NeurIPS 2018
    (MultiMNIST experiments; architecture as in the authors' released code).

Shared LeNet trunk on ``28×28`` single-channel images:

```text
Conv5×5(1 -> 10) -> MaxPool2 -> ReLU -> Conv5×5(10 -> 20) -> Dropout2d -> MaxPool2 -> ReLU
-> flatten (320) -> Linear(320 -> 50) -> ReLU
```

and one head per task (``left`` and ``right`` digit):

```text
Linear(50 -> 50) -> ReLU -> Dropout -> Linear(50 -> 10)          (logits)
```

Deviation: the released code draws its dropout masks by hand without rescaling by
``1 / (1 - p)``; here the standard (inverted) `torch.nn.Dropout2d` and
`torch.nn.Dropout` are used, which give the same network up to a scale of the
training-time activations. ``dropout=0`` removes both.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance.models.base import (
    Member,
    MultiTaskModel,
    TasksLike,
    check_image,
    check_width,
    parse_tasks,
    scaled,
)

__all__ = ["MultiLeNet"]


class MultiLeNet(MultiTaskModel):
    """Shared LeNet trunk and per-task fully connected heads, for MultiMNIST.

    The trunk output (``(B, 50)``) is the hard-shared representation: ``encode`` returns it and
    ``decode`` applies the heads (MGDA-UB).

    Args:
        tasks: task names or specs; default ``("left", "right")``, each a ``num_classes``-way
            classification.
        num_classes: classes of tasks given by name only.
        width: channel and feature multiplier (10, 20, 50 units at ``width=1``).
        dropout: dropout probability of the trunk (channel-wise) and heads; 0.5 as in the
            reference code.
        in_channels: input channels.
        image_size: input height and width (28 for MultiMNIST).

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = gb.models.MultiLeNet().eval()
        >>> x = torch.randn(4, 1, 28, 28)
        >>> z = model.encode(x)
        >>> tuple(z.shape), {t: tuple(v.shape) for t, v in model.decode(z).items()}
        ((4, 50), {'left': (4, 10), 'right': (4, 10)})
    """

    has_shared_features = True

    def __init__(
        self,
        tasks: TasksLike = ("left", "right"),
        *,
        num_classes: int = 10,
        width: float = 1.0,
        dropout: float = 0.5,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__(
            parse_tasks(
                tasks,
                default=("left", "right"),
                default_kind="classification",
                default_channels=num_classes,
            )
        )
        dense = [t for t, s in self.tasks.items() if s.dense]
        if dense:
            raise ValueError(f"MultiLeNet predicts per image; task(s) {dense} are per-pixel")
        width = check_width(width)
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        c1, c2, hidden = scaled(10, width), scaled(20, width), scaled(50, width)
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.drop2d = nn.Dropout2d(dropout)
        self.fc = nn.Linear(c2 * side * side, hidden)
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Linear(hidden, hidden),
                    nn.ReLU(),
                    nn.Dropout(dropout),
                    nn.Linear(hidden, spec.channels),
                )
                for t, spec in self.tasks.items()
            }
        )

    def encode(self, x: Tensor) -> Tensor:
        """The trunk output, ``(B, 50 * width)``."""
        check_image(x, self.in_channels, type(self).__name__)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.drop2d(self.conv2(x)), 2))
        return F.relu(self.fc(x.flatten(1)))

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        """Each task's logits from the trunk output."""
        return {t: self.heads[t](features) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def _shared_members(self) -> list[Member]:
        return [self.conv1, self.conv2, self.fc]

    def _task_members(self, task: str) -> list[Member]:
        return [self.heads[task]]

    def _last_shared_members(self) -> list[Member]:
        return [self.fc]
