"""FAMO (Liu et al., NeurIPS 2023): fast adaptive multitask optimization with O(1) cost."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.errors import LossError, OptionError
from gradbalance.methods._common import join_repr
from gradbalance.methods._inner_optim import adam_direction, check_options
from gradbalance.methods._options import finite_float, per_task
from gradbalance.methods.base import LOSSES, Method, StepInputs, as_float64
from gradbalance.methods.registry import register

__all__ = ["FAMO"]

# Added to L_i − L_i* before the logarithm, as in the official code.
_EPS = 1e-8


@register
class FAMO(Method):
    r"""FAMO: balance the tasks' log-loss decrease with one loss weighting per step.

    Liu, Feng, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023. FAMO
    keeps task logits $\xi \in \mathbb R^K$, $z = \operatorname{softmax}(\xi)$, and moves the
    model along the gradient of $\sum_i z_i \log(L_i - L_i^\star)$, normalised:

    $$
    d = \sum_i w_i \nabla L_i, \qquad
    w_i = \frac{c\, z_i}{L_i - L_i^\star}, \qquad
    c = \Bigl(\sum_j \frac{z_j}{L_j - L_j^\star}\Bigr)^{-1},
    $$

    a loss weighting (one ordinary backward; ``GradBalancer`` backpropagates
    $\sum_i w_i L_i$ with $w$ detached). After the step the logits learn from how much each
    task's log-loss decreased, $\delta_i = \log(L_i(\theta_t) - L_i^\star) -
    \log(L_i(\theta_{t+1}) - L_i^\star)$:

    $$
    \xi \leftarrow \xi - \beta\,\bigl(J_z(\xi)^\top \delta + \gamma\,\xi\bigr), \qquad
    J_z(\xi)^\top \delta = z \odot (\delta - z^\top \delta),
    $$

    so the tasks that improved least get more weight. ``logit_optimizer="sgd"`` is exactly this
    formula; ``"adam"`` (default) is the official code's Adam on $\xi$ with the L2 term
    $\gamma\xi$ added to the gradient (``torch.optim.Adam(weight_decay=γ)``). $L^\star$
    (``min_losses``) is a known lower bound of each loss, 0 by default.

    **The post-step update, two ways.** The paper measures $L(\theta_{t+1})$ on the *same*
    batch after the step, which costs one more forward pass:

    * default: the losses of the *next* `GradBalancer.backward` (a new batch) serve as
      $L(\theta_{t+1})$; the logit update of step $t$ is computed with the weights of step
      $t+1$ (without side effects) and committed after that step. No extra forward.
    * exact: after ``opt.step()``, recompute the losses on the same batch and pass them to
      `observe`, which commits the logit update at once; the next ``backward`` then does
      not apply the default update for that step. Under `torch.distributed`, pass the losses
      averaged over the ranks (as ``backward`` uses them), or the ranks' logits drift apart.

    Deviations from the paper: the default mode uses the next batch's losses as the "after"
    losses (one forward cheaper, noisier $\delta$); call `observe` for the paper's exact update.
    $\log(L_i - L_i^\star + 10^{-8})$ as in the official code. The official code also clips the
    model's gradient norm (``max_norm=1``); that is the training loop's business
    (``torch.nn.utils.clip_grad_norm_`` works on ``GradBalancer``'s parameters as usual).
    Under gradient accumulation each ``backward`` counts as one FAMO step (the "before" losses
    of the next logit update are those of the last micro-batch).

    Args:
        lr: the logits' learning rate $\beta$ (0.025, the official code's default).
        gamma: the logits' decay $\gamma$ (0.01, the official code's default).
        logit_optimizer: ``"adam"`` (default, the official code) or ``"sgd"`` (the paper's
            formula).
        betas: Adam's $(\beta_1, \beta_2)$.
        eps: Adam's $\epsilon$.
        min_losses: $L^\star$, a lower bound of each loss: one value, a sequence in task order
            or a mapping task -> value. Every loss must be at least its $L^\star$.

    Examples:
        >>> import torch, gradbalance as gb
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.1), method="famo")
        >>> x = torch.randn(8, 3)
        >>> def losses():
        ...     out = model(x)
        ...     return {"a": out[:, 0].pow(2).mean() + 1, "b": out[:, 1].pow(2).mean() + 3}
        >>> opt.zero_grad()
        >>> w = opt.backward(losses())
        >>> opt.step()
        >>> with torch.no_grad():  # exact mode: the same batch after the step
        ...     updated = opt.method.observe(losses())
        >>> updated
        True
        >>> round(float(opt.method.task_weights.sum()), 6)
        1.0
    """

    name = "famo"
    requires = frozenset({LOSSES})
    paper = (
        "B. Liu, Y. Feng, P. Stone, Q. Liu. FAMO: Fast Adaptive Multitask Optimization. "
        "NeurIPS 2023."
    )
    stateful = True
    scale_invariant = "weights"

    logits: Tensor
    prev_losses: Tensor
    has_prev: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    logit_steps: Tensor

    def __init__(
        self,
        lr: float = 0.025,
        gamma: float = 0.01,
        logit_optimizer: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_losses: float | Sequence[float] | Mapping[str, float] = 0.0,
    ) -> None:
        super().__init__()
        kind, rate, betas_, eps_ = check_options("logit_optimizer", logit_optimizer, lr, betas, eps)
        decay = float(gamma)
        if not math.isfinite(decay) or decay < 0:
            raise OptionError(f"gamma must be a finite non-negative number, got {gamma!r}")
        if isinstance(min_losses, (int, float)):
            finite_float(min_losses)
        self.lr = rate
        self.gamma = decay
        self.logit_optimizer = kind
        self.betas = betas_
        self.eps = eps_
        self._min_spec = min_losses
        self._min: list[float] = []

    def build(self, tasks: tuple[str, ...]) -> None:
        mins = per_task(self._min_spec, tuple(tasks), "min_losses", finite_float)
        self._min = mins
        k = len(tasks)
        f64 = torch.float64
        self.register_buffer("logits", torch.zeros(k, dtype=f64))
        # The losses of the last applied step, waiting for their "after" losses.
        self.register_buffer("prev_losses", torch.zeros(k, dtype=f64))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        # State of the logits' Adam.
        self.register_buffer("exp_avg", torch.zeros(k, dtype=f64))
        self.register_buffer("exp_avg_sq", torch.zeros(k, dtype=f64))
        self.register_buffer("logit_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ pure computations
    def _losses(self, losses: Tensor, tasks: Sequence[str] | None = None) -> Tensor:
        if not self.is_bound:
            raise RuntimeError("FAMO is not bound to tasks yet; call bind(tasks) first")
        values = as_float64(losses).to(self.logits.device).reshape(-1)
        if values.shape != self.logits.shape:
            raise ValueError(
                f"got {values.numel()} losses, but FAMO is bound to {self.logits.numel()} tasks "
                f"{list(self.tasks or ())}"
            )
        gap = values - self._min_tensor()
        bad = [t for t, ok in zip(tasks or self.tasks or (), (gap >= 0).tolist()) if not ok]
        if bad:
            raise LossError(
                f"FAMO takes log(L_i - L_i*), but the loss of task(s) {bad} is below its lower "
                f"bound min_losses={self._min} (losses {values.tolist()}); pass min_losses "
                "below every loss"
            )
        return values

    def _min_tensor(self) -> Tensor:
        return torch.tensor(self._min, dtype=torch.float64, device=self.logits.device)

    def _log_gap(self, losses: Tensor) -> Tensor:
        return torch.log(losses - self._min_tensor() + _EPS)

    def logit_gradient(self, before: Tensor, after: Tensor, logits: Tensor | None = None) -> Tensor:
        r"""$J_z(\xi)^\top \delta$ for the losses ``before`` and ``after`` a step (pure)."""
        xi = self.logits if logits is None else logits
        delta = self._log_gap(as_float64(before)) - self._log_gap(as_float64(after))
        z = torch.softmax(xi, dim=0)
        return z * (delta - torch.dot(z, delta))

    def _logit_step(self, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """New ``(logits, exp_avg, exp_avg_sq, steps)`` after one step on ``grad`` (pure)."""
        grad = grad + self.gamma * self.logits
        steps = self.logit_steps + 1
        if self.logit_optimizer == "sgd":
            return self.logits - self.lr * grad, self.exp_avg, self.exp_avg_sq, steps
        direction, exp_avg, exp_avg_sq = adam_direction(
            grad, self.exp_avg, self.exp_avg_sq, int(steps), self.lr, self.betas, self.eps
        )
        return self.logits - direction, exp_avg, exp_avg_sq, steps

    def _pending(self, losses: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """The default-mode logit update that ``losses`` completes, or ``None`` (pure)."""
        if not bool(self.has_prev):
            return None
        return self._logit_step(self.logit_gradient(self.prev_losses, losses))

    def _commit(self, new: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        logits, exp_avg, exp_avg_sq, steps = new
        self.logits.copy_(logits)
        self.exp_avg.copy_(exp_avg)
        self.exp_avg_sq.copy_(exp_avg_sq)
        self.logit_steps.copy_(steps)

    # ------------------------------------------------------------------ method interface
    def weights(self, inputs: StepInputs) -> Tensor:
        losses = self._losses(inputs.losses, inputs.tasks)
        pending = self._pending(losses)
        xi = self.logits if pending is None else pending[0]
        z = torch.softmax(xi, dim=0)
        inv = z / (losses - self._min_tensor() + _EPS)
        return inv / inv.sum()

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        losses = self._losses(inputs.losses, inputs.tasks)
        pending = self._pending(losses)
        if pending is not None:
            self._commit(pending)
        self.prev_losses.copy_(losses)
        self.has_prev.fill_(True)

    def observe(self, losses: Mapping[str, Any] | Sequence[Any] | Tensor) -> bool:
        r"""Exact mode: commit the logit update with the losses after the step, same batch.

        Call it after ``opt.step()`` with the task losses recomputed on the batch of that step
        (under ``torch.no_grad()``): a dict task -> loss, a sequence in task order, or a
        tensor. The update uses $\delta_i = \log(L_i^\text{before} - L_i^\star) -
        \log(L_i^\text{after} - L_i^\star)$ with the losses of the step just taken as
        "before".

        Returns:
            ``True`` when the logits were updated; ``False`` (with a ``RuntimeWarning``)
            when no step was applied since the last `observe` (e.g. a skipped step).
        """
        if not self.is_bound:
            raise RuntimeError("FAMO is not bound to tasks yet: observe() follows a step")
        if isinstance(losses, Mapping):
            tasks = list(self.tasks or ())
            if set(map(str, losses)) != set(tasks):
                raise ValueError(
                    f"observe() got losses for tasks {sorted(map(str, losses))}, expected {tasks}"
                )
            values = [losses[t] for t in tasks]
        elif isinstance(losses, Tensor):
            values = list(losses.detach().reshape(-1))
        else:
            values = list(losses)
        after = torch.stack(
            [
                (v.detach() if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float64))
                .reshape(())
                .to(device="cpu", dtype=torch.float64)
                for v in values
            ]
        )
        if not bool(torch.isfinite(after).all()):
            raise ValueError(f"observe() got non-finite losses {after.tolist()}")
        after = self._losses(after)
        if not bool(self.has_prev):
            warnings.warn(
                "FAMO.observe(): no step was applied since the last observe() (skipped step?); "
                "the logits are left unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        self._commit(self._logit_step(self.logit_gradient(self.prev_losses, after)))
        self.has_prev.fill_(False)
        return True

    # ------------------------------------------------------------------ read-only views
    @property
    def task_weights(self) -> Tensor:
        r"""$z = \operatorname{softmax}(\xi)$ of the committed logits (detached copy)."""
        if not self.is_bound:
            raise RuntimeError("FAMO is not bound to tasks yet")
        return torch.softmax(self.logits, dim=0)

    def extra_repr(self) -> str:
        parts = [
            f"lr={self.lr}",
            f"gamma={self.gamma}",
            f"logit_optimizer={self.logit_optimizer!r}",
        ]
        if any(self._min) or not isinstance(self._min_spec, (int, float)):
            parts.append(f"min_losses={self._min_spec!r}")
        return join_repr(super().extra_repr(), *parts)
