"""Segmentation: the confusion matrix of a split, mIoU and pixel accuracy."""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance.metrics._common import as_labels

__all__ = ["SegmentationMetric", "confusion_matrix", "miou", "pixel_accuracy"]


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -1
) -> Tensor:
    """The ``(C, C)`` confusion matrix (rows: target class, columns: predicted class).

    Args:
        pred: logits ``(B, C, H, W)`` or labels ``(B, H, W)``.
        target: labels ``(B, H, W)``; ``ignore_index`` pixels are left out.
        num_classes: ``C``.
        ignore_index: label of unlabelled pixels.

    Examples:
        >>> import torch
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
        tensor([[1, 1],
                [0, 1]])
    """
    labels = as_labels(pred, target, "confusion_matrix").reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    labels, target = labels[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target labels must be in [0, {num_classes}) or {ignore_index}, got values in "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"predicted labels must be in [0, {num_classes})")
    flat = target * num_classes + labels
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _miou(cm: Tensor) -> float:
    cm = cm.to(torch.float64)
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    if not bool(present.any()):
        return float("nan")
    return float((tp[present] / union[present]).mean())


def _pixel_acc(cm: Tensor) -> float:
    total = cm.sum()
    return float("nan") if int(total) == 0 else float(cm.diag().sum().double() / total.double())


def miou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -1) -> float:
    """Mean IoU of one batch (see the module docstring for the definition).

    Examples:
        >>> import torch
        >>> # class 0: tp 1, union 2; class 1: tp 1, union 2; class 2 absent: excluded
        >>> miou(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, -1]), 3)
        0.5
    """
    return _miou(confusion_matrix(pred, target, num_classes, ignore_index))


def pixel_accuracy(pred: Tensor, target: Tensor, ignore_index: int = -1) -> float:
    """Fraction of labelled pixels predicted right.

    Examples:
        >>> import torch
        >>> pixel_accuracy(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, -1]))
        0.6666666666666666
    """
    labels = as_labels(pred, target, "pixel_accuracy")
    keep = target != ignore_index
    n = int(keep.sum())
    return float("nan") if n == 0 else int(((labels == target) & keep).sum()) / n


class SegmentationMetric:
    """mIoU and pixel accuracy accumulated over a split through one confusion matrix.

    Args:
        num_classes: number of classes.
        ignore_index: label of unlabelled pixels.

    Examples:
        >>> import torch
        >>> m = SegmentationMetric(2)
        >>> m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
        >>> m.update(torch.tensor([[1, 1]]), torch.tensor([[0, -1]]))
        >>> m.compute()  # class 0: 1 / 2, class 1: 1 / 2
        {'miou': 0.5, 'pixel_acc': 0.6666666666666666}
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: logits ``(B, C, H, W)`` or labels ``(B, H, W)``, and labels."""
        cm = confusion_matrix(pred.detach(), target, self.num_classes, self.ignore_index)
        self.confusion += cm.cpu()

    def compute(self) -> dict[str, float]:
        """``{"miou": ..., "pixel_acc": ...}`` (NaN before any labelled pixel)."""
        return {"miou": _miou(self.confusion), "pixel_acc": _pixel_acc(self.confusion)}
