"""Evaluation metrics for dense scene understanding, and the Δm% multi-task score.

Each task kind has a stateful accumulator (``update(pred, target)`` per batch, ``compute()``
once per split, ``reset()``) and functional forms for a single batch. Accumulators aggregate
over the *whole split*: segmentation sums one confusion matrix, depth and normals weigh every
valid pixel equally, rather than averaging per-batch scores (which would weigh small batches
and images with few valid pixels more).

Definitions (``valid`` pixels as in `gradbalance.losses`):

- **mIoU**: from the confusion matrix ``N`` accumulated over the split (rows: target, columns:
  prediction; pixels labelled ``ignore_index`` left out), ``IoU_c = N_cc / (Σ_j N_cj + Σ_i N_ic
  − N_cc)``, averaged over the classes with a non-empty union, i.e. classes absent from both
  the predictions and the targets of the whole split are excluded.
- **pixel accuracy**: ``trace(N) / ΣN``, the fraction of labelled pixels predicted right.
- **depth**: absolute error ``mean |d̂ − d|`` and relative error ``mean |d̂ − d| / |d|`` over the
  pixels with ``d ≠ 0``.
- **normals**: the angle ``arccos(cos(n̂, n))`` in degrees over pixels whose target is not all
  zeros: its mean, its median, and the fractions below 11.25°, 22.5° and 30°.
- **Δm%** (Maninis et al., CVPR 2019; used by the MTAN benchmark): ``100 / N Σ_i s_i (M_i −
  B_i) / B_i`` over the ``N`` metrics, ``s_i = +1`` where higher is better and ``−1``
  otherwise, ``B`` the single-task baseline; see `delta_m`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HIGHER_IS_BETTER",
    "ClassificationMetric",
    "DepthMetric",
    "MultiTaskMetrics",
    "NormalMetric",
    "RegressionMetric",
    "SegmentationMetric",
    "confusion_matrix",
    "delta_m",
    "depth_errors",
    "metric_for",
    "miou",
    "normal_angles",
    "normal_errors",
    "pixel_accuracy",
]

#: Whether a higher value of each metric name is better (the sign in `delta_m`).
HIGHER_IS_BETTER: Mapping[str, bool] = {
    "miou": True,
    "pixel_acc": True,
    "abs_err": False,
    "rel_err": False,
    "mean": False,
    "median": False,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
    "accuracy": True,
    "mse": False,
    "mae": False,
}

NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


def _tensors(name: str, pred: Any, target: Any) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"{name}: pred and target must be tensors, got {type(pred).__name__} and "
            f"{type(target).__name__}"
        )


def _labels(pred: Tensor, target: Tensor, name: str) -> Tensor:
    """Class labels from logits ``(B, C, ...)`` (argmax over dim 1) or labels like ``target``."""
    _tensors(name, pred, target)
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred {tuple(pred.shape)} is neither logits (B, C, ...) nor labels shaped "
            f"like target {tuple(target.shape)}"
        )
    return pred


# ---------------------------------------------------------------------------- segmentation
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
    labels = _labels(pred, target, "confusion_matrix").reshape(-1).long()
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
    labels = _labels(pred, target, "pixel_accuracy")
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


# ---------------------------------------------------------------------------- depth
def _depth_parts(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    _tensors("depth metrics", pred, target)
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


# ---------------------------------------------------------------------------- normals
def normal_angles(pred: Tensor, target: Tensor) -> Tensor:
    """Angles in degrees between predicted and target normals at the valid pixels (1-D).

    Examples:
        >>> import torch
        >>> pred = torch.tensor([[[[1.0]], [[1.0]], [[0.0]]]])
        >>> normal_angles(pred, torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]])).round(decimals=6)
        tensor([45.], dtype=torch.float64)
    """
    _tensors("normal metrics", pred, target)
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


# ---------------------------------------------------------------------------- per sample
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
        labels = _labels(pred, target, "ClassificationMetric")
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
        _tensors("RegressionMetric", pred, target)
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


Metric = Any


def metric_for(spec: Any, **kwargs: Any) -> Metric:
    """A fresh accumulator for a task: ``spec`` is a `gradbalance.models.TaskSpec`.

    Examples:
        >>> from gradbalance.models import TaskSpec
        >>> type(metric_for(TaskSpec("segmentation", 13))).__name__
        'SegmentationMetric'
    """
    kind = getattr(spec, "kind", None)
    if kind == "segmentation":
        return SegmentationMetric(spec.channels, **kwargs)
    if kind == "depth":
        return DepthMetric()
    if kind == "normal":
        return NormalMetric(**kwargs)
    if kind == "classification":
        return ClassificationMetric(**kwargs)
    if kind == "regression":
        return RegressionMetric()
    raise ValueError(f"no metric for task spec {spec!r}; expected a TaskSpec")


class MultiTaskMetrics:
    """One accumulator per task, reported as a flat ``{"task/metric": value}`` mapping.

    Args:
        tasks: ``{task: TaskSpec}``, e.g. a model's
            `gradbalance.models.MultiTaskModel.tasks`.

    Examples:
        >>> import torch
        >>> from gradbalance.models import TaskSpec
        >>> m = MultiTaskMetrics({"depth": TaskSpec("depth", 1)})
        >>> m.update({"depth": torch.ones(1, 1, 2, 2)}, {"depth": torch.full((1, 1, 2, 2), 2.0)})
        >>> m.compute()
        {'depth/abs_err': 1.0, 'depth/rel_err': 0.5}
        >>> m.higher_is_better()
        {'depth/abs_err': False, 'depth/rel_err': False}
    """

    def __init__(self, tasks: Mapping[str, Any]) -> None:
        self.metrics = {t: metric_for(spec) for t, spec in tasks.items()}

    def reset(self) -> None:
        """Reset every task's accumulator."""
        for m in self.metrics.values():
            m.reset()

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        """Add a batch: the model's outputs and the targets, by task."""
        missing = [t for t in self.metrics if t not in outputs or t not in targets]
        if missing:
            raise ValueError(f"outputs or targets are missing task(s) {missing}")
        for t, m in self.metrics.items():
            m.update(outputs[t], targets[t])

    def compute(self) -> dict[str, float]:
        """Every task's metrics as ``{"task/metric": value}``."""
        return {f"{t}/{k}": v for t, m in self.metrics.items() for k, v in m.compute().items()}

    def higher_is_better(self) -> dict[str, bool]:
        """The direction of each key of `compute`, for `delta_m`."""
        return {k: HIGHER_IS_BETTER[k.rsplit("/", 1)[-1]] for k in self.compute()}


