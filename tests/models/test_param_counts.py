"""The #P column of the MTAN paper (Liu, Johns, Davison, CVPR 2019, Tables 2-3): parameters at
full width relative to one single-task SegNet. Built on the ``meta`` device (no memory, fast).

Our counts against the paper (largest deviation 1.7 %, Split-deep):

    NYUv2 (3 tasks)       paper   here
    Split, wide           1.75    1.759
    Split, deep           2       2.034
    Dense                 4.95    4.952
    Cross-Stitch          ≈3      3.000
    MTAN                  1.77    1.771
    STAN                  4.56    4.586
    CityScapes (2 tasks)
    MTAN                  1.65    1.650
    Dense                 3.63    3.633
"""

from __future__ import annotations

import pytest
import torch

from gradbalance import models

TOLERANCE = 0.02  # relative; the paper rounds to two decimals


def count(name: str, tasks) -> int:
    with torch.device("meta"):
        model = models.create(name, tasks=tasks)
    assert all(p.device.type == "meta" for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def single(tasks) -> int:
    seg = {t: s for t, s in tasks.items() if s.kind == "segmentation"}
    return count("segnet", seg)


def test_single_task_segnet_size():
    # VGG-16 SegNet with the 13-class head, as in the MTAN reference code
    assert single(models.NYUV2_TASKS) == 24_981_069


@pytest.mark.parametrize(
    ("name", "paper"),
    [
        ("segnet", 3.0),
        ("split-wide", 1.75),
        ("split-deep", 2.0),
        ("dense", 4.95),
        ("cross-stitch", 3.0),
        ("mtan", 1.77),
        ("stan", 4.56),
    ],
)
def test_nyuv2_ratios(name, paper):
    ratio = count(name, models.NYUV2_TASKS) / single(models.NYUV2_TASKS)
    assert ratio == pytest.approx(paper, rel=TOLERANCE)


@pytest.mark.parametrize(("name", "paper"), [("mtan", 1.65), ("dense", 3.63)])
def test_cityscapes_ratios(name, paper):
    ratio = count(name, models.CITYSCAPES_TASKS) / single(models.CITYSCAPES_TASKS)
    assert ratio == pytest.approx(paper, rel=TOLERANCE)


def test_split_has_about_one_segnet():
    ratio = count("split", models.NYUV2_TASKS) / single(models.NYUV2_TASKS)
    assert 1.0 < ratio < 1.01  # three small heads on one SegNet


#: Parameters in the layers of the NYUv2 network (13 classes, depth, normals) of
#: ``im2im_pred/model_segnet_dense.py`` in the MTAN reference code (lorenmt/mtan): 4.9535
#: single-task SegNets. (The script prints 3 more: its uncertainty weights ``logsigma``.)
DENSE_REFERENCE_NYUV2 = 123_743_992
#: Its shared network's last decoder stage (Conv3x3 64->64, Conv3x3 64->13, each with BN),
#: whose output no task reads; `gradbalance.models.Dense` leaves it out (see its docstring).
DENSE_UNREAD_STAGE = (64 * 64 * 9 + 64 + 2 * 64) + (64 * 13 * 9 + 13 + 2 * 13)


def test_dense_matches_the_reference_but_for_the_unread_stage():
    assert DENSE_UNREAD_STAGE == 44_583
    assert count("dense", models.NYUV2_TASKS) == DENSE_REFERENCE_NYUV2 - DENSE_UNREAD_STAGE


def test_dense_task_decoder_keeps_the_doubled_width_before_the_heads():
    # reference: the task networks' last decoder stage is Conv3x3 2c->2c then 2c->c (c = 64)
    with torch.device("meta"):
        model = models.create("dense", tasks=models.NYUV2_TASKS)
    for column in model.columns.values():
        convs = [m for m in column.dec_stage(0).modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(m.in_channels, m.out_channels) for m in convs] == [(128, 128), (128, 64)]
