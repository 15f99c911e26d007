"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): weights from the loss descent rate."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import Tensor

from gradbalance.errors import OptionError
from gradbalance.methods._common import join_repr
from gradbalance.methods.base import LOSSES, Method, StepInputs, as_float64
from gradbalance.methods.registry import register

__all__ = ["DWA"]

logger = logging.getLogger(__name__)

# Guards the ratio L̄(e−1)/L̄(e−2) against an epoch whose mean loss is exactly 0.
_TINY = 1e-12


@register
class DWA(Method):
    r"""Dynamic Weight Average: weight each task by how slowly its loss went down lately.

    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019 (the MTAN
    paper), Eq. 7:

    $$
    \lambda_k(e) = \frac{K \exp(r_k(e-1)/T)}{\sum_i \exp(r_i(e-1)/T)}, \qquad
    r_k(e-1) = \frac{\bar L_k(e-1)}{\bar L_k(e-2)},
    $$

    where ``L̄_k(e)`` is task ``k``'s training loss averaged over the iterations of epoch ``e``,
    ``T`` the temperature (2 in the paper) and ``λ_k = 1`` for the first two epochs. A task
    whose loss went down less (a larger ratio) gets a larger weight; the weights sum to ``K``.

    The epoch averages come from the (unweighted) losses of every applied step; a skipped step
    does not count. Close an epoch with ``GradBalancer.end_epoch`` (which calls
    ``end_epoch``), or pass ``window=N`` to close a "virtual epoch" every ``N`` steps.
    Weights are constant within an epoch.

    Deviations from the paper: none in the formula (the MTAN code uses the same epochs). The
    ``window`` option is an addition for training without epochs; with it each call of
    ``backward`` that is followed by a real step counts as one step (so under
    gradient accumulation each micro-batch counts). If ``epoch_warning_steps`` (1000) steps
    are applied without any epoch closed (no ``end_epoch``, no ``window``), a ``UserWarning``
    says so, once per instance: the weights would otherwise stay 1 silently. The ratio's
    denominator is floored at ``1e-12`` so an epoch with mean loss 0 does not divide by zero;
    DWA assumes positive losses.

    Args:
        temperature: ``T > 0``; larger values make the weights more uniform.
        window: close a virtual epoch every ``window`` steps instead of on
            ``end_epoch`` (which then does nothing).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method="dwa")
        >>> for epoch in range(3):
        ...     for _ in range(4):
        ...         out = model(torch.randn(8, 3))
        ...         opt.zero_grad()
        ...         w = opt.backward([out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()])
        ...         opt.step()
        ...     opt.end_epoch()
        >>> round(float(w.sum()), 6)  # the weights always sum to K
        2.0
    """

    name = "dwa"
    requires = frozenset({LOSSES})
    stateful = True
    scale_invariant = "weights"
    paper = (
        "S. Liu, E. Johns, A. J. Davison. End-to-End Multi-Task Learning with Attention. CVPR 2019."
    )

    epoch_loss_sum: Tensor
    epoch_steps: Tensor
    epoch_means: Tensor
    epochs: Tensor

    #: Applied steps after which a DWA that never closed an epoch (no ``end_epoch`` call, no
    #: ``window``) warns, once per instance, that its weights are still all 1. Set it on the
    #: class or the instance to move (or, with a huge value, silence) that warning.
    epoch_warning_steps: int = 1000

    def __init__(self, temperature: float = 2.0, window: int | None = None) -> None:
        super().__init__()
        self._warned_no_epoch = False
        t = float(temperature)
        if not math.isfinite(t) or t <= 0:
            raise OptionError(f"temperature must be a positive finite number, got {temperature!r}")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise OptionError(f"window must be a positive int (steps) or None, got {window!r}")
        self.temperature = t
        self.window = window

    def build(self, tasks: tuple[str, ...]) -> None:
        k = len(tasks)
        # Sum and count of the losses of the epoch in progress.
        self.register_buffer("epoch_loss_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        # Mean losses of the last two closed epochs: row 0 is e−2, row 1 is e−1.
        self.register_buffer("epoch_means", torch.zeros(2, k, dtype=torch.float64))
        # How many epochs were closed.
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise RuntimeError("DWA is not bound to tasks yet; call bind(tasks) first")

    # ------------------------------------------------------------------ the weights
    def weights(self, inputs: StepInputs) -> Tensor:
        self._require_bound()
        k = inputs.num_tasks
        if int(self.epochs) < 2:
            return torch.ones(k, dtype=torch.float64, device=self.epoch_means.device)
        ratio = self.epoch_means[1] / self.epoch_means[0].clamp_min(_TINY)
        return k * torch.softmax(ratio / self.temperature, dim=0)

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        self._require_bound()
        losses = as_float64(inputs.losses).to(self.epoch_loss_sum.device)
        self.epoch_loss_sum.add_(losses)
        self.epoch_steps.add_(1)
        if self.window is not None and int(self.epoch_steps) >= self.window:
            self._close_epoch()
        elif (
            self.window is None
            and not self._warned_no_epoch
            and int(self.epochs) == 0
            and int(self.epoch_steps) >= self.epoch_warning_steps
        ):
            self._warned_no_epoch = True
            warnings.warn(
                f"DWA: {int(self.epoch_steps)} steps were applied but no epoch was ever closed, "
                "so the weights are still all 1 (DWA needs two closed epochs). Call "
                "opt.end_epoch() at the end of every epoch, or pass window=N to close a virtual "
                "epoch every N steps. If your first epoch really is longer, ignore this (or "
                "raise DWA.epoch_warning_steps).",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ epochs
    def end_epoch(self) -> None:
        """Close the epoch in progress: its mean losses become ``L̄(e−1)``.

        Called by ``GradBalancer.end_epoch``. Does nothing when ``window`` is set (the
        windows close themselves). An epoch without any applied step is not counted (a
        warning says so).
        """
        if self.window is not None or not self.is_bound:
            logger.debug("DWA.end_epoch ignored (window=%s, bound=%s)", self.window, self.is_bound)
            return
        if int(self.epoch_steps) == 0:
            warnings.warn(
                "DWA.end_epoch(): no step was applied since the last epoch ended, so there is "
                "no epoch-average loss; the epoch is not counted",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self._close_epoch()

    def _close_epoch(self) -> None:
        mean = self.epoch_loss_sum / self.epoch_steps.to(torch.float64)
        self.epoch_means[0].copy_(self.epoch_means[1])
        self.epoch_means[1].copy_(mean)
        self.epochs.add_(1)
        self.epoch_loss_sum.zero_()
        self.epoch_steps.zero_()

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        return join_repr(super().extra_repr(), *parts)