# ---------------------------------------------------------------------------- Δm
def _flatten(values: Mapping[str, Any], what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                out[f"{k}/{k2}"] = float(v2)
        else:
            out[str(k)] = float(v)
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def delta_m(
    results: Mapping[str, Any],
    baselines: Mapping[str, Any],
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
    """Δm%: the mean over metrics of the signed relative change against the baselines.

    ``Δm = 100 / N · Σ_i s_i (M_i − B_i) / B_i`` with ``s_i = +1`` when a higher value of
    metric ``i`` is better and ``−1`` otherwise (Maninis, Radosavovic, Kokkinos, CVPR 2019,
    Eq. 4). Positive is better than the baselines.

    Args:
        results: the multi-task model's metrics, flat (``{"segmentation/miou": 0.2, ...}``) or
            nested by task (``{"segmentation": {"miou": 0.2}}``).
        baselines: the single-task baselines' metrics, with every key of ``results``.
        higher_is_better: the direction of each key of ``results``; by default looked up by
            the metric name after the last ``/`` in `HIGHER_IS_BETTER`.

    Returns:
        Δm in percent.

    Raises:
        ValueError: a metric has no baseline, a zero or non-finite baseline, or no known
            direction.

    Examples:
        >>> # mIoU +10 % relative, abs. error 20 % worse -> (10 - 20) / 2
        >>> round(delta_m({"miou": 0.22, "abs_err": 0.6}, {"miou": 0.2, "abs_err": 0.5}), 6)
        -5.0
    """
    res = _flatten(results, "results")
    base = _flatten(baselines, "baselines")
    hib = None if higher_is_better is None else _flatten_bool(higher_is_better)
    total = 0.0
    for key, m in res.items():
        if key not in base:
            raise ValueError(f"no baseline for metric {key!r}; baselines has {sorted(base)}")
        b = base[key]
        if b == 0 or not math.isfinite(b) or not math.isfinite(m):
            raise ValueError(
                f"metric {key!r}: need finite values and a non-zero baseline, "
                f"got result {m} and baseline {b}"
            )
        if hib is not None:
            if key not in hib:
                raise ValueError(f"higher_is_better has no entry for metric {key!r}")
            up = hib[key]
        else:
            name = key.rsplit("/", 1)[-1]
            if name not in HIGHER_IS_BETTER:
                raise ValueError(
                    f"unknown direction of metric {key!r}; pass higher_is_better="
                    f"{{{key!r}: True/False}} (known names: {sorted(HIGHER_IS_BETTER)})"
                )
            up = HIGHER_IS_BETTER[name]
        total += (1.0 if up else -1.0) * (m - b) / b
    return 100.0 * total / len(res)


def _flatten_bool(values: Mapping[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                out[f"{k}/{k2}"] = bool(v2)
        else:
            out[str(k)] = bool(v)
    return out
