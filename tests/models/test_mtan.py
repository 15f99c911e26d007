"""MTAN: attention masks in [0, 1], their shapes, the generic wrapper and STAN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradbalance import models
from tests.models.helpers import build, inputs


def test_segnet_mtan_masks_in_unit_interval_and_shaped_like_p():
    model = build("mtan")
    x = inputs("mtan")
    masks = model.attention_masks(x)
    c = model.backbone.channels
    assert list(masks) == list(model.tasks)
    for t, ms in masks.items():
        assert len(ms) == 10
        enc, dec = ms[:5], ms[5:]
        for j, m in enumerate(enc):
            assert tuple(m.shape) == (2, c[j], 32 >> j, 32 >> j)
        for k, m in enumerate(dec):
            j = 4 - k
            assert tuple(m.shape) == (2, c[j - 1] if j else c[0], 32 >> j, 32 >> j)
        for m in ms:
            assert bool(((m >= 0) & (m <= 1)).all()), t
    # masks differ between tasks (task-specific attention)
    assert not torch.equal(masks["depth"][0], masks["normal"][0])


def test_attention_masks_match_forward():
    model = build("mtan").eval()
    x = inputs("mtan")
    out = model(x)
    again, _ = model._run(x, keep_masks=True)
    for t in out:
        torch.testing.assert_close(out[t], again[t])


def test_attention_is_task_specific_and_pool_shared():
    model = build("mtan")
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.backbone.parameters()} <= shared
    assert {id(p) for p in model.enc_f.parameters()} <= shared  # the shared 3×3 blocks
    for t in model.tasks:
        own = {id(p) for p in model.task_parameters(t)}
        assert {id(p) for p in model.enc_att[t].parameters()} <= own
        assert {id(p) for p in model.dec_att[t].parameters()} <= own


def test_attention_module_layers():
    att = models.AttentionModule(6, 4, 3)
    kinds = [type(m) for m in att]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid]
    assert att[0].kernel_size == (1, 1) and att[3].kernel_size == (1, 1)


def test_stan_masks():
    model = build("stan")
    masks = model.attention_masks(inputs("stan"))
    assert set(masks) == set(model.tasks)
    for ms in masks.values():
        assert all(bool(((m >= 0) & (m <= 1)).all()) for m in ms)


def test_resnet_mtan_masks():
    model = build("mtan-resnet")
    masks = model.attention_masks(inputs("mtan-resnet"))
    assert all(len(ms) == 4 for ms in masks.values())
    assert all(bool(((m >= 0) & (m <= 1)).all()) for ms in masks.values() for m in ms)


def _stages():
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    return [
        nn.Sequential(block(3, 4), block(4, 4)),
        nn.Sequential(nn.MaxPool2d(2), block(4, 6), block(6, 6)),
        nn.Sequential(nn.MaxPool2d(2), block(6, 8)),
    ]


def test_mtan_wrapper_generic_backbone():
    tasks = {"depth": 1, "label": ("classification", 3)}
    with pytest.raises(ValueError, match="stage 2 gives u with 6 and p with 8 channels"):
        models.MTAN(_stages(), [4, 6, 8], tasks)(torch.randn(2, 3, 16, 16))
    model = models.MTAN(_stages(), [4, 6, 8], tasks, u_channels=[4, 6, 6])
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert tuple(out["depth"].shape) == (2, 1, 16, 16)
    assert tuple(out["label"].shape) == (2, 3)
    masks = model.attention_masks(x)
    assert [tuple(m.shape[1:]) for m in masks["depth"]] == [(4, 16, 16), (6, 8, 8), (8, 4, 4)]
    assert all(bool(((m >= 0) & (m <= 1)).all()) for m in masks["label"])


def test_mtan_wrapper_u_channels_and_custom_heads():
    # stage 1's u (after its pooling module) has 4 channels, p has 6
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())

    stages = [
        nn.Sequential(block(3, 4), block(4, 4)),
        nn.Sequential(nn.MaxPool2d(2), block(4, 6)),
    ]
    heads = {"score": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 1))}
    model = models.MTAN(
        stages, [4, 6], {"score": ("regression", 1)}, u_channels=[4, 4], heads=heads
    )
    assert tuple(model(torch.randn(2, 3, 8, 8))["score"].shape) == (2, 1)
    assert model.heads["score"] is heads["score"]


@pytest.mark.parametrize(
    ("stages", "channels", "match"),
    [
        ([], [], "at least one stage"),
        ([nn.Conv2d(3, 4, 1)], [4], "nn.Sequential of at least two"),
        ([nn.Sequential(nn.Conv2d(3, 4, 1))], [4], "nn.Sequential of at least two"),
        ([nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())], [4, 5], "channels"),
    ],
)
def test_mtan_wrapper_validation(stages, channels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        models.MTAN(stages, channels, {"depth": 1})


def test_mtan_wrapper_heads_must_cover_tasks():
    with pytest.raises(ValueError, match="missing task"):
        models.MTAN(_stages(), [4, 6, 8], {"depth": 1, "normal": 3}, heads={"depth": nn.Identity()})


def test_resnet_mtan_blocks_validation():
    with pytest.raises(ValueError, match="blocks"):
        models.resnet_mtan(width=1 / 16, blocks=(1, 2, 2, 2))


def test_mtan_wrapper_last_shared_layer():
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    stages = [nn.Sequential(block(3, 4), block(4, 4), nn.ReLU())]
    model = models.MTAN(stages, [4], {"depth": 1})
    last = list(model.last_shared_parameters())
    conv = stages[0][1][0]
    assert [id(p) for p in last] == [id(conv.weight), id(conv.bias)]
