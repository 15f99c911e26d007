"""Synthetic dense scenes: random shapes with semantic labels, depth and surface normals.

A stand-in for NYUv2 that needs no download, so the dense models (SegNet, MTAN, ...) run end to
end anywhere. Each scene is an orthographic view of a tilted background plane (class 0) with a few
objects in front of it. An object's class fixes its geometry and its colour, so segmentation is
learnable from the image; shading by the surface normal and a depth fog make normals and depth
learnable too.

Geometry (camera frame: ``x`` right, ``y`` up, ``z`` towards the viewer; ``depth`` is the
distance along the viewing direction). The image spans ``[-W/m, W/m] × [-H/m, H/m]`` scene units
with ``m = min(H, W)``, so one pixel is ``2/m`` units. A visible surface is a depth map
``d(x, y)``; its unit normal, facing the viewer, is

    n = (∂d/∂x, ∂d/∂y, 1) / ‖(∂d/∂x, ∂d/∂y, 1)‖,

so ``n_z > 0`` everywhere and a surface receding to the right has ``n_x > 0``. The objects:

* class ``c`` with ``(c - 1) mod 4 = 0``: a **sphere** of radius ``r``,
  ``d = z_c - sqrt(r² - ρ²)``, ``n = (x - x_c, y - y_c, sqrt(r² - ρ²)) / r``;
* ``1``: a **box face**: a rotated rectangle on a tilted plane ``d = z_c + a (x - x_c) + b (y -
  y_c)``, ``n ∝ (a, b, 1)``;
* ``2``: a vertical **cylinder** of radius ``r``, ``n = (x - x_c, 0, sqrt(r² - (x - x_c)²)) / r``;
* ``3``: a **triangle** on a tilted plane, like the box face.

Occlusion is resolved per pixel by a z-buffer (the nearest surface wins), so intersecting
objects are rendered correctly. Objects lie at depth 2-6.5 and the background at 6.7-9.3.

Image: ``colour(class) · (0.3 + 0.7 · max(0, n · l)) · exp(-0.06 (d - 2))`` plus Gaussian noise,
clipped to ``[0, 1]``, with a fixed light direction ``l`` from the upper left and fixed class
colours (grey background, evenly spaced hues for the objects), identical for every seed.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gradbalance.data.augment import TASKS
from gradbalance.data.npy_scenes import _check_tasks

__all__ = ["SHAPES", "SyntheticScenes"]

#: The object geometries; class ``c >= 1`` has geometry ``SHAPES[(c - 1) % 4]``.
SHAPES: tuple[str, ...] = ("sphere", "box", "cylinder", "triangle")

_LIGHT = np.array([-0.4, 0.5, 0.77]) / np.linalg.norm([-0.4, 0.5, 0.77])
_FLOOR_DEPTH = 8.0
_FOG = 0.06


def _palette(num_classes: int) -> np.ndarray:
    colours = [(0.55, 0.55, 0.55)]
    for c in range(1, num_classes):
        hue = (c - 1) / max(1, num_classes - 1)
        value = 1.0 if c % 2 else 0.8
        colours.append(colorsys.hsv_to_rgb(hue, 0.85, value))
    return np.asarray(colours)


def _plane_normal(a: float, b: float) -> np.ndarray:
    n = np.array([a, b, 1.0])
    return n / np.linalg.norm(n)


def _shape(
    kind: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, umax: float, vmax: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one object; return its mask, depth and normals on the (H, W) grid."""
    uc = rng.uniform(-0.8 * umax, 0.8 * umax)
    vc = rng.uniform(-0.8 * vmax, 0.8 * vmax)
    r = rng.uniform(0.2, 0.45)
    zc = rng.uniform(2.5, 6.0)
    du, dv = u - uc, v - vc
    if kind in ("sphere", "cylinder"):
        if kind == "sphere":
            q = r * r - du * du - dv * dv
            mask = q > 0
        else:
            half = r * rng.uniform(1.0, 2.0)
            q = r * r - du * du
            mask = (q > 0) & (np.abs(dv) < half)
            dv = np.zeros_like(dv)
        height = np.sqrt(np.maximum(q, 0.0))
        depth = zc - height
        normal = np.stack([du, dv, height], axis=-1) / r
        return mask, depth, normal
    a, b = rng.uniform(-0.7, 0.7, size=2)
    if kind == "box":
        theta = rng.uniform(0.0, np.pi)
        half_p, half_q = r * rng.uniform(0.6, 1.0, size=2)
        p = np.cos(theta) * du + np.sin(theta) * dv
        q = -np.sin(theta) * du + np.cos(theta) * dv
        mask = (np.abs(p) < half_p) & (np.abs(q) < half_q)
    else:  # triangle: vertices on a circle, counter-clockwise
        angles = rng.uniform(0.0, 2 * np.pi) + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        angles = angles + rng.uniform(-0.3, 0.3, size=3)
        px, py = r * np.cos(angles), r * np.sin(angles)
        mask = np.ones(u.shape, dtype=bool)
        for i in range(3):
            j = (i + 1) % 3
            cross = (px[j] - px[i]) * (dv - py[i]) - (py[j] - py[i]) * (du - px[i])
            mask &= cross > 0
    depth = zc + a * du + b * dv
    normal = np.broadcast_to(_plane_normal(a, b), (*u.shape, 3))
    return mask, depth, normal


