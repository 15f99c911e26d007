"""Cross-Stitch and NDDR-CNN: identity units reproduce independent networks; initialisation;
parameter groups."""

from __future__ import annotations

import pytest
import torch

from gradbalance import models
from gradbalance.models.cross_stitch import mixing_init
from tests.models.helpers import build, inputs


def independent_outputs(model, x):
    """Each column run alone as a plain SegNet, then its head."""
    return {t: model.heads[t](model.columns[t](x)) for t in model.tasks}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_identity_stitch_reproduces_independent_networks(per_channel, train):
    model = build("cross-stitch", per_channel=per_channel).train(train)
    with torch.no_grad():
        for unit in model.units:
            eye = torch.eye(len(model.tasks))
            unit.alpha.copy_(eye[:, :, None].expand_as(unit.alpha) if per_channel else eye)
    x = inputs("cross-stitch")
    got = model(x)
    want = independent_outputs(model, x)
    for t in model.tasks:
        torch.testing.assert_close(got[t], want[t])


def test_default_stitch_mixes_tasks():
    model = build("cross-stitch")
    x = inputs("cross-stitch")
    got, alone = model(x), independent_outputs(model, x)
    assert not torch.allclose(got["depth"], alone["depth"])


def test_stitch_initialisation():
    two = models.CrossStitchUnit(2)
    torch.testing.assert_close(two.alpha.detach(), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    three = models.CrossStitchUnit(3, 5, per_channel=True)
    assert tuple(three.alpha.shape) == (3, 3, 5)
    torch.testing.assert_close(three.alpha.detach()[..., 2], mixing_init(3, 0.9))
    torch.testing.assert_close(mixing_init(3, 0.9).sum(1), torch.ones(3))
    assert mixing_init(1, 0.9).item() == 1.0
    with pytest.raises(ValueError):
        mixing_init(2, 1.5)
    with pytest.raises(ValueError, match="channel count"):
        models.CrossStitchUnit(2, per_channel=True)


def test_stitch_unit_formula():
    unit = models.CrossStitchUnit(2, 3, per_channel=True)
    with torch.no_grad():
        unit.alpha.copy_(torch.arange(12.0).reshape(2, 2, 3))
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    ya, yb = unit([a, b])
    alpha = unit.alpha.detach()
    torch.testing.assert_close(
        ya, alpha[0, 0, None, :, None, None] * a + alpha[0, 1, None, :, None, None] * b
    )
    torch.testing.assert_close(
        yb, alpha[1, 0, None, :, None, None] * a + alpha[1, 1, None, :, None, None] * b
    )
    with pytest.raises(ValueError, match="expected 2"):
        unit([a])


def test_units_after_every_stage_but_the_last():
    model = build("cross-stitch")
    c = model.columns["depth"].channels
    assert len(model.units) == 9
    nddr = build("nddr-cnn")
    widths = [u.bns[0].num_features for u in nddr.units]
    assert widths == [*c, c[3], c[2], c[1], c[0]]


@pytest.mark.parametrize("name", ["cross-stitch", "nddr-cnn"])
def test_param_groups_scale_unit_lr(name):
    model = build(name, unit_lr_mult=10.0)
    groups = model.param_groups(lr=0.01)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    unit_ids = {id(p) for p in model.units.parameters()}
    assert {id(p) for p in groups[1]["params"]} == unit_ids
    # shared: reached by more than one task (the columns before the last unit too); the
    # last NDDR layer's per-task convolutions and BatchNorms feed one task each
    fused = model.units if name == "cross-stitch" else model.units[:-1]
    assert {id(p) for p in fused.parameters()} <= {id(p) for p in model.shared_parameters()}
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    torch.optim.SGD(groups, lr=0.01)  # a valid optimizer


def test_nddr_initialisation():
    layer = models.NDDRLayer(2, 3)
    w0 = layer.convs[0].weight.detach()[:, :, 0, 0]
    torch.testing.assert_close(w0, torch.cat([0.9 * torch.eye(3), 0.1 * torch.eye(3)], 1))
    w1 = layer.convs[1].weight.detach()[:, :, 0, 0]
    torch.testing.assert_close(w1, torch.cat([0.1 * torch.eye(3), 0.9 * torch.eye(3)], 1))
    assert layer.convs[0].bias is None
    three = models.NDDRLayer(3, 2)
    w = three.convs[2].weight.detach()[:, :, 0, 0]
    torch.testing.assert_close(
        w, torch.cat([0.05 * torch.eye(2), 0.05 * torch.eye(2), 0.9 * torch.eye(2)], 1)
    )


def test_nddr_at_identity_reproduces_independent_networks():
    # self_weight=1: each NDDR layer passes its task's features through BN (fresh running
    # statistics in eval mode: scale 1/sqrt(1 + eps)) and ReLU (features are already >= 0)
    model = build("nddr-cnn", self_weight=1.0).eval()
    x = inputs("nddr-cnn")
    got, want = model(x), independent_outputs(model, x)
    for t in model.tasks:
        torch.testing.assert_close(got[t], want[t], rtol=1e-3, atol=1e-4)
