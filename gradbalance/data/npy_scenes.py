"""`NpySceneDataset`: a folder of per-sample ``.npy`` scene files, found, read and checked.

The base of `gradbalance.data.NYUv2` and `gradbalance.data.CityScapes`; the layout is described
in `gradbalance.data.dense`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gradbalance.data.augment import DEFAULT_SCALES, TASKS, scale_crop_flip
from gradbalance.data.errors import DatasetFormatError, DatasetNotFoundError

__all__ = ["NpySceneDataset"]

# The folder each dense task is read from (segmentation: unless label_folder says otherwise).
_FOLDER = {"segmentation": "label", "depth": "depth", "normal": "normal"}
_SPLITS = ("train", "val")


def _check_tasks(
    tasks: str | Iterable[str], available: Sequence[str], name: str
) -> tuple[str, ...]:
    """``tasks`` as a tuple, checked against ``available`` (``name`` is the dataset's)."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"{name}: tasks must name at least one of {tuple(available)}")
    bad = [t for t in tasks if t not in available]
    if bad:
        extra = (
            " (CityScapes has no surface normals)"
            if "normal" in bad and name == "CityScapes"
            else ""
        )
        raise ValueError(f"{name}: unknown tasks {bad}{extra}; choose from {tuple(available)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{name}: tasks contains duplicates: {tasks}")
    return tasks


class NpySceneDataset(Dataset):
    """Base of `NYUv2` and `CityScapes`: a folder of per-sample ``.npy`` files.

    Sample indices come from the file names in ``root/<split>/image/`` (``0.npy``, ``1.npy``,
    ...; sorted numerically); every task folder must hold a file of the same name for each.
    Subclasses set `name`, `available_tasks` and `num_classes`.

    Args:
        root: the dataset folder (holding ``train/`` and ``val/``).
        split: ``"train"`` or ``"val"``.
        tasks: the tasks to load, any of `available_tasks`.
        augment: apply `scale_crop_flip` to each sample.
        scales: zoom factors of the augmentation.
        label_folder: folder of the segmentation labels inside the split (default ``"label"``).
        num_classes: number of semantic classes; labels must be in ``[-1, num_classes)``.

    Raises:
        DatasetNotFoundError: ``root``, the split, a folder or a sample's file is missing.
        DatasetFormatError: a file name is not an integer index, or (when a sample is read) a
            file cannot be read or has the wrong shape, dtype or values.
    """

    name: str = "dataset"
    available_tasks: tuple[str, ...] = TASKS
    layout: str = "root/{train,val}/{image,label,depth,normal}/{i}.npy"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: str | Iterable[str] = TASKS,
        augment: bool = False,
        *,
        scales: Sequence[float] = DEFAULT_SCALES,
        label_folder: str | None = None,
        num_classes: int = 13,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"{self.name}: split must be one of {_SPLITS}, got {split!r}")
        if num_classes < 1:
            raise ValueError(f"{self.name}: num_classes must be positive, got {num_classes}")
        if not scales or any(float(s) < 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of factors >= 1, got {scales!r}")
        self.root = Path(root)
        self.split = split
        self.tasks = _check_tasks(tasks, self.available_tasks, self.name)
        self.augment = augment
        self.scales = tuple(float(s) for s in scales)
        self.num_classes = num_classes
        split_dir = self.root / split
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"{self.name} root {str(self.root)!r} does not exist; expected the layout "
                f"{self.layout}"
            )
        if not split_dir.is_dir():
            have = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise DatasetNotFoundError(
                f"{self.name}: split folder {str(split_dir)!r} does not exist (found folders "
                f"{have}); expected the layout {self.layout}"
            )
        self.folders = {"image": "image"}
        for task in self.tasks:
            folder = _FOLDER[task]
            if task == "segmentation":
                folder = label_folder or self._default_label_folder(split_dir)
            self.folders[task] = folder
        self.files = self._discover(split_dir)

    def _default_label_folder(self, split_dir: Path) -> str:
        return "label"

    def _folder(self, split_dir: Path, folder: str) -> Path:
        path = split_dir / folder
        if not path.is_dir():
            raise DatasetNotFoundError(
                f"{self.name}: folder {str(path)!r} does not exist; expected the layout "
                f"{self.layout}"
            )
        return path

    def _discover(self, split_dir: Path) -> list[dict[str, Path]]:
        image_dir = self._folder(split_dir, "image")
        found: dict[int, str] = {}
        for p in image_dir.iterdir():
            if p.suffix != ".npy" or p.name.startswith("."):
                continue
            if not p.stem.isdigit():
                raise DatasetFormatError(
                    f"{self.name}: {str(p)!r} is not named by a sample index; files must be "
                    f"named 0.npy, 1.npy, ... (layout {self.layout})"
                )
            found[int(p.stem)] = p.name
        if not found:
            raise DatasetNotFoundError(
                f"{self.name}: {str(image_dir)!r} holds no .npy files; expected the layout "
                f"{self.layout}"
            )
        order = sorted(found)
        for key, folder in self.folders.items():
            if key == "image":
                continue
            task_dir = self._folder(split_dir, folder)
            present = {p.name for p in task_dir.iterdir()}
            missing = [found[i] for i in order if found[i] not in present]
            if missing:
                raise DatasetNotFoundError(
                    f"{self.name}: {str(task_dir / missing[0])!r} is missing ({len(missing)} "
                    f"of the {len(order)} {folder} files missing); every image/<i>.npy needs "
                    f"a {folder}/<i>.npy (layout {self.layout})"
                )
        return [
            {key: split_dir / folder / found[i] for key, folder in self.folders.items()}
            for i in order
        ]

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DatasetNotFoundError(f"{self.name}: {str(path)!r} is missing") from None
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetFormatError(
                f"{self.name}: cannot read {str(path)!r} as a .npy array: {exc}"
            ) from exc
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
            raise DatasetFormatError(
                f"{self.name}: {str(path)!r} holds {getattr(array, 'dtype', type(array))} data; "
                "expected a numeric array"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DatasetFormatError(
                f"{self.name}: {str(path)!r} contains NaN or infinite values (mark invalid "
                "depth or normals with 0 and ignored labels with -1)"
            )
        return array

    def _bad_shape(self, path: Path, array: np.ndarray, expected: str) -> DatasetFormatError:
        return DatasetFormatError(
            f"{self.name}: {str(path)!r} has shape {array.shape}, expected {expected} "
            f"(HWC arrays, layout {self.layout})"
        )

    def read_sample(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Read and check sample ``index`` from disk, without augmentation."""
        paths = self.files[index]
        path = paths["image"]
        raw = self._load(path)
        if raw.ndim != 3 or raw.shape[2] != 3:
            raise self._bad_shape(path, raw, "(H, W, 3)")
        h, w = raw.shape[:2]
        scale = 255.0 if raw.dtype == np.uint8 else 1.0
        image = torch.from_numpy(np.ascontiguousarray(raw.transpose(2, 0, 1), dtype=np.float32))
        if scale != 1.0:
            image /= scale
        targets: dict[str, Tensor] = {}
        for task in self.tasks:
            path = paths[task]
            raw = self._load(path)
            if raw.shape[:2] != (h, w):
                raise DatasetFormatError(
                    f"{self.name}: {str(path)!r} has shape {raw.shape} but its image "
                    f"{str(paths['image'])!r} is {h}x{w}; all maps of a sample must share H, W"
                )
            if task == "segmentation":
                if raw.ndim == 3 and raw.shape[2] == 1:
                    raw = raw[..., 0]
                if raw.ndim != 2:
                    raise self._bad_shape(path, raw, "(H, W)")
                if raw.dtype.kind == "f" and (raw != np.round(raw)).any():
                    raise DatasetFormatError(
                        f"{self.name}: {str(path)!r} holds non-integer labels; labels are "
                        "class indices (stored as integers or integral floats)"
                    )
                lo, hi = raw.min(), raw.max()
                if lo < -1 or hi >= self.num_classes:
                    raise DatasetFormatError(
                        f"{self.name}: {str(path)!r} holds labels in [{lo:g}, {hi:g}]; expected "
                        f"-1 (ignore) or 0..{self.num_classes - 1}"
                    )
                targets[task] = torch.from_numpy(raw.astype(np.int64))
            elif task == "depth":
                if raw.ndim == 3 and raw.shape[2] == 1:
                    raw = raw[..., 0]
                if raw.ndim != 2:
                    raise self._bad_shape(path, raw, "(H, W, 1)")
                targets[task] = torch.from_numpy(raw.astype(np.float32))[None]
            else:
                if raw.ndim != 3 or raw.shape[2] != 3:
                    raise self._bad_shape(path, raw, "(H, W, 3)")
                arr = np.ascontiguousarray(raw.transpose(2, 0, 1), dtype=np.float32)
                targets[task] = torch.from_numpy(arr)
        return image, targets

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, targets = self.read_sample(index)
        if self.augment:
            image, targets = scale_crop_flip(image, targets, scales=self.scales)
        return image, targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"tasks={self.tasks}, n={len(self)}, augment={self.augment})"
        )
