"""NYUv2 / CityScapes loaders on fixtures in the community layout, and the augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradbalance.data import (
    CityScapes,
    DatasetFormatError,
    DatasetNotFoundError,
    NYUv2,
    scale_crop_flip,
    write_fixture,
)
from gradbalance.errors import GradBalanceError

H, W = 12, 16


@pytest.fixture
def nyu(tmp_path):
    return write_fixture(tmp_path / "nyu", n=3, size=(H, W), dataset="nyuv2", invalid_prob=1.0)


@pytest.fixture
def city(tmp_path):
    return write_fixture(tmp_path / "city", n=2, size=(H, W), dataset="cityscapes")


# ---------------------------------------------------------------- reading


def test_nyuv2_reads_the_fixture(nyu):
    ds = NYUv2(nyu, "train")
    assert len(ds) == 3 and ds.tasks == ("segmentation", "depth", "normal")
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert t["segmentation"].shape == (H, W) and t["segmentation"].dtype == torch.int64
        assert t["depth"].shape == (1, H, W) and t["depth"].dtype == torch.float32
        assert t["normal"].shape == (3, H, W) and t["normal"].dtype == torch.float32
        # the values are the files', moved from HWC to CHW
        raw = np.load(nyu / "train" / "image" / f"{i}.npy")
        torch.testing.assert_close(image, torch.from_numpy(raw).permute(2, 0, 1))
        label = np.load(nyu / "train" / "label" / f"{i}.npy")
        assert torch.equal(t["segmentation"], torch.from_numpy(label).long())
        depth = np.load(nyu / "train" / "depth" / f"{i}.npy")
        torch.testing.assert_close(t["depth"], torch.from_numpy(depth).permute(2, 0, 1))
        normal = np.load(nyu / "train" / "normal" / f"{i}.npy")
        torch.testing.assert_close(t["normal"], torch.from_numpy(normal).permute(2, 0, 1))
        # ignore / invalid markers survive (invalid_prob=1: every sample has a hole)
        hole = t["segmentation"] == -1
        assert hole.any() and (t["depth"][0][hole] == 0).all()
        assert t["segmentation"].max() < 13
    assert len(NYUv2(nyu, "val")) == 3


def test_task_subsets_and_unused_folders(nyu):
    import shutil

    shutil.rmtree(nyu / "train" / "normal")
    ds = NYUv2(nyu, "train", tasks=("depth", "segmentation"))
    assert list(ds[0][1]) == ["depth", "segmentation"]
    assert list(NYUv2(nyu, "train", tasks="depth")[0][1]) == ["depth"]
    with pytest.raises(DatasetNotFoundError, match="normal"):
        NYUv2(nyu, "train")
    with pytest.raises(ValueError, match="unknown tasks"):
        NYUv2(nyu, "val", tasks=("segmentation", "edges"))
    with pytest.raises(ValueError, match="duplicates"):
        NYUv2(nyu, "val", tasks=("depth", "depth"))
    with pytest.raises(ValueError, match="split"):
        NYUv2(nyu, "test")


def test_cityscapes_reads_label_7_or_label(city, tmp_path):
    ds = CityScapes(city, "val")
    assert ds.folders["segmentation"] == "label_7" and len(ds) == 2
    image, t = ds[0]
    assert image.shape == (3, H, W) and set(t) == {"segmentation", "depth"}
    assert t["segmentation"].min() >= -1 and t["segmentation"].max() < 7
    plain = write_fixture(
        tmp_path / "c2", n=2, size=(H, W), dataset="cityscapes", label_folder="label"
    )
    assert CityScapes(plain, "train").folders["segmentation"] == "label"
    with pytest.raises(ValueError, match="no surface normals"):
        CityScapes(city, tasks=("segmentation", "normal"))
    with pytest.raises(DatasetNotFoundError, match="label_19"):
        CityScapes(plain, num_classes=19, label_folder="label_19")


def test_dataloader_collates_batches(nyu):
    loader = torch.utils.data.DataLoader(NYUv2(nyu, "train", augment=True), batch_size=2)
    x, y = next(iter(loader))
    assert x.shape == (2, 3, H, W) and y["segmentation"].shape == (2, H, W)
    assert y["depth"].shape == (2, 1, H, W) and y["normal"].shape == (2, 3, H, W)


def test_files_are_sorted_numerically(tmp_path):
    root = write_fixture(tmp_path, n=12, size=(4, 4), dataset="cityscapes")
    names = [paths["image"].name for paths in CityScapes(root).files]
    assert names == [f"{i}.npy" for i in range(12)]


# ---------------------------------------------------------------- broken fixtures


def _check(info, *fragments):
    msg = str(info.value)
    assert isinstance(info.value, GradBalanceError)
    for fragment in fragments:
        assert fragment in msg, msg


def test_missing_root_and_split(tmp_path, nyu):
    with pytest.raises(DatasetNotFoundError) as info:
        NYUv2(tmp_path / "nothing")
    _check(info, "does not exist", "root/{train,val}/{image,label,depth,normal}/{i}.npy")
    assert isinstance(info.value, FileNotFoundError)
    import shutil

    shutil.rmtree(nyu / "val")
    with pytest.raises(DatasetNotFoundError) as info:
        NYUv2(nyu, "val")
    _check(info, str(nyu / "val"), "['train']")


def test_missing_file_is_named(nyu):
    (nyu / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        NYUv2(nyu, "train")
    _check(info, str(nyu / "train" / "depth" / "1.npy"), "1 of the 3 depth files missing")
    NYUv2(nyu, "train", tasks=("segmentation", "normal"))  # depth not needed: fine


def test_missing_or_empty_image_folder(nyu):
    for f in (nyu / "val" / "image").iterdir():
        f.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"no \.npy files"):
        NYUv2(nyu, "val")
    (nyu / "val" / "image").rmdir()
    with pytest.raises(DatasetNotFoundError, match="image"):
        NYUv2(nyu, "val")


def test_badly_named_file(nyu):
    np.save(nyu / "train" / "image" / "extra.npy", np.zeros((H, W, 3)))
    with pytest.raises(DatasetFormatError, match=r"extra\.npy") as info:
        NYUv2(nyu, "train")
    assert isinstance(info.value, ValueError)


def _broken_sample(root, folder, array_or_bytes, *fragments, dataset=NYUv2):
    path = root / "train" / folder / "0.npy"
    if isinstance(array_or_bytes, bytes):
        path.write_bytes(array_or_bytes)
    else:
        np.save(path, array_or_bytes, allow_pickle=True)
    ds = dataset(root, "train")
    ds[1]  # other samples still load
    with pytest.raises(DatasetFormatError) as info:
        ds[0]
    _check(info, str(path), *fragments)
    assert isinstance(info.value, ValueError)


def test_corrupt_npy(nyu):
    _broken_sample(nyu, "depth", b"this is not a numpy file", "cannot read")


def test_pickled_object_array_is_refused(nyu):
    _broken_sample(nyu, "label", np.array([{"a": 1}], dtype=object), "cannot read")


def test_image_with_wrong_shape(nyu):
    _broken_sample(nyu, "image", np.zeros((H, W), dtype=np.float32), "(H, W, 3)")


def test_normal_with_wrong_channels(nyu):
    _broken_sample(nyu, "normal", np.zeros((H, W, 2), dtype=np.float32), "(H, W, 3)")


def test_map_size_mismatch(nyu):
    _broken_sample(nyu, "depth", np.ones((H, W + 1, 1), dtype=np.float32), f"{H}x{W}")


def test_label_out_of_range(nyu):
    _broken_sample(nyu, "label", np.full((H, W), 13.0, dtype=np.float32), "0..12")


def test_label_not_integral(nyu):
    _broken_sample(nyu, "label", np.full((H, W), 0.5, dtype=np.float32), "non-integer")


def test_nan_depth(nyu):
    depth = np.ones((H, W, 1), dtype=np.float32)
    depth[0, 0] = np.nan
    _broken_sample(nyu, "depth", depth, "NaN")


def test_cityscapes_label_range(city):
    _broken_sample(city, "label_7", np.full((H, W), 7, dtype=np.int64), "0..6", dataset=CityScapes)


def test_accepted_variants(nyu):
    # uint8 images are scaled to [0, 1]; (H, W) depth and (H, W, 1) labels are accepted
    np.save(nyu / "train" / "image" / "0.npy", np.full((H, W, 3), 255, dtype=np.uint8))
    np.save(nyu / "train" / "depth" / "0.npy", np.full((H, W), 2.0, dtype=np.float64))
    np.save(nyu / "train" / "label" / "0.npy", np.full((H, W, 1), 3, dtype=np.int32))
    image, t = NYUv2(nyu, "train")[0]
    assert image.dtype == torch.float32 and (image == 1).all()
    assert t["depth"].shape == (1, H, W) and t["depth"].dtype == torch.float32
    assert t["segmentation"].shape == (H, W) and (t["segmentation"] == 3).all()


# ---------------------------------------------------------------- augmentation


def _ramp_sample(h=24, w=32):
    cols = torch.arange(w).expand(h, w)
    normal = torch.zeros(3, h, w)
    normal[0] = torch.linspace(-0.6, 0.6, w)
    normal[1] = 0.3
    normal[2] = (1 - normal[0] ** 2 - normal[1] ** 2).sqrt()
    normal[:, :3, :3] = 0  # an invalid corner
    targets = {"segmentation": cols.clone(), "depth": (cols + 1).float()[None], "normal": normal}
    image = (cols.float() / w)[None].expand(3, h, w).clone()
    return image, targets


def test_flip_mirrors_everything_and_negates_normal_x():
    image, targets = _ramp_sample()
    seen = set()
    for seed in range(20):
        out, t = scale_crop_flip(
            image, targets, scales=(1.0,), generator=torch.Generator().manual_seed(seed)
        )
        flipped = not torch.equal(out, image)
        seen.add(flipped)
        if flipped:
            assert torch.equal(out, image.flip(-1))
            assert torch.equal(t["segmentation"], targets["segmentation"].flip(-1))
            assert torch.equal(t["depth"], targets["depth"].flip(-1))
            assert torch.equal(t["normal"][0], -targets["normal"][0].flip(-1))
            assert torch.equal(t["normal"][1:], targets["normal"][1:].flip(-1))
        else:
            assert torch.equal(t["normal"], targets["normal"])
    assert seen == {True, False}
    assert torch.equal(targets["segmentation"], torch.arange(32).expand(24, 32))  # not modified


def test_scale_crop_keeps_maps_registered_and_divides_depth():
    image, targets = _ramp_sample()
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        out, t = scale_crop_flip(image, targets, scales=(2.0,), flip=False, generator=g)
        seg, depth = t["segmentation"], t["depth"][0]
        assert seg.dtype == torch.int64 and out.shape == image.shape
        # zoom x2 of a 16-column window: each source column appears twice, in order
        assert seg[0].diff().ge(0).all() and len(seg[0].unique()) == 16
        # depth was the column + 1; zooming by 2 halves it; same pixels as the labels
        torch.testing.assert_close(depth, (seg.float() + 1) / 2)
        # the bilinear image stays registered with the labels to within one source column
        assert (out[0] * 32 - seg.float()).abs().max() <= 1.0
        n = t["normal"]
        norm = n.norm(dim=0)
        valid = norm > 0
        torch.testing.assert_close(norm[valid], torch.ones_like(norm[valid]))


def test_augmented_dataset_is_reproducible_with_torch_seed(nyu):
    ds = NYUv2(nyu, "train", augment=True)
    torch.manual_seed(0)
    a = [ds[i] for i in range(3)]
    torch.manual_seed(0)
    b = [ds[i] for i in range(3)]
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb) and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert xa.shape == (3, H, W) and ta["segmentation"].shape == (H, W)


def test_scale_crop_flip_validates():
    image, targets = _ramp_sample()
    with pytest.raises(ValueError, match=">= 1"):
        scale_crop_flip(image, targets, scales=(0.5,))
    with pytest.raises(ValueError, match="unknown targets"):
        scale_crop_flip(image, {"edges": targets["depth"]})
