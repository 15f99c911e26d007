"""Task losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import losses
from gradbalance.tasks import TaskSpec


def test_segmentation_loss_hand_computed():
    # pixel 0: logits (log 3, 0) -> p(class 0) = 3/4; pixel 1: ignored; pixel 2: (0, 0) -> 1/2
    logits = torch.tensor([[[[math.log(3.0), 5.0, 0.0]], [[0.0, -5.0, 0.0]]]])
    target = torch.tensor([[[0, -1, 1]]])
    want = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(losses.segmentation_loss(logits, target)) == pytest.approx(want, rel=1e-6)


def test_segmentation_loss_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = losses.segmentation_loss(logits, torch.full((1, 2, 2), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_segmentation_loss_shapes():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        losses.segmentation_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match="tensors"):
        losses.segmentation_loss(torch.randn(1, 3, 2, 2), [[0]])


def test_depth_loss_hand_computed():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[2.0, 0.0], [3.5, 1.0]]])  # (B, H, W), one invalid pixel
    want = (1.0 + 0.5 + 3.0) / 3
    assert float(losses.depth_loss(pred, target)) == pytest.approx(want)
    assert float(losses.depth_loss(pred, target.unsqueeze(1))) == pytest.approx(want)


def test_depth_loss_gradient_only_on_valid_pixels():
    pred = torch.tensor([[[[1.0, 2.0]]]], requires_grad=True)
    losses.depth_loss(pred, torch.tensor([[[[0.0, 3.0]]]])).backward()
    assert pred.grad.tolist() == [[[[0.0, -1.0]]]]


def test_depth_loss_no_valid_pixel():
    pred = torch.ones(1, 1, 2, 2, requires_grad=True)
    loss = losses.depth_loss(pred, torch.zeros(1, 1, 2, 2))
    assert loss.item() == 0.0 and loss.requires_grad


def test_depth_loss_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        losses.depth_loss(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 3, 2))


def test_normal_loss_hand_computed():
    s = 1 / math.sqrt(2)
    # three pixels (channels x, y, z per pixel):
    #   pred (0, 0, 1) vs target (0, 0, 3): cos 1
    #   pred (2, 0, 0) vs target (s, s, 0): cos s (45 degrees)
    #   pred (1, 0, 0) vs target (0, 0, 0): invalid, left out
    pred = torch.tensor([[[[0.0, 2.0, 1.0]], [[0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]]])
    target = torch.tensor([[[[0.0, s, 0.0]], [[0.0, s, 0.0]], [[3.0, 0.0, 0.0]]]])
    want = 1 - (1.0 + s) / 2
    assert float(losses.normal_loss(pred, target)) == pytest.approx(want, rel=1e-6)


def test_normal_loss_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    a = losses.normal_loss(pred, target)
    b = losses.normal_loss(5 * pred, target / 3)
    torch.testing.assert_close(a, b)
    assert 0.0 <= float(a) <= 2.0


def test_normal_loss_shapes():
    with pytest.raises(ValueError, match="same shape"):
        losses.normal_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 1))


def test_focal_loss_hand_computed():
    p = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    logits = p.log()
    target = torch.tensor([0, 0, -1])
    per = [-(0.2**2) * math.log(0.8), -(0.7**2) * math.log(0.3), 0.0]
    got = losses.focal_loss(logits, target, gamma=2.0, reduction="none")
    torch.testing.assert_close(got, torch.tensor(per))
    assert float(losses.focal_loss(logits, target)) == pytest.approx(sum(per) / 2, rel=1e-6)
    assert float(losses.focal_loss(logits, target, reduction="sum")) == pytest.approx(sum(per))


def test_focal_loss_gamma_zero_is_cross_entropy_dense():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, generator=g)
    target = torch.randint(-1, 4, (2, 3, 3), generator=g)
    torch.testing.assert_close(
        losses.focal_loss(logits, target, gamma=0.0), losses.segmentation_loss(logits, target)
    )


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 5.0), st.integers(0, 10_000))
def test_focal_loss_below_cross_entropy(gamma, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 3, generator=g)
    target = torch.randint(0, 3, (6,), generator=g)
    fl = losses.focal_loss(logits, target, gamma=gamma, reduction="none")
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert bool((fl <= ce + 1e-6).all()) and bool((fl >= 0).all())


def test_focal_loss_validation():
    with pytest.raises(ValueError, match="gamma"):
        losses.focal_loss(torch.zeros(1, 2), torch.zeros(1), gamma=-1)
    with pytest.raises(ValueError, match="reduction"):
        losses.focal_loss(torch.zeros(1, 2), torch.zeros(1), reduction="max")


def test_classification_and_regression_losses():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert float(losses.classification_loss(logits, torch.tensor([0, -1]))) == pytest.approx(
        -math.log(0.75)
    )
    assert float(
        losses.regression_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))
    ) == (pytest.approx(2.5))
    with pytest.raises(ValueError, match="does not match"):
        losses.regression_loss(torch.ones(2, 2), torch.ones(3))


def test_task_loss_dispatch():
    pred = torch.tensor([[[[1.0, 2.0]]]])
    target = torch.tensor([[[[3.0, 0.0]]]])
    assert float(losses.task_loss(TaskSpec("depth", 1), pred, target)) == 2.0
    assert float(losses.task_loss("depth", pred, target)) == 2.0
    seg = losses.task_loss("segmentation", torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1))
    assert float(seg) == pytest.approx(math.log(2))
    n = losses.task_loss("normal", torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    assert float(n) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.task_loss("classification", torch.zeros(1, 4), torch.tensor([2]))) == (
        pytest.approx(math.log(4))
    )
    assert float(losses.task_loss("regression", torch.ones(2, 1), torch.zeros(2))) == 1.0
    with pytest.raises(ValueError, match="unknown task kind"):
        losses.task_loss("edges", pred, target)
