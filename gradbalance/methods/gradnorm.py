"""GradNorm (Chen et al., ICML 2018): learn loss weights that balance gradient norms."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from gradbalance.errors import LossError, MissingInputError, OptionError
from gradbalance.methods._common import join_repr
from gradbalance.methods._inner_optim import adam_direction, check_options
from gradbalance.methods.base import LAST_SHARED_GRAMIAN, LOSSES, Method, StepInputs, as_float64
from gradbalance.methods.registry import register

__all__ = ["GradNorm"]

#: A weight step may take a weight down to this fraction of its value, never lower (so the
#: weights stay strictly positive); see "Deviations" in the class docstring.
_MIN_SHRINK = 0.5


@register
class GradNorm(Method):
    r"""GradNorm: tune the loss weights so that every task trains at a balanced rate.

    Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks*, ICML 2018. With ``W`` the last shared layer and
    ``w_i > 0`` the loss weights (``Σ w_i = K``):

    $$
    G_i = \|\nabla_W\, w_i L_i\| = w_i \|\nabla_W L_i\|,\quad
    \bar G = \tfrac1K \textstyle\sum_i G_i,\quad
    \tilde L_i = \frac{L_i(t)}{L_i(0)},\quad
    r_i = \frac{\tilde L_i}{\tfrac1K \sum_j \tilde L_j},
    $$

    $$
    L_\text{grad} = \sum_i \bigl|\, G_i - \bar G\, r_i^{\alpha} \bigr|,
    $$

    where the target ``Ḡ·r_i^α`` is held constant, ``Ḡ`` included: no gradient flows through
    it (the paper does so to keep the weights from drifting to zero). The network is trained
    on ``Σ w_i L_i`` with the current weights; the weights then take one step of their own
    optimizer on ``∂L_grad/∂w`` (no weight falling below half its value, see below) and are
    renormalised so that ``Σ w_i = K``.

    Because ``G_i = w_i‖∇_W L_i‖`` and the target is constant, the gradient is closed form:

    $$
    \frac{\partial L_\text{grad}}{\partial w_i}
    = \operatorname{sign}\bigl(G_i - \bar G r_i^\alpha\bigr)\,\|\nabla_W L_i\|,
    $$

    so no double backward is needed and nothing of ``L_grad`` leaks into the network's
    gradients (implementations that build ``L_grad`` with ``create_graph=True`` and call
    ``backward`` on it add its second-order gradient to the shared parameters). The norms
    ``‖∇_W L_i‖`` are the square roots of the diagonal of the last-shared-layer Gramian that
    ``GradBalancer`` computes (``K`` extra backwards restricted to ``W``). Name ``W``
    with ``GradBalancer(..., last_shared=model.last_layer)``; by default it is the last shared
    layer in execution order, found from the autograd graph (see ``GradBalancer``).

    ``L_i(0)`` are the losses of the first applied step. ``α`` is the asymmetry: ``0`` asks
    for equal gradient norms; the paper uses ``α = 1.5`` on NYUv2 and ``α = 0.12`` on its
    synthetic regression.

    Deviations from the paper: a step of the weights may shrink a weight at most to half its
    value, ``w_i ← max(w_i − Δ_i, w_i / 2)``, before the renormalisation, so the weights stay
    strictly positive (the paper does not say what happens to a weight that a step makes
    negative; it only requires ``w_i > 0``). Clamping at ``0`` instead would zero a weight whose
    target is below one step of the weights' optimizer (e.g. about ``0.02`` against Adam's step
    of about ``lr = 0.025`` on the paper's two-task toy with ``σ = (1, 100)``) and cut that
    task's gradient off entirely on such steps. A non-finite step of the weights is dropped
    with a warning. The paper does not give a separate learning rate for the weights;
    ``lr = 0.025`` is this library's default. With gradient accumulation the weights take one
    step per ``backward`` call.

    Args:
        alpha: the asymmetry ``α ≥ 0``.
        lr: the learning rate of the weights.
        weight_optimizer: ``"adam"`` (default) or ``"sgd"``: the optimizer of the weights,
            owned by the method (its state is in the method's ``state_dict``). Named so that it
            does not clash with ``GradBalancer``'s ``optimizer`` argument when the method
            is built by name.
        betas: Adam's ``(β1, β2)``.
        eps: Adam's ``ε``.

    Example:
        >>> import torch, gradbalance as gb
        >>> trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 8))
        >>> heads = torch.nn.Linear(8, 2)
        >>> params = [*trunk.parameters(), *heads.parameters()]
        >>> opt = gb.GradBalancer(torch.optim.Adam(params, lr=1e-3), method="gradnorm",
        ...                       alpha=1.5, shared=trunk, last_shared=trunk[2])
        >>> out = heads(trunk(torch.randn(16, 4)))
        >>> opt.zero_grad()
        >>> opt.backward([out[:, 0].pow(2).mean(), 10 * out[:, 1].pow(2).mean()])
        tensor([1., 1.])
        >>> opt.step()
        >>> round(float(opt.method.loss_weights.sum()), 6)  # the weights sum to K
        2.0
    """

    name = "gradnorm"
    requires = frozenset({LOSSES, LAST_SHARED_GRAMIAN})
    stateful = True
    paper = (
        "Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich. GradNorm: Gradient Normalization "
        "for Adaptive Loss Balancing in Deep Multitask Networks. ICML 2018."
    )

    weight: Tensor
    initial_losses: Tensor
    has_initial_losses: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    weight_steps: Tensor

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        weight_optimizer: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        a = float(alpha)
        if not math.isfinite(a) or a < 0:
            raise OptionError(f"alpha must be a finite non-negative number, got {alpha!r}")
        kind, rate, betas_, eps_ = check_options(
            "weight_optimizer", weight_optimizer, lr, betas, eps
        )
        self.alpha = a
        self.lr = rate
        self.weight_optimizer = kind
        self.betas = betas_
        self.eps = eps_

    def build(self, tasks: tuple[str, ...]) -> None:
        k = len(tasks)
        f64 = torch.float64
        self.register_buffer("weight", torch.ones(k, dtype=f64))
        self.register_buffer("initial_losses", torch.ones(k, dtype=f64))
        self.register_buffer("has_initial_losses", torch.zeros((), dtype=torch.bool))
        # State of the weights' own optimizer (Adam moments and step count).
        self.register_buffer("exp_avg", torch.zeros(k, dtype=f64))
        self.register_buffer("exp_avg_sq", torch.zeros(k, dtype=f64))
        self.register_buffer("weight_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ pure computations
    def _check(self, inputs: StepInputs) -> tuple[Tensor, Tensor]:
        if not self.is_bound:
            raise RuntimeError("GradNorm is not bound to tasks yet; call bind(tasks) first")
        if inputs.last_shared_gramian is None:
            raise MissingInputError(
                "GradNorm needs the Gramian of the task gradients on the last shared layer "
                "(StepInputs.last_shared_gramian); use it through GradBalancer"
            )
        device = self.weight.device
        losses = as_float64(inputs.losses).to(device)
        gram = as_float64(inputs.last_shared_gramian).to(device)
        if losses.shape != self.weight.shape or gram.shape != (losses.numel(), losses.numel()):
            raise ValueError(
                f"got {tuple(losses.shape)} losses and a {tuple(gram.shape)} Gramian for "
                f"{self.weight.numel()} tasks"
            )
        return losses, gram

    def _initial(self, losses: Tensor) -> Tensor:
        return self.initial_losses if bool(self.has_initial_losses) else losses

    def norms_and_targets(self, inputs: StepInputs) -> tuple[Tensor, Tensor]:
        """The weighted gradient norms ``G_i = w_i‖∇_W L_i‖`` and their targets ``Ḡ·r_i^α``.

        Pure: uses the current weights and ``L(0)`` (the current losses before the first step).
        """
        losses, gram = self._check(inputs)
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        g = self.weight * norms
        loss_ratio = losses / self._initial(losses)
        mean_ratio = loss_ratio.mean()
        if bool(mean_ratio > 0):
            rate = loss_ratio / mean_ratio
        else:  # every loss is 0: no task is behind
            rate = torch.ones_like(loss_ratio)
        target = g.mean() * rate**self.alpha
        return g, target

    def grad_loss(self, inputs: StepInputs) -> tuple[Tensor, Tensor]:
        """``L_grad`` and its closed-form gradient ``∂L_grad/∂w`` (target held constant).

        Pure: nothing is stored.
        """
        _, gram = self._check(inputs)
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        g, target = self.norms_and_targets(inputs)
        diff = g - target
        return diff.abs().sum(), torch.sign(diff) * norms

    # ------------------------------------------------------------------ method interface
    def weights(self, inputs: StepInputs) -> Tensor:
        losses, _ = self._check(inputs)
        if bool((losses < 0).any()):
            raise LossError(
                f"GradNorm needs non-negative losses for the loss ratios L_i(t)/L_i(0), got "
                f"{losses.tolist()}"
            )
        if not bool(self.has_initial_losses) and not bool((losses > 0).all()):
            raise LossError(
                "GradNorm takes L_i(0) from the first step and divides by it, but the first "
                f"losses are {losses.tolist()}; every loss must be positive"
            )
        return self.weight.clone()

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        losses, _ = self._check(inputs)
        _, grad = self.grad_loss(inputs)
        if not bool(self.has_initial_losses):
            self.initial_losses.copy_(losses)
            self.has_initial_losses.fill_(True)
        proposal = self.weight - self._step_direction(grad)
        # a step may shrink a weight by at most the factor _MIN_SHRINK (it never reaches 0)
        proposal = torch.maximum(proposal, _MIN_SHRINK * self.weight)
        total = proposal.sum()
        if not bool(total > 0) or not bool(torch.isfinite(proposal).all()):
            warnings.warn(
                "GradNorm: the weight step is not finite; the step of the weights is dropped. "
                "Lower GradNorm's lr.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.weight.copy_(proposal * (self.weight.numel() / total))

    def _step_direction(self, grad: Tensor) -> Tensor:
        """The update ``Δ`` (``w ← w − Δ``) of the weights' optimizer; advances its state."""
        if self.weight_optimizer == "sgd":
            return self.lr * grad
        self.weight_steps.add_(1)
        direction, exp_avg, exp_avg_sq = adam_direction(
            grad,
            self.exp_avg,
            self.exp_avg_sq,
            int(self.weight_steps),
            self.lr,
            self.betas,
            self.eps,
        )
        self.exp_avg.copy_(exp_avg)
        self.exp_avg_sq.copy_(exp_avg_sq)
        return direction

    # ------------------------------------------------------------------ read-only views
    @property
    def loss_weights(self) -> Tensor:
        """The current weights ``w`` (detached copy), in task order."""
        if not self.is_bound:
            raise RuntimeError("GradNorm is not bound to tasks yet")
        return self.weight.clone()

    def extra_repr(self) -> str:
        parts = [
            f"alpha={self.alpha}",
            f"lr={self.lr}",
            f"weight_optimizer={self.weight_optimizer!r}",
        ]
        return join_repr(super().extra_repr(), *parts)
