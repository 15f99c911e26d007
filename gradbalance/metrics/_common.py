"""Input checks shared by the metrics of every kind."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gradbalance.losses import check_tensors

__all__ = ["as_labels", "check_tensors"]

#: A metric accumulator: ``update(pred, target)``, ``compute()``, ``reset()``.
Metric = Any


def as_labels(pred: Tensor, target: Tensor, name: str) -> Tensor:
    """Class labels from logits ``(B, C, ...)`` (argmax over dim 1) or labels like ``target``."""
    check_tensors(name, pred, target)
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred {tuple(pred.shape)} is neither logits (B, C, ...) nor labels shaped "
            f"like target {tuple(target.shape)}"
        )
    return pred
