"""The small optimizer some methods run on their own K-vector (GradNorm's weights, FAMO's logits).

Both papers update a vector of ``K`` numbers with Adam (or plain gradient descent) outside the
model's optimizer. This module holds the option checks and the Adam arithmetic they share, as
pure functions: the caller decides when the new moments are committed.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from gradbalance.errors import OptionError

__all__ = ["OPTIMIZERS", "adam_direction", "check_options"]

OPTIMIZERS = ("adam", "sgd")


def check_options(
    kind_arg: str, kind: Any, lr: Any, betas: Any, eps: Any
) -> tuple[str, float, tuple[float, float], float]:
    """Validate the inner optimizer's options; return ``(kind, lr, betas, eps)`` normalised.

    ``kind_arg`` is the constructor argument's name, for the error message.

    Examples:
        >>> check_options("weight_optimizer", "Adam", 0.025, (0.9, 0.999), 1e-8)
        ('adam', 0.025, (0.9, 0.999), 1e-08)
    """
    rate = float(lr)
    if not math.isfinite(rate) or rate <= 0:
        raise OptionError(f"lr must be a positive finite number, got {lr!r}")
    if not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
        raise OptionError(f"{kind_arg} must be one of {OPTIMIZERS}, got {kind!r}")
    b1, b2 = (float(b) for b in betas)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise OptionError(f"betas must lie in [0, 1), got {betas!r}")
    if not math.isfinite(float(eps)) or float(eps) <= 0:
        raise OptionError(f"eps must be a positive finite number, got {eps!r}")
    return kind.lower(), rate, (b1, b2), float(eps)


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step (Kingma & Ba 2015), without changing its inputs.

    Returns ``(direction, new_exp_avg, new_exp_avg_sq)``; the parameter moves to
    ``x - direction``. ``step`` is the 1-based count including this step.
    """
    beta1, beta2 = betas
    new_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    new_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    denom = new_avg_sq.sqrt() / math.sqrt(bias2) + eps
    return (lr / bias1) * new_avg / denom, new_avg, new_avg_sq
