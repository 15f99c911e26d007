"""MTAN's augmentation of dense scene samples: a random scale-crop, then a random flip.

Works on the samples of `gradbalance.data.NYUv2`, `gradbalance.data.CityScapes` and
`gradbalance.data.SyntheticScenes`: an image ``(C, H, W)`` and a dict of dense targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_SCALES", "TASKS", "scale_crop_flip"]

#: The dense tasks, in their canonical order.
TASKS: tuple[str, ...] = ("segmentation", "depth", "normal")
#: Scale factors of the random scale-crop augmentation (as in the MTAN code).
DEFAULT_SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)


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
