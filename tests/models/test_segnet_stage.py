"""`SegNetStage` with ``mid_channels``: the layout of the Dense task networks' last stage."""

from __future__ import annotations

import pytest
import torch

from gradbalance.errors import GradBalanceError
from gradbalance.models import SegNetBackbone
from gradbalance.models.segnet import SegNetStage


def _convs(module: torch.nn.Module) -> list[tuple[int, int]]:
    return [
        (m.in_channels, m.out_channels) for m in module.modules() if isinstance(m, torch.nn.Conv2d)
    ]


def test_mid_channels_widens_the_first_layer_only():
    assert _convs(SegNetStage(8, 2, depth=3, mid_channels=8)) == [(8, 8), (8, 2), (2, 2)]
    assert _convs(SegNetStage(8, 2, depth=3)) == [(8, 2), (2, 2), (2, 2)]


def test_mid_channels_without_a_second_layer_is_refused():
    with pytest.raises(GradBalanceError, match="depth >= 2"):
        SegNetStage(8, 2, depth=1, mid_channels=8)
    with pytest.raises(ValueError):
        SegNetStage(8, 2, depth=1, mid_channels=8)


def test_fused_backbone_runs_with_the_widened_last_stage():
    net = SegNetBackbone(width=1 / 16, fuse=True)
    assert _convs(net.dec_stage(0)) == [(8, 8), (8, 4)]
    unfused = SegNetBackbone(width=1 / 16)
    assert _convs(unfused.dec_stage(0)) == [(4, 4), (4, 4)]
