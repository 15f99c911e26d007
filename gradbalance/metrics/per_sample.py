"""Per-sample kinds: classification accuracy, regression MSE and MAE."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.metrics._common import as_labels, check_tensors

__all__ = ["ClassificationMetric", "RegressionMetric"]


class ClassificationMetric:
    """Accuracy over a split (labels ``ignore_index`` left out).

    Examples:
        >>> import torch
        >>> m = ClassificationMetric()
        >>> m.update(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> m.compute()
        {'accuracy': 0.5}
    """

    def __init__(self, ignore_index: int = -1) -> None:
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.correct = 0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of logits ``(B, C)`` (or labels ``(B,)``) and labels ``(B,)``."""
        labels = as_labels(pred, target, "ClassificationMetric")
        keep = target != self.ignore_index
        self.correct += int(((labels == target) & keep).sum())
        self.count += int(keep.sum())

    def compute(self) -> dict[str, float]:
        """``{"accuracy": ...}``."""
        return {"accuracy": self.correct / self.count if self.count else float("nan")}


class RegressionMetric:
    """Mean squared and mean absolute error over every output value of a split.

    Examples:
        >>> import torch
        >>> m = RegressionMetric()
        >>> m.update(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))
        >>> m.compute()
        {'mse': 2.5, 'mae': 1.5}
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.sq = 0.0
        self.ab = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; a ``(B,)`` target is matched to a ``(B, 1)`` prediction."""
        check_tensors("RegressionMetric", pred, target)
        if target.dim() == pred.dim() - 1 and pred.shape[-1] == 1:
            target = target.unsqueeze(-1)
        if target.shape != pred.shape:
            raise ValueError(
                f"RegressionMetric: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                "differ"
            )
        d = pred.detach().to(torch.float64) - target.to(torch.float64)
        self.sq += float((d * d).sum())
        self.ab += float(d.abs().sum())
        self.count += d.numel()

    def compute(self) -> dict[str, float]:
        """``{"mse": ..., "mae": ...}``."""
        if self.count == 0:
            return {"mse": float("nan"), "mae": float("nan")}
        return {"mse": self.sq / self.count, "mae": self.ab / self.count}
