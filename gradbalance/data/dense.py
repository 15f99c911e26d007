"""NYUv2 and CityScapes in the community's preprocessed ``.npy`` layout.

The multi-task learning literature since MTAN (Liu, Johns & Davison, *End-to-End Multi-Task
Learning with Attention*, CVPR 2019) trains on a preprocessed copy of both datasets, one ``.npy``
file per sample and per task, laid out as:

```text
root/
  train/  image/0.npy 1.npy ...   (H, W, 3) float RGB in [0, 1]
          label/0.npy ...         (H, W) class index stored as float, -1 = ignore
          depth/0.npy ...         (H, W, 1) float, 0 = invalid (no measurement)
          normal/0.npy ...        (H, W, 3) float surface normals, 0 = invalid (NYUv2 only)
  val/    the same
```

* **NYUv2** (Silberman et al., ECCV 2012): 795 train / 654 val images of indoor scenes at
  288×384, 13 semantic classes, depth and surface normals.
* **CityScapes** (Cordts et al., CVPR 2016): 2,975 train / 500 val street scenes at 128×256,
  7 semantic classes (the MTAN copy ships ``label_2``, ``label_7`` and ``label_19`` folders next
  to ``image`` and ``depth``; `CityScapes` reads ``label_<num_classes>``, or ``label``),
  and depth (disparity-derived). No surface normals.

Each loader returns ``(image, targets)`` with ``image`` float32 ``(3, H, W)`` and ``targets`` a
dict over the chosen tasks: ``"segmentation"`` int64 ``(H, W)`` (-1 = ignore),
``"depth"`` float32 ``(1, H, W)`` (0 = invalid) and ``"normal"`` float32 ``(3, H, W)`` (0 =
invalid). Every file is checked when it is read (shape, dtype, label range, finiteness) and a
`gradbalance.data.DatasetError` names the file and the expected layout when something is
missing or broken.

The finding, reading and checking is `NpySceneDataset`'s (`gradbalance.data.npy_scenes`), the
augmentation `scale_crop_flip`'s (`gradbalance.data.augment`); both are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from gradbalance.data.augment import DEFAULT_SCALES, TASKS, scale_crop_flip
from gradbalance.data.npy_scenes import NpySceneDataset

__all__ = ["DEFAULT_SCALES", "TASKS", "CityScapes", "NYUv2", "NpySceneDataset", "scale_crop_flip"]


class NYUv2(NpySceneDataset):
    """NYUv2 (Silberman et al. 2012) in the MTAN preprocessed layout: 13-class segmentation,
    depth and surface normals at 288×384 (795 train / 654 val).

    Sample ``i`` is ``(image, targets)``: ``image`` float32 ``(3, H, W)``, ``targets`` a dict
    over ``tasks`` of ``"segmentation"`` int64 ``(H, W)`` (-1 = ignore), ``"depth"`` float32
    ``(1, H, W)`` (0 = invalid), ``"normal"`` float32 ``(3, H, W)`` (0 = invalid). Files are
    checked as they are read; see `NpySceneDataset` for the errors.

    Args:
        root: the folder holding ``train/`` and ``val/`` (layout in `gradbalance.data.dense`).
        split: ``"train"`` or ``"val"`` (the usual test set).
        tasks: any of ``("segmentation", "depth", "normal")``.
        augment: random scale-crop and flip (`scale_crop_flip`), as in MTAN's training.
        scales: zoom factors of the augmentation.

    Example:
        >>> import tempfile
        >>> from gradbalance.data import NYUv2, write_fixture
        >>> root = write_fixture(tempfile.mkdtemp(), n=2, size=(24, 32), dataset="nyuv2")
        >>> image, targets = NYUv2(root, "val")[0]
        >>> image.shape, targets["segmentation"].dtype, targets["normal"].shape
        (torch.Size([3, 24, 32]), torch.int64, torch.Size([3, 24, 32]))
    """

    name = "NYUv2"
    available_tasks = TASKS
    layout = "root/{train,val}/{image,label,depth,normal}/{i}.npy"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: str | Iterable[str] = TASKS,
        augment: bool = False,
        *,
        scales: Sequence[float] = DEFAULT_SCALES,
    ) -> None:
        super().__init__(root, split, tasks, augment, scales=scales, num_classes=13)


class CityScapes(NpySceneDataset):
    """CityScapes (Cordts et al. 2016) in the MTAN preprocessed layout: 7-class segmentation
    and depth at 128×256 (2,975 train / 500 val); no surface normals.

    Labels are read from ``label_<num_classes>/`` when that folder exists (the MTAN copy has
    ``label_2``, ``label_7`` and ``label_19``), else from ``label/``, unless ``label_folder`` is
    given. The output format is `NYUv2`'s.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        tasks: any of ``("segmentation", "depth")``.
        augment: random scale-crop and flip (`scale_crop_flip`).
        num_classes: 7 (default), 19 or 2 with the MTAN copy.
        label_folder: force the label folder's name.
        scales: zoom factors of the augmentation.

    Example:
        >>> import tempfile
        >>> from gradbalance.data import CityScapes, write_fixture
        >>> root = write_fixture(tempfile.mkdtemp(), n=2, size=(16, 32), dataset="cityscapes")
        >>> ds = CityScapes(root, "train")
        >>> image, targets = ds[1]
        >>> ds.folders["segmentation"], targets["depth"].shape
        ('label_7', torch.Size([1, 16, 32]))
    """

    name = "CityScapes"
    available_tasks = ("segmentation", "depth")
    layout = "root/{train,val}/{image,label_7 (or label),depth}/{i}.npy"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: str | Iterable[str] = ("segmentation", "depth"),
        augment: bool = False,
        *,
        num_classes: int = 7,
        label_folder: str | None = None,
        scales: Sequence[float] = DEFAULT_SCALES,
    ) -> None:
        super().__init__(
            root,
            split,
            tasks,
            augment,
            scales=scales,
            label_folder=label_folder,
            num_classes=num_classes,
        )

    def _default_label_folder(self, split_dir: Path) -> str:
        specific = f"label_{self.num_classes}"
        return specific if (split_dir / specific).is_dir() else "label"
