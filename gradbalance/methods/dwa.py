"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): weights from the loss descent rate."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

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
    Weights are constant within an epoch. The statistics live beside the losses (on a GPU too),
    and neither a step nor ``end_epoch`` reads a value on the host: a step skipped on the device
    (``nonfinite="skip"``) is masked out there (`update_masked`).

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
        self._reset_host_counts()

    def build(self, tasks: tuple[str, ...]) -> None:
        k = len(tasks)
        # Sum and count of the losses of the epoch in progress.
        self.register_buffer("epoch_loss_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        # Mean losses of the last two closed epochs: row 0 is e−2, row 1 is e−1.
        self.register_buffer("epoch_means", torch.zeros(2, k, dtype=torch.float64))
        # How many epochs were closed.
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self._reset_host_counts()

    # The buffers are the truth; the host keeps Python counts beside them so that no step reads
    # a buffer (a synchronisation off the CPU). `_steps_seen` counts the updates since the last
    # closed epoch and `_epochs_seen` the closed epochs: equal to the buffers while every step
    # was decided on the host, upper bounds once a step's skip was decided on the device
    # (`update_masked`), where `_steps_exact` turns false until the next `end_epoch`.
    def _reset_host_counts(self, steps: int = 0, epochs: int = 0) -> None:
        self._steps_seen = steps
        self._epochs_seen = epochs
        self._steps_exact = True

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.is_bound:  # one read of each counter, when a checkpoint is loaded
            self._reset_host_counts(int(self.epoch_steps), int(self.epochs))

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise RuntimeError("DWA is not bound to tasks yet; call bind(tasks) first")

    def _follow(self, device: torch.device) -> None:
        """Keep the statistics beside the losses (moved once, on first use or after a load)."""
        if self.epoch_loss_sum.device != device:
            self.to(device)

    # ------------------------------------------------------------------ the weights
    def weights(self, inputs: StepInputs) -> Tensor:
        self._require_bound()
        k = inputs.num_tasks
        self._follow(inputs.losses.device)
        ones = torch.ones(k, dtype=torch.float64, device=self.epoch_means.device)
        if self._epochs_seen < 2:
            return ones
        ratio = self.epoch_means[1] / self.epoch_means[0].clamp_min(_TINY)
        w = k * torch.softmax(ratio / self.temperature, dim=0)
        # the host's count is an upper bound after steps skipped on the device: ask the device
        return torch.where(self.epochs >= 2, w, ones)

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        self._add(inputs, None)

    def update_masked(self, inputs: StepInputs, weights: Tensor, skip: Tensor) -> None:
        """`update` unless ``skip`` is true, decided on the device: nothing is read on the host.

        A skipped step adds nothing to the epoch's sum and count; a window then closes where
        the device's count reaches it.

        Example:
            >>> import torch
            >>> from gradbalance.methods import DWA, StepInputs
            >>> dwa = DWA(window=1)
            >>> dwa.bind(("a", "b"))
            >>> step = StepInputs(tasks=("a", "b"), losses=torch.tensor([2.0, 1.0]))
            >>> dwa.update_masked(step, torch.ones(2), torch.tensor(True))  # skipped
            >>> dwa.update_masked(step, torch.ones(2), torch.tensor(False))
            >>> dwa.epochs.tolist(), dwa.epoch_means[1].tolist()
            (1, [2.0, 1.0])
        """
        self._add(inputs, skip)

    def _add(self, inputs: StepInputs, skip: Tensor | None) -> None:
        self._require_bound()
        self._follow(inputs.losses.device)
        losses = as_float64(inputs.losses).to(self.epoch_loss_sum.device)
        if skip is None:
            self.epoch_loss_sum.add_(losses)
            self.epoch_steps.add_(1)
        else:
            keep = ~skip.reshape(()).to(device=losses.device, dtype=torch.bool)
            self.epoch_loss_sum.add_(torch.where(keep, losses, 0.0))
            self.epoch_steps.add_(keep.long())
            self._steps_exact = False
        self._steps_seen += 1
        if self.window is not None:
            if self._steps_seen >= self.window:
                if self._steps_exact:
                    self._close_epoch(None)
                    self._steps_seen = 0
                else:  # fewer than `window` steps may have counted: the device decides
                    self._close_epoch(self.epoch_steps >= self.window)
                    self._steps_seen = self.window - 1
                self._epochs_seen += 1
        elif (
            not self._warned_no_epoch
            and self._epochs_seen == 0
            and self._steps_seen >= self.epoch_warning_steps
        ):
            self._warned_no_epoch = True
            warnings.warn(
                f"DWA: {self._steps_seen} steps were applied but no epoch was ever closed, "
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
        warning says so; when steps were skipped on the device, without the warning, which
        would cost a host read). Reads nothing on the host.
        """
        if self.window is not None or not self.is_bound:
            logger.debug("DWA.end_epoch ignored (window=%s, bound=%s)", self.window, self.is_bound)
            return
        if self._steps_seen == 0:
            warnings.warn(
                "DWA.end_epoch(): no step was applied since the last epoch ended, so there is "
                "no epoch-average loss; the epoch is not counted",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self._close_epoch(None if self._steps_exact else self.epoch_steps > 0)
        self._reset_host_counts(0, self._epochs_seen + 1)  # the device's count is 0 now

    def _close_epoch(self, where: Tensor | None) -> None:
        """Move the epoch's mean into ``L̄(e−1)``: always, or only where the device flag is set."""
        # count ≥ 1 wherever the epoch closes; the floor only keeps the other branch finite
        mean = self.epoch_loss_sum / self.epoch_steps.clamp_min(1).to(torch.float64)
        shifted = torch.stack((self.epoch_means[1], mean))
        if where is None:
            self.epoch_means.copy_(shifted)
            self.epochs.add_(1)
            self.epoch_loss_sum.zero_()
            self.epoch_steps.zero_()
        else:
            self.epoch_means.copy_(torch.where(where, shifted, self.epoch_means))
            self.epochs.add_(where.long())
            self.epoch_loss_sum.masked_fill_(where, 0.0)
            self.epoch_steps.masked_fill_(where, 0)

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        return join_repr(super().extra_repr(), *parts)
