"""MoCo (Fernando et al., ICLR 2023): MGDA-style weights on tracked, bias-corrected gradients."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradbalance.errors import OptionError, OptionTypeError
from gradbalance.methods._common import join_repr
from gradbalance.methods.base import GRAMIAN, JACOBIAN, LOSSES, Method, StepInputs
from gradbalance.methods.registry import register
from gradbalance.solvers import project_simplex

__all__ = ["MoCo"]

_TRACKED = re.compile(r"tracked_(\d+)$")


def _positive(name: str, value: Any) -> float:
    x = float(value)
    if not math.isfinite(x) or x <= 0:
        raise OptionError(f"{name} must be a positive finite number, got {value!r}")
    return x


def _non_negative(name: str, value: Any) -> float:
    x = float(value)
    if not math.isfinite(x) or x < 0:
        raise OptionError(f"{name} must be a finite non-negative number, got {value!r}")
    return x


@register
class MoCo(Method):
    r"""MoCo: track each task's gradient with a moving average and weight the tracked gradients.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, *Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach*, ICLR 2023. Stochastic MGDA is
    biased because the min-norm weights of noisy gradients are not the min-norm weights of the
    true ones; MoCo tracks every task's gradient and updates the weights $\lambda$ by one
    projected-gradient step instead of solving the min-norm problem. At step $t$, with $h_i$
    the stochastic gradient of task $i$ on the shared parameters and $Y = [y_1, \dots, y_K]$:

    $$
    y_i \leftarrow y_i - \beta_t\,(y_i - h_i), \qquad
    \lambda \leftarrow \Pi_{\Delta}\bigl(\lambda - \gamma_t\,(Y^\top Y + \rho I)\,\lambda\bigr),
    \qquad
    d = Y \lambda = \sum_i \lambda_i y_i ,
    $$

    where $\Pi_\Delta$ is the Euclidean projection onto the simplex
    (`gradbalance.solvers.project_simplex`), $\beta_t = \beta / t^{\sigma_\beta}$ and
    $\gamma_t = \gamma / t^{\sigma_\gamma}$ ($t = 1, 2, \dots$), $y_i = 0$ and
    $\lambda = \mathbf 1 / K$ at the start. The shared parameters move along $d$ (new $y$, new
    $\lambda$); task-specific parameters get their own task's gradient. `weights` returns
    the new $\lambda$, `combine` builds $d$; both are pure, and `update` commits $y$,
    $\lambda$ and $t$ after the inner optimizer stepped, so a skipped step leaves them as they
    were.

    **Memory.** The tracked gradients $y_i$ are one buffer per shared tensor, of shape
    ``(K, *p.shape)`` in the gradients' dtype: ``K`` extra copies of the shared parameters
    ($K \times P$ numbers), created at the first applied step and carried by ``state_dict``.

    Deviations from the paper: the projection of each $y_i$ onto a ball of radius $L_i$ (the
    Lipschitz constant of task $i$, needed by the analysis only) is omitted, as in the
    authors' shared code. ``normalize=True`` rescales every task gradient to norm $L_i$
    (its loss) before tracking, $h_i = L_i\, g_i / (\|g_i\| + 10^{-8})$, as that code does;
    it is off by default. That code (and LibMTL) replaces the projection of $\lambda$ by a
    softmax; here the paper's projection is used. The defaults $\beta = 0.5$,
    $\sigma_\beta = 0.5$, $\gamma = 0.1$, $\sigma_\gamma = 0.5$, $\rho = 0$ are LibMTL's.
    The step is taken as $\lambda - \gamma_t\,(s - \min_i s_i)$ with
    $s = (Y^\top Y + \rho I)\lambda$, which has the same projection (a projection onto the
    simplex ignores a constant shift) and keeps the weights right at any gradient scale (without
    it, gradient norms of about $10^9$ made $\gamma_t s \approx 10^{17}$ swallow $\lambda$ and
    returned $\lambda = 0$). With gradient accumulation every ``backward`` of the step reads
    the state of the last
    applied step, and the state then tracks each micro-batch's gradients in turn (each one
    counts as a MoCo step). Use it on the shared *parameters*: the gradients w.r.t.
    ``features=`` belong to different samples at every step, so tracking them is meaningless.

    Args:
        beta: $\beta \in (0, 1]$, the tracking rate.
        beta_sigma: $\sigma_\beta \ge 0$, the decay exponent of $\beta_t$.
        gamma: $\gamma > 0$, the step size of $\lambda$.
        gamma_sigma: $\sigma_\gamma \ge 0$, the decay exponent of $\gamma_t$.
        rho: $\rho \ge 0$, the $\ell_2$ regularisation of the $\lambda$ subproblem.
        normalize: rescale each task gradient to norm $L_i$ before tracking.

    Examples:
        >>> import torch, gradbalance as gb
        >>> m = MoCo(beta=1.0, gamma=0.5)
        >>> m.bind(("a", "b"))
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> inputs = gb.methods.StepInputs(("a", "b"), torch.ones(2), jacobian=(J,))
        >>> lam = m.weights(inputs)  # Π(½·1 − ½·diag(1, 4)·½·1) = Π((¼, −½)) = (⅞, ⅛)
        >>> lam
        tensor([0.8750, 0.1250], dtype=torch.float64)
        >>> m.combine(inputs, lam)  # ⅞·(1, 0) + ⅛·(0, 2)
        [tensor([0.8750, 0.2500])]
    """

    name = "moco"
    requires = frozenset({LOSSES, GRAMIAN, JACOBIAN})
    paper = (
        "H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen. Mitigating "
        "Gradient Bias in Multi-objective Learning: A Provably Convergent Approach. ICLR 2023."
    )
    stateful = True

    lam: Tensor
    moco_steps: Tensor

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        b = _positive("beta", beta)
        if b > 1.0:
            raise OptionError(f"beta must lie in (0, 1], got {beta!r}")
        if not isinstance(normalize, bool):
            raise OptionTypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.beta = b
        self.beta_sigma = _non_negative("beta_sigma", beta_sigma)
        self.gamma = _positive("gamma", gamma)
        self.gamma_sigma = _non_negative("gamma_sigma", gamma_sigma)
        self.rho = _non_negative("rho", rho)
        self.normalize = normalize

    def build(self, tasks: tuple[str, ...]) -> None:
        k = len(tasks)
        self.register_buffer("lam", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.register_buffer("moco_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ state views
    def tracked(self, index: int) -> Tensor | None:
        """The tracked gradients $y$ of shared tensor ``index`` (``(K, *p.shape)``), or ``None``."""
        return self._buffers.get(f"tracked_{index}")

    def _step_sizes(self) -> tuple[float, float]:
        t = int(self.moco_steps) + 1
        return self.beta / t**self.beta_sigma, self.gamma / t**self.gamma_sigma

    # ------------------------------------------------------------------ pure computations
    def _check(self, inputs: StepInputs) -> tuple[Tensor | None, ...]:
        if not self.is_bound:
            raise RuntimeError("MoCo is not bound to tasks yet; call bind(tasks) first")
        if inputs.jacobian is None:
            raise ValueError(
                "MoCo reads the task gradients (StepInputs.jacobian); use it through "
                "GradBalancer with shared=..."
            )
        k = self.lam.numel()
        for i, row in enumerate(inputs.jacobian):
            if row is None:
                continue
            if row.shape[0] != k:
                raise ValueError(
                    f"Jacobian entry {i} has {row.shape[0]} rows, expected one per task ({k})"
                )
            y = self.tracked(i)
            if y is not None and y.shape != row.shape:
                raise ValueError(
                    f"MoCo tracks the gradient of shared tensor {i} with shape "
                    f"{tuple(y.shape)}, but got {tuple(row.shape)}; the shared tensors must "
                    "keep their shapes between steps (features= with varying batch sizes "
                    "cannot be tracked)"
                )
        return inputs.jacobian

    def _gradient_scales(self, inputs: StepInputs) -> Tensor | None:
        """$L_i / (\\|g_i\\| + 10^{-8})$ when ``normalize``, else ``None`` (pure)."""
        if not self.normalize:
            return None
        squared: Tensor | int  # 0 when no task reaches a shared tensor
        if inputs.gramian is not None:
            squared = inputs.gramian.diagonal()
        else:
            assert inputs.jacobian is not None
            rows = [r.detach().reshape(r.shape[0], -1) for r in inputs.jacobian if r is not None]
            squared = sum(r.to(torch.float64).pow(2).sum(dim=1) for r in rows)
        norms = torch.as_tensor(squared, dtype=torch.float64).clamp_min(0.0).sqrt()
        losses = inputs.losses.detach().to(torch.float64).to(norms.device)
        return losses / (norms + 1e-8)

    def _new_tracked(self, index: int, row: Tensor, beta: float, scales: Tensor | None) -> Tensor:
        """$y_i - \\beta_t (y_i - h_i)$ for shared tensor ``index`` (a new tensor)."""
        h = row.detach()
        if scales is not None:
            h = h * scales.to(device=h.device, dtype=h.dtype).reshape((-1,) + (1,) * (h.dim() - 1))
        y = self.tracked(index)
        if y is None:
            return h * beta
        return y.to(device=h.device, dtype=h.dtype) * (1.0 - beta) + h * beta

    def weights(self, inputs: StepInputs) -> Tensor:
        """The new $\\lambda = \\Pi_\\Delta(\\lambda - \\gamma_t (Y^\\top Y + \\rho I)\\lambda)$."""
        rows = self._check(inputs)
        beta, gamma = self._step_sizes()
        scales = self._gradient_scales(inputs)
        k = self.lam.numel()
        device = next((r.device for r in rows if r is not None), self.lam.device)
        gram = torch.zeros((k, k), dtype=torch.float64, device=device)
        for i, row in enumerate(rows):
            if row is None:
                continue
            flat = self._new_tracked(i, row, beta, scales).reshape(k, -1).to(torch.float64)
            gram += (flat @ flat.T).to(device)
        lam = self.lam.to(device)
        step = gram @ lam + self.rho * lam
        # Π_Δ(v) = Π_Δ(v + c·1): subtracting min(step) first changes nothing in exact
        # arithmetic, but keeps λ from being swallowed by γ_t·step when the gradients are large
        # (norms of 1e9 give steps of ~1e17, beyond float64's 1 + 2^-52 resolution of λ)
        return project_simplex(lam - gamma * (step - step.min()))

    def combine(self, inputs: StepInputs, weights: Tensor) -> list[Tensor | None]:
        """$d = \\sum_i \\lambda_i y_i$ with the new tracked gradients, tensor by tensor."""
        rows = self._check(inputs)
        beta, _ = self._step_sizes()
        scales = self._gradient_scales(inputs)
        out: list[Tensor | None] = []
        for i, row in enumerate(rows):
            if row is None:
                out.append(None)
                continue
            y = self._new_tracked(i, row, beta, scales)
            out.append(torch.tensordot(weights.to(device=y.device, dtype=y.dtype), y, dims=1))
        return out

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        rows = self._check(inputs)
        beta, _ = self._step_sizes()
        scales = self._gradient_scales(inputs)
        for i, row in enumerate(rows):
            if row is None:
                continue
            y = self._new_tracked(i, row, beta, scales)
            current = self.tracked(i)
            if current is None:
                self.register_buffer(f"tracked_{i}", y)
            else:
                current.copy_(y)
        self.lam.copy_(weights.detach().to(self.lam))
        self.moco_steps.add_(1)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # The tracked gradients are created at the first step: make the loaded state's set of
        # buffers exist (and drop ours that it does not have) before loading.
        saved: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith(prefix) and _TRACKED.fullmatch(key[len(prefix) :]):
                saved[key[len(prefix) :]] = value
        for name in [n for n in self._buffers if _TRACKED.fullmatch(n)]:
            if name not in saved:
                del self._buffers[name]
        for name, value in saved.items():
            if self._buffers.get(name) is None:
                self.register_buffer(name, torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        parts = [
            f"beta={self.beta}",
            f"beta_sigma={self.beta_sigma}",
            f"gamma={self.gamma}",
            f"gamma_sigma={self.gamma_sigma}",
            f"rho={self.rho}",
        ]
        if self.normalize:
            parts.append("normalize=True")
        return join_repr(super().extra_repr(), *parts)
