"""The task-kind table: every kind has its loss, metric and KPI, the ones the old dispatch
(if/elif chains in losses, metrics, training, the CLI and the heads) chose."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import gradbalance as gb
from gradbalance import losses, metrics, tasks, training
from gradbalance.models import base, parse_tasks
from gradbalance.models.layers import TaskHead
from gradbalance.tasks import KIND_TABLE, KINDS, TaskSpec, lookup

# What the dispatch chains decided before the table existed.
OLD_LOSS = {
    "segmentation": losses.segmentation_loss,
    "depth": losses.depth_loss,
    "normal": losses.normal_loss,
    "classification": losses.classification_loss,
    "regression": losses.regression_loss,
}
OLD_METRIC = {
    "segmentation": metrics.SegmentationMetric,
    "depth": metrics.DepthMetric,
    "normal": metrics.NormalMetric,
    "classification": metrics.ClassificationMetric,
    "regression": metrics.RegressionMetric,
}
OLD_UNCERTAINTY = {
    k: "classification" if k in ("classification", "segmentation") else "regression"
    for k in OLD_LOSS
}
CHANNELS = {"segmentation": 3, "depth": 1, "normal": 3, "classification": 3, "regression": 2}


def _batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny prediction and target of ``kind``, with some invalid entries."""
    g = torch.Generator().manual_seed(0)
    if kind == "segmentation":
        return torch.randn(2, 3, 2, 3, generator=g), torch.tensor([[[0, 1, 2], [-1, 1, 0]]] * 2)
    if kind == "depth":
        target = torch.rand(2, 1, 2, 3, generator=g) + 0.5
        target[0, 0, 0, 0] = 0.0
        return torch.rand(2, 1, 2, 3, generator=g) + 0.5, target
    if kind == "normal":
        target = torch.randn(2, 3, 2, 3, generator=g)
        target[1, :, 1, 2] = 0.0
        return torch.randn(2, 3, 2, 3, generator=g) + target, target
    if kind == "classification":
        return torch.randn(4, 3, generator=g), torch.tensor([0, 2, -1, 1])
    return torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)


def _old_kpi(kind: str, pred: torch.Tensor, target: torch.Tensor) -> float:
    """The KPI formulas of the former `training._kpi`."""
    if kind in ("classification", "segmentation"):
        value = metrics.pixel_accuracy(pred, target)
    elif kind == "depth":
        valid = target != 0
        p, t = pred[valid].abs().clamp_min(1e-12), target[valid].abs()
        value = float((torch.maximum(p / t, t / p) < 1.25).double().mean())
    else:
        value = float((metrics.normal_angles(pred, target) < 30.0).double().mean())
    return 0.5 if math.isnan(value) else value


def test_the_table_holds_every_kind_in_order():
    assert KINDS == tuple(OLD_LOSS) == tuple(KIND_TABLE)
    assert frozenset({"segmentation", "depth", "normal"}) == tasks.DENSE_KINDS
    assert base.KINDS is KINDS and base.DENSE_KINDS is tasks.DENSE_KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_loss_the_old_dispatch_used(kind):
    row = lookup(kind)
    assert row.loss is OLD_LOSS[kind]
    assert isinstance(row.dense, bool) and callable(row.metric)
    pred, target = _batch(kind)
    want = OLD_LOSS[kind](pred, target)
    assert torch.equal(tasks.task_loss(TaskSpec(kind, CHANNELS[kind]), pred, target), want)
    assert torch.equal(tasks.task_loss(kind, pred, target), want)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_metric_the_old_dispatch_used(kind):
    spec = TaskSpec(kind, CHANNELS[kind])
    metric = tasks.metric_for(spec)
    assert type(metric) is OLD_METRIC[kind]
    pred, target = _batch(kind)
    direct = OLD_METRIC[kind](3) if kind == "segmentation" else OLD_METRIC[kind]()
    metric.update(pred, target)
    direct.update(pred, target)
    assert metric.compute() == pytest.approx(direct.compute(), nan_ok=True)