def _render(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int,
    max_shapes: int,
    noise: float,
    invalid_prob: float,
) -> dict[str, np.ndarray]:
    unit = 2.0 / min(height, width)
    umax, vmax = width / min(height, width), height / min(height, width)
    x = (np.arange(width) + 0.5 - width / 2) * unit
    y = (height / 2 - np.arange(height) - 0.5) * unit
    u, v = np.meshgrid(x, y)

    # Background plane, receding upwards (and a little sideways), like a floor seen from above.
    a = rng.uniform(-0.3, 0.3) / umax
    b = rng.uniform(0.2, 1.0) / vmax
    depth = _FLOOR_DEPTH + a * u + b * v
    normal = np.empty((height, width, 3))
    normal[:] = _plane_normal(a, b)
    label = np.zeros((height, width), dtype=np.int64)
    instance = np.zeros((height, width), dtype=np.int64)

    for k in range(int(rng.integers(1, max_shapes + 1))):
        c = int(rng.integers(1, num_classes))
        mask, d, n = _shape(SHAPES[(c - 1) % len(SHAPES)], rng, u, v, umax, vmax)
        win = mask & (d < depth)  # z-buffer: the nearest surface is visible
        depth[win] = d[win]
        normal[win] = n[win]
        label[win] = c
        instance[win] = k + 1

    shade = 0.3 + 0.7 * np.clip(normal @ _LIGHT, 0.0, 1.0)
    fog = np.exp(-_FOG * (depth - 2.0))
    image = _palette(num_classes)[label] * (shade * fog)[..., None]
    image = np.clip(image + rng.normal(0.0, noise, size=image.shape), 0.0, 1.0)

    if rng.random() < invalid_prob:  # a sensor-dropout hole: no label, depth or normal there
        hh = int(rng.integers(max(1, height // 8), max(2, height // 3) + 1))
        ww = int(rng.integers(max(1, width // 8), max(2, width // 3) + 1))
        top = int(rng.integers(0, height - hh + 1))
        left = int(rng.integers(0, width - ww + 1))
        hole = (slice(top, top + hh), slice(left, left + ww))
        depth[hole] = 0.0
        normal[hole] = 0.0
        label[hole] = -1
    return {
        "image": image.astype(np.float32),
        "segmentation": label,
        "depth": depth[..., None].astype(np.float32),
        "normal": normal.astype(np.float32),
        "instance": instance,
    }


class SyntheticScenes(Dataset):
    """Random dense scenes with segmentation, depth and normals, rendered on the fly.

    The output format is `gradbalance.data.NYUv2`'s; the scene model is in the notes of
    `gradbalance.data.synthetic`.

    Sample ``i`` is ``(image, targets)``: ``image`` float32 ``(3, H, W)`` in ``[0, 1]``,
    ``targets`` a dict over ``tasks`` of ``"segmentation"`` int64 ``(H, W)`` in
    ``[0, num_classes)`` (-1 in dropout holes), ``"depth"`` float32 ``(1, H, W)`` (> 0; 0 in
    holes) and ``"normal"`` float32 ``(3, H, W)`` (unit length; 0 in holes). It depends only on
    ``(seed, i)`` and the other arguments, so it is the same in any order, process or worker.

    Args:
        n: number of scenes.
        size: ``(H, W)``.
        num_classes: semantic classes including the background (class 0); at least 2.
        seed: the scenes' seed (use different seeds for train and test sets).
        tasks: any of ``("segmentation", "depth", "normal")``.
        max_shapes: each scene has 1 to ``max_shapes`` objects (some may be hidden).
        noise: standard deviation of the image noise.
        invalid_prob: probability that a scene has a rectangular hole of invalid labels, depth
            and normals (to exercise the masking of real datasets); 0 by default.

    Attributes:
        tasks, num_classes, size: as given.

    Example:
        >>> from gradbalance.data import SyntheticScenes
        >>> ds = SyntheticScenes(8, size=(32, 48), num_classes=5, seed=0)
        >>> image, targets = ds[0]
        >>> image.shape, targets["segmentation"].shape, targets["depth"].shape
        (torch.Size([3, 32, 48]), torch.Size([32, 48]), torch.Size([1, 32, 48]))
        >>> bool(targets["normal"].norm(dim=0).sub(1).abs().max() < 1e-5)
        True
    """

    def __init__(
        self,
        n: int = 1000,
        size: tuple[int, int] = (64, 64),
        num_classes: int = 7,
        seed: int = 0,
        tasks: str | Iterable[str] = TASKS,
        *,
        max_shapes: int = 4,
        noise: float = 0.02,
        invalid_prob: float = 0.0,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if len(size) != 2 or min(size) < 2:
            raise ValueError(f"size must be (H, W) with H, W >= 2, got {size!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + objects), got {num_classes}")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        if noise < 0:
            raise ValueError(f"noise must be non-negative, got {noise}")
        if not 0.0 <= invalid_prob <= 1.0:
            raise ValueError(f"invalid_prob must be in [0, 1], got {invalid_prob}")
        self.n = int(n)
        self.size = (int(size[0]), int(size[1]))
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.tasks = _check_tasks(tasks, TASKS, "SyntheticScenes")
        self.max_shapes = int(max_shapes)
        self.noise = float(noise)
        self.invalid_prob = float(invalid_prob)

    def __len__(self) -> int:
        return self.n

    def render(self, index: int) -> dict[str, np.ndarray]:
        """Scene ``index`` as numpy arrays in the community's HWC layout.

        Returns:
            ``"image"`` float32 ``(H, W, 3)``, ``"segmentation"`` int64 ``(H, W)``, ``"depth"``
            float32 ``(H, W, 1)``, ``"normal"`` float32 ``(H, W, 3)`` and ``"instance"`` int64
            ``(H, W)`` (0 = background, ``k`` = the ``k``-th object drawn), whatever ``tasks``.
        """
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes")
        index %= self.n
        rng = np.random.default_rng([self.seed, index])
        return _render(
            rng, *self.size, self.num_classes, self.max_shapes, self.noise, self.invalid_prob
        )

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        scene = self.render(index)
        image = torch.from_numpy(np.ascontiguousarray(scene["image"].transpose(2, 0, 1)))
        targets: dict[str, Tensor] = {}
        for task in self.tasks:
            arr = scene[task]
            if arr.ndim == 3:
                arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
            targets[task] = torch.from_numpy(arr)
        return image, targets

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(n={self.n}, size={self.size}, num_classes={self.num_classes}, "
            f"seed={self.seed}, tasks={self.tasks})"
        )
