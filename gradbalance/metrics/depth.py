"""Depth: absolute and relative error over the valid pixels (target not 0)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradbalance.metrics._common import check_tensors

__all__ = ["DEPTH_KPI_RATIO", "DepthMetric", "depth_errors", "depth_kpi"]

#: The threshold of `depth_kpi`: ``max(d̂/d, d/d̂) < 1.25`` (the usual δ₁).
DEPTH_KPI_RATIO = 1.25


def _depth_parts(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    check_tensors("depth metrics", pred, target)
    if target.dim() == pred.dim() - 1:
        target = target.unsqueeze(1)
    if pred.shape != target.shape:
        raise ValueError(
            f"depth metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ"
        )
    valid = target != 0
    p = pred.detach()[valid].to(torch.float64)
    t = target[valid].to(torch.float64)
    return (p - t).abs(), t.abs()


def depth_errors(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Absolute and relative depth error of one batch over the pixels with ``target != 0``.

    Examples:
        >>> import torch
        >>> depth_errors(torch.tensor([[[[1.0, 3.0, 9.0]]]]), torch.tensor([[[[2.0, 4.0, 0.0]]]]))
        {'abs_err': 1.0, 'rel_err': 0.375}
    """
    m = DepthMetric()
    m.update(pred, target)
    return m.compute()


class DepthMetric:
    """Absolute and relative depth error, every valid pixel of the split weighted equally.

    Examples:
        >>> import torch
        >>> m = DepthMetric()
        >>> m.update(torch.full((1, 1, 1, 2), 2.0), torch.tensor([[[[1.0, 0.0]]]]))
        >>> m.update(torch.full((1, 1, 1, 3), 2.0), torch.full((1, 1, 1, 3), 4.0))
        >>> m.compute()  # abs: (1 + 2 + 2 + 2) / 4, rel: (1 + 0.5 * 3) / 4
        {'abs_err': 1.75, 'rel_err': 0.625}
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``(B, 1, H, W)`` predictions and ``(B, 1, H, W)``/``(B, H, W)`` targets."""
        err, depth = _depth_parts(pred, target)
        self.abs_sum += float(err.sum())
        self.rel_sum += float((err / depth).sum())
        self.count += err.numel()

    def compute(self) -> dict[str, float]:
        """``{"abs_err": ..., "rel_err": ...}`` (NaN before any valid pixel)."""
        if self.count == 0:
            return {"abs_err": float("nan"), "rel_err": float("nan")}
        return {"abs_err": self.abs_sum / self.count, "rel_err": self.rel_sum / self.count}


def depth_kpi(pred: Tensor, target: Tensor) -> float:
    """DTP's depth KPI: the fraction of valid pixels (``target != 0``) with
    ``max(d̂/d, d/d̂) <`` `DEPTH_KPI_RATIO`; NaN without a valid pixel.

    Examples:
        >>> import torch
        >>> depth_kpi(torch.tensor([[[[1.0, 2.0, 5.0]]]]), torch.tensor([[[1.1, 4.0, 0.0]]]))
        0.5
    """
    if target.dim() == pred.dim() - 1:
        target = target.unsqueeze(1)
    valid = target != 0
    p, t = pred[valid].abs().clamp_min(1e-12), target[valid].abs()
    ratio = torch.maximum(p / t, t / p)
    return float((ratio < DEPTH_KPI_RATIO).double().mean()) if t.numel() else math.nan
