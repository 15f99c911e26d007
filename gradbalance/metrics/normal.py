"""Surface normals: angle statistics over the valid pixels (target not all zeros)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gradbalance.metrics._common import check_tensors

__all__ = [
    "NORMAL_KPI_DEGREES",
    "NORMAL_THRESHOLDS",
    "NormalMetric",
    "normal_angles",
    "normal_errors",
    "normal_kpi",
]

#: The angles (degrees) of the ``within_*`` fractions.
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
#: The angle (degrees) under which a normal counts as right in `normal_kpi`.
NORMAL_KPI_DEGREES = 30.0


def normal_angles(pred: Tensor, target: Tensor) -> Tensor:
    """Angles in degrees between predicted and target normals at the valid pixels (1-D).

    Examples:
        >>> import torch
        >>> pred = torch.tensor([[[[1.0]], [[1.0]], [[0.0]]]])
        >>> normal_angles(pred, torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]])).round(decimals=6)
        tensor([45.], dtype=torch.float64)
    """
    check_tensors("normal metrics", pred, target)
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(
            f"normal metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} must "
            "have the same shape (B, 3, H, W)"
        )
    p = pred.detach().to(torch.float64)
    t = target.to(torch.float64)
    valid = (t != 0).any(dim=1)
    cos = F.cosine_similarity(p, t, dim=1, eps=1e-12)[valid]
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def _median(x: Tensor) -> float:
    n = x.numel()
    lo = torch.kthvalue(x, (n + 1) // 2).values
    hi = torch.kthvalue(x, n // 2 + 1).values
    return float((lo + hi) / 2)


def _angle_summary(angles: Tensor) -> dict[str, float]:
    if angles.numel() == 0:
        return {
            k: float("nan") for k in ("mean", "median", "within_11.25", "within_22.5", "within_30")
        }
    out = {"mean": float(angles.mean()), "median": _median(angles)}
    for th in NORMAL_THRESHOLDS:
        out[f"within_{th:g}"] = float((angles < th).double().mean())
    return out


def normal_errors(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean and median angle error (degrees) and the fractions within 11.25°, 22.5°, 30°.

    Examples:
        >>> import torch
        >>> t = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
        >>> p = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])
        >>> {k: round(v, 6) for k, v in normal_errors(p, t).items()}  # angles 0 and 90
        {'mean': 45.0, 'median': 45.0, 'within_11.25': 0.5, 'within_22.5': 0.5, 'within_30': 0.5}
    """
    return _angle_summary(normal_angles(pred, target))


class NormalMetric:
    """Surface-normal angle statistics over every valid pixel of the split.

    By default the angles are kept (float32, on the CPU) so the median is exact; with
    ``histogram_bins`` only a histogram over ``[0°, 180°]`` is kept (constant memory) and the
    median is interpolated linearly within the bin where the cumulative count reaches half:
    it lies within one bin (``180 / bins`` degrees) of the middle values. Mean and threshold
    fractions are exact either way.

    Args:
        histogram_bins: ``None`` (exact median) or the number of histogram bins.

    Examples:
        >>> import torch
        >>> m = NormalMetric()
        >>> t = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
        >>> m.update(torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]]), t)
        >>> round(m.compute()["mean"], 6)
        45.0
    """

    def __init__(self, histogram_bins: int | None = None) -> None:
        if histogram_bins is not None and histogram_bins < 1:
            raise ValueError(f"histogram_bins must be positive, got {histogram_bins}")
        self.histogram_bins = histogram_bins
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._angles: list[Tensor] = []
        self._sum = 0.0
        self._count = 0
        self._below = [0] * len(NORMAL_THRESHOLDS)
        self._hist = (
            None
            if self.histogram_bins is None
            else torch.zeros(self.histogram_bins, dtype=torch.float64)
        )

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of ``(B, 3, H, W)`` predictions and targets."""
        a = normal_angles(pred, target).cpu()
        self._sum += float(a.sum())
        self._count += a.numel()
        for i, th in enumerate(NORMAL_THRESHOLDS):
            self._below[i] += int((a < th).sum())
        if self._hist is None:
            self._angles.append(a.to(torch.float32))
        else:
            self._hist += torch.histc(a, bins=self.histogram_bins or 1, min=0.0, max=180.0)

    def _hist_median(self) -> float:
        assert self._hist is not None
        cum = self._hist.cumsum(0)
        half = cum[-1] / 2
        i = int(torch.searchsorted(cum, half))
        before = float(cum[i - 1]) if i > 0 else 0.0
        width = 180.0 / self._hist.numel()
        inside = float(self._hist[i])
        frac = 0.0 if inside == 0 else (float(half) - before) / inside
        return (i + frac) * width

    def compute(self) -> dict[str, float]:
        """``{"mean", "median", "within_11.25", "within_22.5", "within_30"}`` (NaN when empty)."""
        if self._count == 0:
            return _angle_summary(torch.zeros(0))
        out = {"mean": self._sum / self._count}
        if self._hist is None:
            out["median"] = _median(torch.cat(self._angles).to(torch.float64))
        else:
            out["median"] = self._hist_median()
        for th, n in zip(NORMAL_THRESHOLDS, self._below):
            out[f"within_{th:g}"] = n / self._count
        return out


def normal_kpi(pred: Tensor, target: Tensor) -> float:
    """DTP's normal KPI: the fraction of valid pixels within `NORMAL_KPI_DEGREES` of the
    target; NaN without a valid pixel.

    Examples:
        >>> import torch
        >>> t = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
        >>> normal_kpi(torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]]), t)
        0.5
    """
    angles = normal_angles(pred, target)
    return float((angles < NORMAL_KPI_DEGREES).double().mean()) if angles.numel() else math.nan