def test_metric_options_reach_the_accumulators_that_take_them():
    seg = tasks.metric_for(TaskSpec("segmentation", 4), ignore_index=255)
    assert (seg.num_classes, seg.ignore_index) == (4, 255)
    assert tasks.metric_for(TaskSpec("normal", 3), histogram_bins=9).histogram_bins == 9
    assert tasks.metric_for(TaskSpec("classification", 2), ignore_index=7).ignore_index == 7
    # depth and regression accumulators take no option; the old dispatch dropped them
    assert isinstance(tasks.metric_for(TaskSpec("depth", 1), x=1), metrics.DepthMetric)
    assert isinstance(tasks.metric_for(TaskSpec("regression", 1), x=1), metrics.RegressionMetric)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_kpi_the_old_dispatch_used(kind):
    pred, target = _batch(kind)
    if kind == "regression":
        assert lookup(kind).kpi is None
        with pytest.raises(ValueError, match="no KPI in \\[0, 1\\] is defined for 'regression'"):
            tasks.task_kpi(kind, pred, target)
        return
    want = _old_kpi(kind, pred, target)
    assert tasks.task_kpi(kind, pred, target) == want
    assert tasks.make_kpi_fn({"t": TaskSpec(kind, CHANNELS[kind])})({"t": pred}, {"t": target}) == {
        "t": want
    }


def test_kpis_read_the_final_outputs_of_a_pair():
    out = gb.models.PADNetOutput({"d": torch.ones(1, 1, 1, 2)}, {"d": torch.zeros(1, 1, 1, 2)})
    assert tasks.make_kpi_fn({"d": "depth"})(out, {"d": torch.ones(1, 1, 2)}) == {"d": 1.0}


@pytest.mark.parametrize("kind", KINDS)
def test_uncertainty_types_and_heads_follow_the_old_rules(kind):
    row = lookup(kind)
    assert row.uncertainty_type == OLD_UNCERTAINTY[kind]
    assert row.unit_vectors == (kind == "normal")
    assert TaskHead(TaskSpec(kind, CHANNELS[kind]), 4).unit_vectors == (kind == "normal")
    assert row.min_channels == (2 if kind in ("segmentation", "classification") else 1)


def test_implied_channels_and_names_come_from_the_table():
    assert parse_tasks(["depth", "normal"]) == {
        "depth": TaskSpec("depth", 1),
        "normal": TaskSpec("normal", 3),
    }
    assert parse_tasks({"semseg": 5, "cls": 2, "reg": 1, "disparity": 1}) == {
        "semseg": TaskSpec("segmentation", 5),
        "cls": TaskSpec("classification", 2),
        "reg": TaskSpec("regression", 1),
        "disparity": TaskSpec("depth", 1),
    }


@pytest.mark.parametrize("bad", ["edges", 3, None, ["depth"]])
def test_unknown_kinds_raise_value_errors(bad):
    with pytest.raises(ValueError, match="unknown task kind"):
        lookup(bad)
    with pytest.raises(ValueError, match="unknown task kind"):
        tasks.task_loss(bad, torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="no metric for task spec"):
        tasks.metric_for(bad)
    with pytest.raises(ValueError, match="task 'x': no KPI"):
        tasks.make_kpi_fn({"x": bad})


def test_the_old_import_paths_name_the_same_objects():
    assert gb.models.TaskSpec is base.TaskSpec is TaskSpec
    assert losses.task_loss is tasks.task_loss
    assert metrics.metric_for is tasks.metric_for
    assert metrics.MultiTaskMetrics is tasks.MultiTaskMetrics
    assert training.make_kpi_fn is tasks.make_kpi_fn
    assert (training.DEPTH_KPI_RATIO, training.NORMAL_KPI_DEGREES) == (1.25, 30.0)
    assert (metrics.DEPTH_KPI_RATIO, metrics.NORMAL_KPI_DEGREES) == (1.25, 30.0)
    with pytest.raises(AttributeError):
        losses.no_such_loss  # noqa: B018
    with pytest.raises(AttributeError):
        metrics.no_such_metric  # noqa: B018


def test_tasks_imports_only_losses_and_metrics():
    tree = ast.parse(Path(tasks.__file__).read_text(encoding="utf-8"))
    found = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradbalance")
    }
    found |= {
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for a in node.names
        if a.name.startswith("gradbalance")
    }
    assert found == {"gradbalance.losses", "gradbalance.metrics"}
