"""NYUv2 and CityScapes in the community's preprocessed ``.npy`` layout, and their augmentation.

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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from gradbalance.data.errors import DatasetFormatError, DatasetNotFoundError

__all__ = ["DEFAULT_SCALES", "TASKS", "CityScapes", "NYUv2", "NpySceneDataset", "scale_crop_flip"]

#: The dense tasks, in their canonical order, and the folder each one is read from.
TASKS: tuple[str, ...] = ("segmentation", "depth", "normal")
#: Scale factors of the random scale-crop augmentation (as in the MTAN code).
DEFAULT_SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)

_FOLDER = {"segmentation": "label", "depth": "depth", "normal": "normal"}
_SPLITS = ("train", "val")


def _resize(t: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize a ``(C, h, w)`` tensor to ``(C, *size)``."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t[None], size=size, mode=mode, **kwargs)[0]


def scale_crop_flip(
    image: Tensor,
    targets: Mapping[str, Tensor],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MTAN's NYUv2 augmentation: a random scale-crop, then a random horizontal flip.

    A scale ``s`` is drawn uniformly from ``scales``; a random ``(int(H/s), int(W/s))`` window
    is cropped and resized back to ``(H, W)``, which zooms in by ``s``. Zooming in brings the
    scene ``s`` times closer, so depth is divided by ``s``. Then, with probability 1/2, all maps
    are mirrored left-right and the x component of the normals is negated.

    Resampling: the image bilinearly; labels and depth by nearest neighbour (``nearest-exact``,
    so no label or depth value is invented and invalid pixels stay invalid); normals bilinearly
    and then re-normalised to unit length where the nearest-neighbour normal is valid (zero
    elsewhere). Deviations from the MTAN code: it uses ``align_corners=True`` and plain
    ``nearest`` and does not re-normalise the normals; we align pixel centres
    (``align_corners=False``, ``nearest-exact``) so the maps stay registered with each other.

    Args:
        image: ``(C, H, W)`` float.
        targets: any of ``"segmentation"`` ``(H, W)`` int, ``"depth"`` ``(1, H, W)``,
            ``"normal"`` ``(3, H, W)``.
        scales: zoom factors, each ``>= 1``.
        flip: whether to apply the random flip.
        generator: the random source; ``None`` uses torch's global RNG (which ``DataLoader``
            seeds differently in each worker).

    Returns:
        The augmented ``(image, targets)``, new tensors with the input dtypes and shapes.

    Example:
        >>> import torch
        >>> img = torch.rand(3, 8, 12)
        >>> tgt = {"segmentation": torch.zeros(8, 12, dtype=torch.long),
        ...        "depth": torch.ones(1, 8, 12)}
        >>> out, t = scale_crop_flip(img, tgt, generator=torch.Generator().manual_seed(0))
        >>> out.shape, t["segmentation"].dtype, t["depth"].shape
        (torch.Size([3, 8, 12]), torch.int64, torch.Size([1, 8, 12]))
    """
    if not scales or any(float(s) < 1.0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of factors >= 1, got {scales!r}")
    unknown = set(targets) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; expected some of {TASKS}")
    h, w = image.shape[-2:]
    s = float(scales[int(torch.randint(len(scales), (1,), generator=generator))])
    ch, cw = max(1, int(h / s)), max(1, int(w / s))
    top = int(torch.randint(h - ch + 1, (1,), generator=generator))
    left = int(torch.randint(w - cw + 1, (1,), generator=generator))
    do_flip = flip and bool(torch.rand((), generator=generator) < 0.5)

    out = {k: v.clone() for k, v in targets.items()}
    if (ch, cw) != (h, w):
        size = (h, w)
        win = (..., slice(top, top + ch), slice(left, left + cw))
        image = _resize(image[win].float(), size, "bilinear").to(image.dtype)
        for key, t in targets.items():
            if key == "segmentation":
                out[key] = _resize(t[win][None].float(), size, "nearest-exact")[0].to(t.dtype)
            elif key == "depth":
                out[key] = _resize(t[win].float(), size, "nearest-exact").div_(s).to(t.dtype)
            else:
                valid = _resize(t[win].float(), size, "nearest-exact").norm(dim=0) > 0
                n = _resize(t[win].float(), size, "bilinear")
                n = n / n.norm(dim=0, keepdim=True).clamp_min(1e-12) * valid
                out[key] = n.to(t.dtype)
    else:
        image = image.clone()
    if do_flip:
        image = image.flip(-1)
        for key in out:
            out[key] = out[key].flip(-1)
            if key == "normal":
                out[key][0].neg_()
    return image, out


def _check_tasks(
    tasks: str | Iterable[str], available: Sequence[str], name: str
) -> tuple[str, ...]:
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
