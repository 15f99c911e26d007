"""Metrics against hand-computed values, split-level accumulation, and Δm%."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import metrics
from gradbalance.models import NYUV2_TASKS
from gradbalance.tasks import TaskSpec


# ---------------------------------------------------------------- segmentation
def test_confusion_matrix_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1, 2, -1]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = metrics.confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 0 / 1;
    # class 3 absent from targets and predictions: excluded
    assert metrics.miou(pred, target, 4) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert metrics.pixel_accuracy(pred, target) == pytest.approx(3 / 5)


def test_logits_are_argmaxed():
    logits = torch.tensor([[[[2.0, 0.0]], [[1.0, 3.0]]]])  # labels 0, 1
    target = torch.tensor([[[0, 0]]])
    assert metrics.confusion_matrix(logits, target, 2).tolist() == [[1, 1], [0, 0]]


def test_miou_is_accumulated_over_the_split_not_averaged_per_batch():
    m = metrics.SegmentationMetric(2)
    # batch 1: perfect on class 0 only; batch 2: class 1 mostly wrong
    m.update(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]))
    m.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))
    # split confusion [[2, 0], [2, 2]]: IoU0 = 2 / 4, IoU1 = 2 / 4
    assert m.confusion.tolist() == [[2, 0], [2, 2]]
    out = m.compute()
    assert out["miou"] == pytest.approx(0.5)
    assert out["pixel_acc"] == pytest.approx(4 / 6)
    per_batch = (
        metrics.miou(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), 2)
        + metrics.miou(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 1, 1, 1]]), 2)
    ) / 2
    assert per_batch != pytest.approx(out["miou"])  # (1 + 0.25) / 2 = 0.625
    m.reset()
    assert math.isnan(m.compute()["miou"]) and math.isnan(m.compute()["pixel_acc"])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6))
def test_split_confusion_equals_sum_of_batches(seed, classes):
    g = torch.Generator().manual_seed(seed)
    m = metrics.SegmentationMetric(classes)
    preds, targets = [], []
    for _ in range(3):
        p = torch.randint(0, classes, (2, 3, 4), generator=g)
        t = torch.randint(-1, classes, (2, 3, 4), generator=g)
        m.update(p, t)
        preds.append(p)
        targets.append(t)
    whole = metrics.confusion_matrix(torch.cat(preds), torch.cat(targets), classes)
    assert torch.equal(m.confusion, whole)
    # reference mIoU with numpy
    cm = whole.numpy().astype(float)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    ref = float(np.mean(tp[union > 0] / union[union > 0])) if (union > 0).any() else math.nan
    got = m.compute()["miou"]
    assert (math.isnan(ref) and math.isnan(got)) or got == pytest.approx(ref)


def test_segmentation_label_validation():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="neither logits"):
        metrics.confusion_matrix(torch.zeros(2, 3), torch.zeros(3), 3)
    with pytest.raises(ValueError):
        metrics.SegmentationMetric(0)


# ---------------------------------------------------------------- depth
def test_depth_errors_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[2.0, 0.0], [2.0, 8.0]]]])
    # valid: (1 vs 2), (3 vs 2), (4 vs 8): abs 1, 1, 4; rel 1/2, 1/2, 4/8
    out = metrics.depth_errors(pred, target)
    assert out["abs_err"] == pytest.approx(2.0)
    assert out["rel_err"] == pytest.approx(0.5)


def test_depth_metric_weights_pixels_not_batches():
    m = metrics.DepthMetric()
    m.update(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0))  # 1 pixel, err 1
    m.update(torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3))  # 3 pixels, err 0
    assert m.compute()["abs_err"] == pytest.approx(0.25)  # per-batch mean would be 0.5
    m.reset()
    assert math.isnan(m.compute()["abs_err"])
    with pytest.raises(ValueError, match="differ"):
        m.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 3))


# ---------------------------------------------------------------- normals
def _normals(vectors):
    """(N, 3) vectors -> a (1, 3, 1, N) normal map."""
    return torch.tensor(vectors, dtype=torch.float64).T[None, :, None, :]


def test_normal_errors_by_hand():
    target = _normals([[0, 0, 1]] * 5 + [[0, 0, 0]])
    angles = [0.0, 10.0, 20.0, 25.0, 40.0, 0.0]
    pred = _normals([[0, math.sin(math.radians(a)), math.cos(math.radians(a))] for a in angles])
    out = metrics.normal_errors(pred, target)
    assert out["mean"] == pytest.approx(19.0)  # (0 + 10 + 20 + 25 + 40) / 5, last invalid
    assert out["median"] == pytest.approx(20.0)
    assert out["within_11.25"] == pytest.approx(2 / 5)
    assert out["within_22.5"] == pytest.approx(3 / 5)
    assert out["within_30"] == pytest.approx(4 / 5)


def test_normal_median_even_count_and_accumulation():
    target = _normals([[1, 0, 0]] * 4)
    m = metrics.NormalMetric()
    for angles in ([10.0, 50.0], [20.0, 35.0]):
        rad = [math.radians(a) for a in angles]
        pred = _normals([[math.cos(r), math.sin(r), 0] for r in rad])
        m.update(pred, target[..., :2])
    out = m.compute()
    assert out["median"] == pytest.approx(27.5)  # (20 + 35) / 2, as numpy's median
    assert out["mean"] == pytest.approx(28.75)
    assert out["within_30"] == pytest.approx(0.5)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_normal_histogram_median_close_to_exact(seed):
    g = torch.Generator().manual_seed(seed)
    exact, hist = metrics.NormalMetric(), metrics.NormalMetric(histogram_bins=1800)
    angles = []
    for _ in range(3):
        p, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        exact.update(p, t)
        hist.update(p, t)
        angles.append(metrics.normal_angles(p, t))
    a, b = exact.compute(), hist.compute()
    # within one bin (0.1 degree) of the two middle order statistics
    mid = torch.cat(angles).sort().values[[191, 192]]
    assert float(mid[0]) - 0.1 - 1e-9 <= b["median"] <= float(mid[1]) + 0.1 + 1e-9
    for k in ("mean", "within_11.25", "within_22.5", "within_30"):
        assert b[k] == pytest.approx(a[k])


def test_normal_metric_empty_and_validation():
    m = metrics.NormalMetric()
    m.update(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert all(math.isnan(v) for v in m.compute().values())
    with pytest.raises(ValueError):
        metrics.NormalMetric(histogram_bins=0)
    with pytest.raises(ValueError, match="same shape"):
        metrics.normal_angles(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 1))


# ---------------------------------------------------------------- per sample, multi-task
def test_classification_and_regression_metrics():
    c = metrics.ClassificationMetric()
    c.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, -1]))
    assert c.compute() == {"accuracy": 0.5}
    r = metrics.RegressionMetric()
    r.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]))
    assert r.compute() == {"mse": pytest.approx(2.5), "mae": pytest.approx(1.5)}


def test_multitask_metrics():
    m = metrics.MultiTaskMetrics(NYUV2_TASKS)
    seg_logits = torch.zeros(1, 13, 1, 2)
    seg_logits[0, 3, 0, 0] = 1.0
    outputs = {
        "segmentation": seg_logits,
        "depth": torch.full((1, 1, 1, 2), 2.0),
        "normal": _normals([[0, 0, 1], [0, 1, 0]]).float(),
    }
    targets = {
        "segmentation": torch.tensor([[[3, 0]]]),
        "depth": torch.tensor([[[1.0, 4.0]]]),
        "normal": _normals([[0, 0, 1], [0, 0, 1]]).float(),
    }
    m.update(outputs, targets)
    out = m.compute()
    assert out["segmentation/miou"] == pytest.approx(1.0)
    assert out["depth/abs_err"] == pytest.approx(1.5)
    assert out["depth/rel_err"] == pytest.approx((1 + 0.5) / 2)
    assert out["normal/mean"] == pytest.approx(45.0)
    assert m.higher_is_better()["normal/within_30"] is True
    assert m.higher_is_better()["depth/rel_err"] is False
    with pytest.raises(ValueError, match="missing"):
        m.update({"depth": outputs["depth"]}, targets)
    m.reset()
    assert math.isnan(m.compute()["depth/abs_err"])


def test_metric_for_every_kind():
    kinds = {
        TaskSpec("segmentation", 3): metrics.SegmentationMetric,
        TaskSpec("depth", 1): metrics.DepthMetric,
        TaskSpec("normal", 3): metrics.NormalMetric,
        TaskSpec("classification", 2): metrics.ClassificationMetric,
        TaskSpec("regression", 1): metrics.RegressionMetric,
    }
    for spec, cls in kinds.items():
        assert isinstance(metrics.metric_for(spec), cls)
    with pytest.raises(ValueError):
        metrics.metric_for("depth")


# ---------------------------------------------------------------- Δm%
def test_delta_m_by_hand():
    baselines = {
        "seg/miou": 0.40,
        "seg/pixel_acc": 0.60,
        "depth/abs_err": 0.50,
        "depth/rel_err": 0.20,
    }
    results = {
        "seg/miou": 0.44,
        "seg/pixel_acc": 0.57,
        "depth/abs_err": 0.45,
        "depth/rel_err": 0.22,
    }
    # +10 %, -5 %, +10 % (lower is better), -10 %  -> mean 1.25 %
    assert metrics.delta_m(results, baselines) == pytest.approx(1.25)


def test_delta_m_nested_and_explicit_directions():
    results = {"a": {"score": 3.0}, "b": {"loss": 1.0}}
    baselines = {"a": {"score": 2.0}, "b": {"loss": 2.0}}
    hib = {"a": {"score": True}, "b": {"loss": False}}
    assert metrics.delta_m(results, baselines, hib) == pytest.approx((50.0 + 50.0) / 2)
    assert metrics.delta_m({"miou": 0.3}, {"miou": 0.3}) == 0.0


def test_delta_m_errors():
    with pytest.raises(ValueError, match="no baseline"):
        metrics.delta_m({"miou": 0.3}, {"pixel_acc": 0.3})
    with pytest.raises(ValueError, match="non-zero baseline"):
        metrics.delta_m({"miou": 0.3}, {"miou": 0.0})
    with pytest.raises(ValueError, match="unknown direction"):
        metrics.delta_m({"iou50": 0.3}, {"iou50": 0.2})
    with pytest.raises(ValueError, match="no entry"):
        metrics.delta_m({"x": 0.3}, {"x": 0.2}, {"y": True})
    with pytest.raises(ValueError, match="empty"):
        metrics.delta_m({}, {})
