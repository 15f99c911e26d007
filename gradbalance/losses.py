"""Task losses for dense scene understanding and classification.

The conventions of the MTAN benchmark setup (Liu, Johns, Davison, CVPR 2019):

- segmentation: pixel-wise cross-entropy on logits, pixels labelled ``-1`` ignored;
- depth: L1 on the valid pixels, valid where the target depth is non-zero;
- surface normals: ``1 − cos(prediction, target)`` averaged over the valid pixels, valid where
  the target normal is not all zeros.

When a batch has no valid pixel at all, these losses return a zero that is still connected to
the prediction (so ``backward`` works and gives zero gradients) instead of NaN. None of them
synchronises with the device (no ``.item()`` or data-dependent branch).

Also here: the example-level focal loss used by Dynamic Task Prioritization (Guo et al.,
ECCV 2018). The loss of each task kind is chosen in `gradbalance.tasks` (its
``task_loss`` is importable from here too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from gradbalance.tasks import task_loss

__all__ = [
    "check_tensors",
    "classification_loss",
    "depth_loss",
    "focal_loss",
    "normal_loss",
    "regression_loss",
    "segmentation_loss",
    "task_loss",
]


def check_tensors(name: str, pred: Any, target: Any) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``pred`` and ``target`` are tensors (the check
    every loss and metric starts with)."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"{name}: pred and target must be tensors, got {type(pred).__name__} and "
            f"{type(target).__name__}"
        )


def _dense_target(name: str, pred: Tensor, target: Tensor) -> Tensor:
    """Give a ``(B, H, W)`` target the channel dimension of a ``(B, C, H, W)`` prediction."""
    check_tensors(name, pred, target)
    if pred.dim() != 4:
        raise ValueError(f"{name}: pred must be (B, C, H, W), got {tuple(pred.shape)}")
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if target.shape[0] != pred.shape[0] or target.shape[2:] != pred.shape[2:]:
        raise ValueError(
            f"{name}: target {tuple(target.shape)} does not match pred {tuple(pred.shape)}"
        )
    return target


def _masked_ce(pred: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy averaged over the kept entries; 0 (with a graph) when none is kept."""
    total = F.cross_entropy(pred, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp_min(1)
    return total / count.to(total.dtype)


def segmentation_loss(pred: Tensor, target: Tensor, ignore_index: int = -1) -> Tensor:
    """Pixel-wise cross-entropy, mean over the pixels whose label is not ``ignore_index``.

    Args:
        pred: logits ``(B, C, H, W)``.
        target: class indices ``(B, H, W)`` (integers; ``ignore_index`` marks unlabelled pixels).
        ignore_index: the label of ignored pixels (``-1`` as in NYUv2/CityScapes preprocessing).

    Examples:
        >>> import torch
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> round(float(segmentation_loss(logits, torch.tensor([[[0, -1]]]))), 4)  # log 2
        0.6931
    """
    check_tensors("segmentation_loss", pred, target)
    if pred.dim() != 4 or target.dim() != 3:
        raise ValueError(
            "segmentation_loss expects logits (B, C, H, W) and labels (B, H, W), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return _masked_ce(pred, target.long(), ignore_index)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over the valid pixels (``target != 0``).

    Args:
        pred: depth ``(B, 1, H, W)``.
        target: depth ``(B, 1, H, W)`` or ``(B, H, W)``, 0 where unknown.

    Examples:
        >>> import torch
        >>> pred = torch.tensor([[[[1.0, 5.0]]]])
        >>> float(depth_loss(pred, torch.tensor([[[[2.0, 0.0]]]])))  # the 0 pixel is ignored
        1.0
    """
    target = _dense_target("depth_loss", pred, target)
    valid = (target != 0).expand_as(pred).to(pred.dtype)
    return ((pred - target).abs() * valid).sum() / valid.sum().clamp_min(1.0)


def normal_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 − cos(pred, target)`` averaged over the valid pixels (target not all zeros).

    Both vectors are normalised, so ``pred`` need not be unit length.

    Args:
        pred: normals ``(B, 3, H, W)``.
        target: normals ``(B, 3, H, W)``, all zeros where unknown.
        eps: guards the normalisation of zero vectors.

    Examples:
        >>> import torch
        >>> pred = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
        >>> target = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])
        >>> float(normal_loss(pred, target))  # one valid pixel, at 90 degrees
        1.0
    """
    check_tensors("normal_loss", pred, target)
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"normal_loss expects pred and target of the same shape (B, 3, H, W), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    valid = (target != 0).any(dim=1).to(pred.dtype)
    cos = F.cosine_similarity(pred, target.to(pred.dtype), dim=1, eps=eps)
    return ((1.0 - cos) * valid).sum() / valid.sum().clamp_min(1.0)


def classification_loss(pred: Tensor, target: Tensor, ignore_index: int = -1) -> Tensor:
    """Cross-entropy on logits ``(B, C)`` and labels ``(B,)``, ignoring ``ignore_index``."""
    check_tensors("classification_loss", pred, target)
    return _masked_ce(pred, target.long(), ignore_index)


def regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error; a ``(B,)`` target is matched to a ``(B, 1)`` prediction."""
    check_tensors("regression_loss", pred, target)
    if target.dim() == pred.dim() - 1 and pred.shape[-1] == 1:
        target = target.unsqueeze(-1)
    if target.shape != pred.shape:
        raise ValueError(
            f"regression_loss: target {tuple(target.shape)} does not match pred {tuple(pred.shape)}"
        )
    return F.mse_loss(pred, target.to(pred.dtype))


def focal_loss(
    pred: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    ignore_index: int = -1,
    reduction: str = "mean",
) -> Tensor:
    """Example-level focal loss ``FL(p) = −(1 − p)^γ log p``, ``p`` the probability of the true
    class (Lin et al., ICCV 2017), as used per example by Dynamic Task Prioritization (Guo et
    al., ECCV 2018). ``γ = 0`` is the cross-entropy.

    Args:
        pred: logits with classes on dim 1: ``(B, C)`` or ``(B, C, H, W)``.
        target: labels ``(B,)`` or ``(B, H, W)``; ``ignore_index`` entries are left out.
        gamma: focusing parameter ``γ >= 0``.
        ignore_index: label of ignored entries.
        reduction: ``"mean"`` over kept entries, ``"sum"``, or ``"none"`` (per entry, 0 where
            ignored).

    Examples:
        >>> import torch
        >>> logits = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> round(float(focal_loss(logits, torch.tensor([0]), gamma=2.0)), 4)  # 0.25 * log 2
        0.1733
    """
    check_tensors("focal_loss", pred, target)
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative, got {gamma}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    target = target.long()
    keep = target != ignore_index
    log_p_all = F.log_softmax(pred, dim=1)
    safe = torch.where(keep, target, torch.zeros_like(target))
    log_p = log_p_all.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - log_p.exp()).clamp_min(0.0) ** gamma) * log_p
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp_min(1).to(loss.dtype)


def __getattr__(name: str) -> Any:
    # `task_loss` dispatches on the task kind, so it lives in `gradbalance.tasks` (which owns
    # the kinds and imports this module); it stays importable from here.
    if name == "task_loss":
        from gradbalance.tasks import task_loss

        globals()[name] = task_loss
        return task_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
