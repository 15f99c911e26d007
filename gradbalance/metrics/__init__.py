"""Evaluation metrics for dense scene understanding, and the Δm% multi-task score.

Each task kind has a stateful accumulator (``update(pred, target)`` per batch, ``compute()``
once per split, ``reset()``) and functional forms for a single batch, one module per kind
(``segmentation``, ``depth``, ``normal``, ``per_sample``; Δm% in ``delta``), all importable
from here. `gradbalance.tasks` chooses them by kind (its ``metric_for`` and
``MultiTaskMetrics`` are importable from here too). Accumulators aggregate over the *whole
split*: segmentation sums one confusion matrix, depth and normals weigh every
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
- **KPIs** (per batch, in ``[0, 1]``, for DTP): pixel accuracy, `depth_kpi` (δ₁) and
  `normal_kpi` (within 30°).
- **Δm%** (Maninis et al., CVPR 2019; used by the MTAN benchmark): ``100 / N Σ_i s_i (M_i −
  B_i) / B_i`` over the ``N`` metrics, ``s_i = +1`` where higher is better and ``−1``
  otherwise, ``B`` the single-task baseline; see `delta_m`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradbalance.metrics._common import Metric as Metric
from gradbalance.metrics.delta import HIGHER_IS_BETTER, delta_m
from gradbalance.metrics.depth import DEPTH_KPI_RATIO, DepthMetric, depth_errors, depth_kpi
from gradbalance.metrics.normal import (
    NORMAL_KPI_DEGREES,
    NormalMetric,
    normal_angles,
    normal_errors,
    normal_kpi,
)
from gradbalance.metrics.normal import NORMAL_THRESHOLDS as NORMAL_THRESHOLDS
from gradbalance.metrics.per_sample import ClassificationMetric, RegressionMetric
from gradbalance.metrics.segmentation import (
    SegmentationMetric,
    confusion_matrix,
    miou,
    pixel_accuracy,
)

if TYPE_CHECKING:
    from gradbalance.tasks import MultiTaskMetrics, metric_for

__all__ = [
    "DEPTH_KPI_RATIO",
    "HIGHER_IS_BETTER",
    "NORMAL_KPI_DEGREES",
    "ClassificationMetric",
    "DepthMetric",
    "MultiTaskMetrics",
    "NormalMetric",
    "RegressionMetric",
    "SegmentationMetric",
    "confusion_matrix",
    "delta_m",
    "depth_errors",
    "depth_kpi",
    "metric_for",
    "miou",
    "normal_angles",
    "normal_errors",
    "normal_kpi",
    "pixel_accuracy",
]


_MOVED_TO_TASKS = frozenset({"MultiTaskMetrics", "metric_for"})


def __getattr__(name: str) -> Any:
    # `metric_for` and `MultiTaskMetrics` choose accumulators by the task kind, so they live in
    # `gradbalance.tasks` (which owns the kinds and imports this module); they stay
    # importable from here.
    if name in _MOVED_TO_TASKS:
        from gradbalance import tasks

        value = getattr(tasks, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
