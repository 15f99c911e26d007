"""SyntheticScenes: format, ranges, geometric consistency of depth and normals, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradbalance.data import SyntheticScenes
from gradbalance.data.synthetic import SHAPES


def test_format_matches_nyuv2():
    ds = SyntheticScenes(6, size=(20, 36), num_classes=5, seed=0)
    assert len(ds) == 6
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 20, 36) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert t["segmentation"].shape == (20, 36) and t["segmentation"].dtype == torch.int64
        assert 0 <= t["segmentation"].min() and t["segmentation"].max() < 5
        assert t["depth"].shape == (1, 20, 36) and t["depth"].dtype == torch.float32
        assert (t["depth"] > 0).all()
        n = t["normal"]
        assert n.shape == (3, 20, 36) and n.dtype == torch.float32
        torch.testing.assert_close(n.norm(dim=0), torch.ones(20, 36))
        assert (n[2] > 0).all()  # every visible surface faces the camera


def test_holes_mark_all_tasks_invalid_together():
    ds = SyntheticScenes(5, size=(24, 24), seed=1, invalid_prob=1.0)
    for i in range(len(ds)):
        _, t = ds[i]
        hole = t["segmentation"] == -1
        assert hole.any()
        assert (t["depth"][0][hole] == 0).all() and (t["depth"][0][~hole] > 0).all()
        norm = t["normal"].norm(dim=0)
        assert (norm[hole] == 0).all()
        torch.testing.assert_close(norm[~hole], torch.ones_like(norm[~hole]))


def test_normals_are_the_normals_of_the_depth_map():
    # n = (d_x, d_y, 1) / |.| with x to the right, y up, one pixel = 2 / min(H, W) units.
    size = 64
    unit = 2.0 / size
    ds = SyntheticScenes(12, size=(size, size), num_classes=9, seed=2)
    cosines: dict[str, list[np.ndarray]] = {}
    for i in range(len(ds)):
        scene = ds.render(i)
        d, n, inst = scene["depth"][..., 0].astype(np.float64), scene["normal"], scene["instance"]
        # pixels whose 3x3 neighbourhood shows the same surface
        same = np.ones((size - 2, size - 2), dtype=bool)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                same &= inst[1 + dr : size - 1 + dr, 1 + dc : size - 1 + dc] == inst[1:-1, 1:-1]
        dx = (d[1:-1, 2:] - d[1:-1, :-2]) / (2 * unit)
        dy = (d[:-2, 1:-1] - d[2:, 1:-1]) / (2 * unit)  # row index grows downwards
        fd = np.stack([dx, dy, np.ones_like(dx)], axis=-1)
        fd /= np.linalg.norm(fd, axis=-1, keepdims=True)
        cos = (fd * n[1:-1, 1:-1]).sum(-1)
        seg = scene["segmentation"][1:-1, 1:-1]
        for c in np.unique(seg):
            kind = "background" if c == 0 else SHAPES[(c - 1) % len(SHAPES)]
            cosines.setdefault(kind, []).append(cos[same & (seg == c)])
    assert set(cosines) == {"background", *SHAPES}
    for kind, values in cosines.items():
        values = np.concatenate(values)
        assert values.size > 300, kind
        # planes are exact; curved surfaces agree up to the finite-difference error
        assert values.min() > 0.99, kind


def test_objects_are_in_front_of_the_background_and_classes_fix_the_shape():
    ds = SyntheticScenes(30, size=(32, 32), num_classes=9, seed=3)
    classes = set()
    for i in range(len(ds)):
        scene = ds.render(i)
        seg, d, n = scene["segmentation"], scene["depth"][..., 0], scene["normal"]
        fg = seg > 0
        if fg.any() and (~fg).any():
            assert d[fg].max() < d[~fg].min()
        for k in np.unique(scene["instance"][fg]):
            pix = scene["instance"] == k
            c = int(np.unique(seg[pix]).item())  # one class per object
            classes.add(c)
            if SHAPES[(c - 1) % len(SHAPES)] in ("box", "triangle"):  # planar: one normal
                assert np.ptp(n[pix], axis=0).max() < 1e-6
    assert classes == set(range(1, 9))


def test_deterministic_and_order_independent():
    a = SyntheticScenes(10, size=(16, 16), seed=5)
    b = SyntheticScenes(10, size=(16, 16), seed=5)
    c = SyntheticScenes(10, size=(16, 16), seed=6)
    late = b[7]
    first = a[7]
    for i in (0, 3):
        a[i]
    assert torch.equal(first[0], late[0]) and torch.equal(a[7][0], late[0])
    assert all(torch.equal(first[1][k], late[1][k]) for k in first[1])
    assert torch.equal(a[-1][0], a[9][0])
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], a[1][0])
    with pytest.raises(IndexError):
        a[10]


def test_tasks_subset_and_dataloader():
    ds = SyntheticScenes(4, size=(8, 12), tasks=("normal", "depth"))
    assert list(ds[0][1]) == ["normal", "depth"]
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 3, 8, 12) and y["normal"].shape == (4, 3, 8, 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": -1}, "non-negative"),
        ({"size": (1, 8)}, "size"),
        ({"num_classes": 1}, "num_classes"),
        ({"max_shapes": 0}, "max_shapes"),
        ({"noise": -0.1}, "noise"),
        ({"invalid_prob": 2.0}, "invalid_prob"),
        ({"tasks": ("depth", "albedo")}, "unknown tasks"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticScenes(**kwargs)
