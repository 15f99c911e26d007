"""Δm%: the mean signed relative change of a multi-task model against its baselines."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["HIGHER_IS_BETTER", "delta_m"]

#: Whether a higher value of each metric name is better (the sign in `delta_m`).
HIGHER_IS_BETTER: Mapping[str, bool] = {
    "miou": True,
    "pixel_acc": True,
    "abs_err": False,
    "rel_err": False,
    "mean": False,
    "median": False,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
    "accuracy": True,
    "mse": False,
    "mae": False,
}


def _flatten(values: Mapping[str, Any], what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                out[f"{k}/{k2}"] = float(v2)
        else:
            out[str(k)] = float(v)
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def delta_m(
    results: Mapping[str, Any],
    baselines: Mapping[str, Any],
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
    """Δm%: the mean over metrics of the signed relative change against the baselines.

    ``Δm = 100 / N · Σ_i s_i (M_i − B_i) / B_i`` with ``s_i = +1`` when a higher value of
    metric ``i`` is better and ``−1`` otherwise (Maninis, Radosavovic, Kokkinos, CVPR 2019,
    Eq. 4). Positive is better than the baselines.

    Args:
        results: the multi-task model's metrics, flat (``{"segmentation/miou": 0.2, ...}``) or
            nested by task (``{"segmentation": {"miou": 0.2}}``).
        baselines: the single-task baselines' metrics, with every key of ``results``.
        higher_is_better: the direction of each key of ``results``; by default looked up by
            the metric name after the last ``/`` in `HIGHER_IS_BETTER`.

    Returns:
        Δm in percent.

    Raises:
        ValueError: a metric has no baseline, a zero or non-finite baseline, or no known
            direction.

    Examples:
        >>> # mIoU +10 % relative, abs. error 20 % worse -> (10 - 20) / 2
        >>> round(delta_m({"miou": 0.22, "abs_err": 0.6}, {"miou": 0.2, "abs_err": 0.5}), 6)
        -5.0
    """
    res = _flatten(results, "results")
    base = _flatten(baselines, "baselines")
    hib = None if higher_is_better is None else _flatten_bool(higher_is_better)
    total = 0.0
    for key, m in res.items():
        if key not in base:
            raise ValueError(f"no baseline for metric {key!r}; baselines has {sorted(base)}")
        b = base[key]
        if b == 0 or not math.isfinite(b) or not math.isfinite(m):
            raise ValueError(
                f"metric {key!r}: need finite values and a non-zero baseline, "
                f"got result {m} and baseline {b}"
            )
        if hib is not None:
            if key not in hib:
                raise ValueError(f"higher_is_better has no entry for metric {key!r}")
            up = hib[key]
        else:
            name = key.rsplit("/", 1)[-1]
            if name not in HIGHER_IS_BETTER:
                raise ValueError(
                    f"unknown direction of metric {key!r}; pass higher_is_better="
                    f"{{{key!r}: True/False}} (known names: {sorted(HIGHER_IS_BETTER)})"
                )
            up = HIGHER_IS_BETTER[name]
        total += (1.0 if up else -1.0) * (m - b) / b
    return 100.0 * total / len(res)


def _flatten_bool(values: Mapping[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                out[f"{k}/{k2}"] = bool(v2)
        else:
            out[str(k)] = bool(v)
    return out
