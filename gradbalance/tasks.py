"""Task kinds: what a task predicts, and per kind its loss, metric and KPI (one table).

A task is a `TaskSpec`: its *kind* and its number of output channels. Everything that
depends on the kind is one row of `KIND_TABLE` (a `TaskKind`): whether the task is
predicted per pixel, its implied or minimal channel count, the names it is inferred from,
whether its head L2-normalises the output, its loss (`gradbalance.losses`), its metric
accumulator (`gradbalance.metrics`), its per-batch KPI for DTP and its task type for
uncertainty weighting. Code that needs one of these asks `lookup` (one call) instead of
testing the kind, so a new kind is one new row.

The kind-level helpers live here as well: `task_loss`, `metric_for`, `MultiTaskMetrics` and
`make_kpi_fn`. ``gradbalance.losses.task_loss``, ``gradbalance.metrics.metric_for``,
``gradbalance.metrics.MultiTaskMetrics`` and ``gradbalance.training.make_kpi_fn`` remain
importable under their old names.

This module sits above `gradbalance.losses` and `gradbalance.metrics` (whose functions know
nothing of kinds) and below the models, the training loop and the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import Tensor

from gradbalance.losses import (
    classification_loss,
    depth_loss,
    normal_loss,
    regression_loss,
    segmentation_loss,
)
from gradbalance.metrics import (
    HIGHER_IS_BETTER,
    ClassificationMetric,
    DepthMetric,
    Metric,
    NormalMetric,
    RegressionMetric,
    SegmentationMetric,
    depth_kpi,
    normal_kpi,
    pixel_accuracy,
)

__all__ = [
    "DENSE_KINDS",
    "KINDS",
    "KIND_TABLE",
    "MultiTaskMetrics",
    "TaskKind",
    "TaskSpec",
    "lookup",
    "make_kpi_fn",
    "metric_for",
    "task_kpi",
    "task_loss",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
KpiFn = Callable[[Tensor, Tensor], float]
BatchKpiFn = Callable[[Any, Mapping[str, Tensor]], dict[str, float]]


# ---------------------------------------------------------------------------- metrics
def _segmentation_metric(spec: TaskSpec, **kwargs: Any) -> Metric:
    return SegmentationMetric(spec.channels, **kwargs)


def _depth_metric(spec: TaskSpec, **kwargs: Any) -> Metric:
    return DepthMetric()


def _normal_metric(spec: TaskSpec, **kwargs: Any) -> Metric:
    return NormalMetric(**kwargs)


def _classification_metric(spec: TaskSpec, **kwargs: Any) -> Metric:
    return ClassificationMetric(**kwargs)


def _regression_metric(spec: TaskSpec, **kwargs: Any) -> Metric:
    return RegressionMetric()


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class TaskKind:
    """Everything that depends on a task's kind: one row of `KIND_TABLE`.

    Attributes:
        dense: predicted per pixel, ``(B, C, H, W)``; otherwise per sample, ``(B, C)``.
        loss: ``loss(pred, target) -> Tensor`` (see `gradbalance.losses`).
        metric: ``metric(spec, **kwargs)`` -> a fresh accumulator (see `gradbalance.metrics`).
        kpi: ``kpi(pred, target) -> float`` in ``[0, 1]`` (NaN when the batch has no valid
            entry) for DTP, or ``None`` where no KPI is defined.
        uncertainty_type: the task type uncertainty weighting uses for it,
            ``"classification"`` or ``"regression"``.
        channels: the implied number of output channels, or ``None`` when it must be given.
        min_channels: the fewest output channels allowed (2 for class logits).
        unit_vectors: whether the head L2-normalises its output over channels.
        names: task names from which this kind is inferred (besides the kind itself).
    """

    dense: bool
    loss: LossFn
    metric: Callable[..., Metric]
    kpi: KpiFn | None
    uncertainty_type: str
    channels: int | None = None
    min_channels: int = 1
    unit_vectors: bool = False
    names: tuple[str, ...] = ()


#: Every task kind, in the order of `KINDS`.
KIND_TABLE: Mapping[str, TaskKind] = MappingProxyType(
    {
        "segmentation": TaskKind(
            dense=True,
            loss=segmentation_loss,
            metric=_segmentation_metric,
            kpi=pixel_accuracy,
            uncertainty_type="classification",
            min_channels=2,
            names=("seg", "semantic", "semseg", "sem_seg", "semantic_segmentation"),
        ),
        "depth": TaskKind(
            dense=True,
            loss=depth_loss,
            metric=_depth_metric,
            kpi=depth_kpi,
            uncertainty_type="regression",
            channels=1,
            names=("disparity", "inverse_depth"),
        ),
        "normal": TaskKind(
            dense=True,
            loss=normal_loss,
            metric=_normal_metric,
            kpi=normal_kpi,
            uncertainty_type="regression",
            channels=3,
            unit_vectors=True,
            names=("normals", "surface_normal", "surface_normals"),
        ),
        "classification": TaskKind(
            dense=False,
            loss=classification_loss,
            metric=_classification_metric,
            kpi=pixel_accuracy,
            uncertainty_type="classification",
            min_channels=2,
            names=("class", "cls"),
        ),
        "regression": TaskKind(
            dense=False,
            loss=regression_loss,
            metric=_regression_metric,
            kpi=None,
            uncertainty_type="regression",
            names=("reg",),
        ),
    }
)

#: Every task kind a model head, loss and metric understands.
KINDS = tuple(KIND_TABLE)
#: The kinds predicted per pixel, shape ``(B, C, H, W)``; the others are per image ``(B, C)``.
DENSE_KINDS = frozenset(k for k, row in KIND_TABLE.items() if row.dense)


def lookup(spec: Any) -> TaskKind:
    """The `TaskKind` row of a `TaskSpec` or a kind string.

    Raises:
        ValueError: the kind is not one of `KINDS`.

    Examples:
        >>> lookup("normal").unit_vectors, lookup(TaskSpec("depth", 1)).channels
        (True, 1)
    """
    kind = getattr(spec, "kind", spec)
    row = KIND_TABLE.get(kind) if isinstance(kind, str) else None
    if row is None:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(KIND_TABLE)}")
    return row


@dataclass(frozen=True)
class TaskSpec:
    """What a task predicts.

    Attributes:
        kind: one of `KINDS`: ``"segmentation"`` (per-pixel class logits),
            ``"depth"`` (per-pixel value), ``"normal"`` (per-pixel unit vector, L2-normalised
            over channels), ``"classification"`` (per-sample class logits) or ``"regression"``
            (per-sample values).
        channels: output channels: the number of classes for segmentation and classification
            (at least 2), 1 for depth, 3 for surface normals.

    Examples:
        >>> TaskSpec("segmentation", 13)
        TaskSpec(kind='segmentation', channels=13)
        >>> TaskSpec("normal", 3).dense
        True
    """

    kind: str
    channels: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int):
            raise TypeError(f"channels must be an int, got {type(self.channels).__name__}")
        if self.channels < 1:
            raise ValueError(f"channels must be at least 1, got {self.channels}")
        least = KIND_TABLE[self.kind].min_channels
        if self.channels < least:
            raise ValueError(
                f"a {self.kind} task needs at least {least} classes, got {self.channels}; "
                "write a binary task as 2 classes"
            )

    @property
    def dense(self) -> bool:
        """Whether the task is predicted per pixel."""
        return self.kind in DENSE_KINDS


# ---------------------------------------------------------------------------- helpers
def task_loss(spec: Any, pred: Tensor, target: Tensor) -> Tensor:
    """The loss of a task chosen by its kind (the ``loss`` of its `KIND_TABLE` row).

    ``segmentation`` -> `gradbalance.losses.segmentation_loss`, ``depth`` -> ``depth_loss``,
    ``normal`` -> ``normal_loss``, ``classification`` -> ``classification_loss``,
    ``regression`` -> ``regression_loss``.

    Args:
        spec: a `TaskSpec` or a kind string.
        pred: the model output for the task.
        target: its target.

    Raises:
        ValueError: unknown kind.

    Examples:
        >>> import torch
        >>> float(task_loss("depth", torch.ones(1, 1, 2, 2), torch.full((1, 2, 2), 3.0)))
        2.0
    """
    return lookup(spec).loss(pred, target)


def metric_for(spec: Any, **kwargs: Any) -> Metric:
    """A fresh accumulator for a task: ``spec`` is a `TaskSpec`.

    ``kwargs`` go to the accumulators that take options (segmentation, normal,
    classification); depth and regression ignore them.

    Raises:
        ValueError: ``spec`` is not a `TaskSpec` (a bare kind string is refused).

    Examples:
        >>> type(metric_for(TaskSpec("segmentation", 13))).__name__
        'SegmentationMetric'
    """
    kind = getattr(spec, "kind", None)
    row = KIND_TABLE.get(kind) if isinstance(kind, str) else None
    if row is None:
        raise ValueError(f"no metric for task spec {spec!r}; expected a TaskSpec")
    return row.metric(spec, **kwargs)


class MultiTaskMetrics:
    """One accumulator per task, reported as a flat ``{"task/metric": value}`` mapping.

    Args:
        tasks: ``{task: TaskSpec}``, e.g. a model's
            `gradbalance.models.MultiTaskModel.tasks`.

    Examples:
        >>> import torch
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
        """The direction of each key of `compute`, for `gradbalance.metrics.delta_m`."""
        return {k: HIGHER_IS_BETTER[k.rsplit("/", 1)[-1]] for k in self.compute()}


