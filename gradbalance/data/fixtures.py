"""Write a tiny NYUv2- or CityScapes-style dataset for smoke tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradbalance.data.synthetic import SyntheticScenes

__all__ = ["write_fixture"]

_DATASETS = {
    # dataset -> (num_classes, label folder, has normals)
    "nyuv2": (13, "label", True),
    "cityscapes": (7, "label_7", False),
}


def write_fixture(
    root: str | os.PathLike[str],
    n: int = 4,
    size: tuple[int, int] = (24, 32),
    dataset: str = "nyuv2",
    *,
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
    invalid_prob: float = 0.25,
    label_folder: str | None = None,
) -> Path:
    """Write a tiny dataset in the community's ``.npy`` layout, readable by the loaders.

    The samples are `gradbalance.data.SyntheticScenes` (so they are meaningful:
    labels, depth and normals agree with the image), stored as the MTAN copies store them:

    ```text
    root/<split>/image/<i>.npy    float32 (H, W, 3) in [0, 1]
    root/<split>/label/<i>.npy    float32 (H, W), class index, -1 = ignore
    root/<split>/depth/<i>.npy    float32 (H, W, 1), 0 = invalid
    root/<split>/normal/<i>.npy   float32 (H, W, 3), 0 = invalid   (NYUv2 only)
    ```

    NYUv2 fixtures have 13 classes; CityScapes fixtures 7 classes, in ``label_7/`` as in the
    MTAN copy, and no normals.

    Args:
        root: the folder to write (created if needed; existing files are overwritten).
        n: samples per split.
        size: ``(H, W)`` of every map.
        dataset: ``"nyuv2"`` or ``"cityscapes"``.
        splits: the split folders to write.
        seed: seed of the first split; the ``k``-th split uses ``seed + k``.
        invalid_prob: probability of a hole of ignored labels / invalid depth and normals in a
            sample.
        label_folder: override the label folder's name (e.g. ``"label"`` for CityScapes).

    Returns:
        ``root`` as a `pathlib.Path`.

    Example:
        >>> import tempfile
        >>> from gradbalance.data import NYUv2, write_fixture
        >>> root = write_fixture(tempfile.mkdtemp(), n=3, size=(16, 16))
        >>> len(NYUv2(root, "train")), sorted(p.name for p in (root / "train").iterdir())
        (3, ['depth', 'image', 'label', 'normal'])
    """
    if dataset not in _DATASETS:
        raise ValueError(f"dataset must be one of {tuple(_DATASETS)}, got {dataset!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    num_classes, default_label, normals = _DATASETS[dataset]
    folders = {"image": "image", "segmentation": label_folder or default_label, "depth": "depth"}
    if normals:
        folders["normal"] = "normal"
    root = Path(root)
    for k, split in enumerate(splits):
        scenes = SyntheticScenes(
            n, size=size, num_classes=num_classes, seed=seed + k, invalid_prob=invalid_prob
        )
        for folder in folders.values():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            scene = scenes.render(i)
            for key, folder in folders.items():
                array = scene[key].astype(np.float32)  # labels as floats, like the MTAN copies
                np.save(root / split / folder / f"{i}.npy", array)
    return root