def _kpi_of(spec: Any, task: str | None = None) -> KpiFn:
    kind = getattr(spec, "kind", spec)
    row = KIND_TABLE.get(kind) if isinstance(kind, str) else None
    if row is None or row.kpi is None:
        where = "" if task is None else f"task {task!r}: "
        raise ValueError(
            f"{where}no KPI in [0, 1] is defined for {kind!r} tasks; pass your own "
            "kpi_fn(outputs, targets) -> {task: value in [0, 1]}"
        )
    return row.kpi


def _neutral(value: float) -> float:
    # A batch without any valid label or pixel says nothing: report a neutral 0.5.
    return 0.5 if math.isnan(value) else value


def task_kpi(spec: Any, pred: Tensor, target: Tensor) -> float:
    """The KPI in ``[0, 1]`` of one task on one batch (0.5 when it has no valid entry).

    Raises:
        ValueError: the kind has no KPI (regression) or is unknown.

    Examples:
        >>> import torch
        >>> task_kpi("classification", torch.tensor([[2.0, 1.0]]), torch.tensor([0]))
        1.0
    """
    return _neutral(_kpi_of(spec)(pred.detach(), target))


def make_kpi_fn(tasks: Mapping[str, Any]) -> BatchKpiFn:
    """Per-batch KPIs in ``[0, 1]`` for DTP, chosen by each task's kind.

    * classification: accuracy; segmentation: pixel accuracy (label ``-1`` ignored);
    * depth: the fraction of valid pixels with ``max(d̂/d, d/d̂) < 1.25`` (the usual δ₁);
    * normal: the fraction of valid pixels within 30° of the target.

    A batch without any valid pixel reports 0.5. Regression tasks have no KPI: write your own.

    Args:
        tasks: ``{name: TaskSpec}`` (a model's ``tasks``) or ``{name: kind}``.

    Returns:
        ``kpi_fn(outputs, targets) -> {task: float}``; for models whose outputs are a
        ``(final, initial)`` pair (PAD-Net's ``predict``) the final outputs are scored.

    Raises:
        ValueError: a task's kind has no KPI.

    Examples:
        >>> import torch
        >>> kpi = make_kpi_fn({"digit": "classification"})
        >>> kpi({"digit": torch.tensor([[2.0, 1.0], [0.0, 1.0]])}, {"digit": torch.tensor([0, 0])})
        {'digit': 0.5}
    """
    kpis = {t: _kpi_of(spec, t) for t, spec in tasks.items()}

    def kpi_fn(outputs: Any, targets: Mapping[str, Tensor]) -> dict[str, float]:
        final = getattr(outputs, "final", outputs)
        return {t: _neutral(fn(final[t].detach(), targets[t])) for t, fn in kpis.items()}

    return kpi_fn
