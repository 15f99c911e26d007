"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among the tasks."""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings

import torch
from torch import Tensor

from gradbalance.errors import OptionError, SolverError
from gradbalance.methods._common import checked_gramian
from gradbalance.methods.base import GRAMIAN, LOSSES, Method, StepInputs
from gradbalance.methods.registry import register
from gradbalance.solvers.nash import CVXPY_SOLVERS, nash_bargaining

__all__ = ["NashMTL"]

logger = logging.getLogger(__name__)

_SOLVERS = ("auto", "cvxpy", "newton")
_ON_FAILURE = ("raise", "warn")


@register
class NashMTL(Method):
    r"""Nash-MTL: combine the task gradients by the Nash bargaining solution.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, *Multi-Task Learning as a
    Bargaining Game*, ICML 2022. The update $d = \sum_i \alpha_i g_i$ maximises
    $\sum_i \log \langle g_i, d\rangle$ over a ball; its weights solve

    $$
    G\alpha = 1/\alpha \quad(\text{elementwise}),\qquad \alpha > 0,
    \qquad\text{i.e.}\quad \alpha_i\,\langle g_i, d\rangle = 1\ \ \forall i .
    $$

    Every task's loss decreases to first order ($\langle g_i, d\rangle = 1/\alpha_i > 0$), and
    the update does not change when the losses are rescaled, together or each by its own
    factor ($\alpha_i$ absorbs $1/c_i$). A solution exists exactly when some direction
    decreases every loss (0 is not in the convex hull of the gradients); otherwise, or on any
    solver failure, `gradbalance.errors.SolverError` is raised (``on_failure="raise"``,
    default) or a `RuntimeWarning` is issued and the previous step's weights are reused
    (``on_failure="warn"``, the official code's behaviour, made loud). There is never a silent
    fallback to equal weights.

    Solvers (`gradbalance.solvers.nash.nash_bargaining`):

    - ``"cvxpy"``: the paper's sequential convex procedure (linearise the concave part
      $\varphi(\alpha) = \sum_i \log\alpha_i + \log(G\alpha)_i$, solve the convex subproblem,
      repeat; at most ``max_iter`` = 20 subproblems, warm-started from the previous step's
      $\alpha$) with cvxpy's ``CLARABEL`` (default) or ``SCS`` solver, chosen by
      ``cvxpy_solver``. ECOS, which the official code uses and recent cvxpy no longer ships,
      is never used. cvxpy is an optional dependency (``pip install 'gradbalance[cvxpy]'``).
    - ``"newton"``: no extra dependency; damped Newton steps on the equivalent strictly
      convex, self-concordant problem $\min_y \tfrac12\lVert y\rVert^2 - \sum_i \log (Ry)_i$
      with $G = RR^\top$, converged to machine precision.
    - ``"auto"`` (default): ``"cvxpy"`` when cvxpy is importable, else ``"newton"``; the
      choice is made once, when the method is built (see `solver_used`).

    Both are checked on the residual $\max_i |\alpha_i (G\alpha)_i - 1| \le$ ``tol``, raised
    to the float64 rounding floor of the problem where that is larger (ill-conditioned
    Gramians); the checks are relative to the problem, so tiny gradients or a loss scaled by
    ``1e-8`` are solved like any other (see `gradbalance.solvers.nash.nash_bargaining`).

    Deviations from the official code: ``update_weights_every`` (default 1) reuses the
    weights between updates as the official option does, but the Gramian is still computed
    every step (only the solver is skipped). The official code clips the shared gradient's norm
    to ``max_norm = 1``; we do not (use ``torch.nn.utils.clip_grad_norm_`` if wanted). The
    official code normalises $G$ by its Frobenius norm inside the problem; we solve it for the
    unit-length gradients and rescale $\alpha$ (the same solution, better conditioned). The
    official code weights the losses with $\alpha$, so task-specific parameters also receive
    $\alpha_i g_i$; here (as in every gradient method of this library) they receive their own
    task's gradient.

    Args:
        solver: ``"auto"``, ``"cvxpy"`` or ``"newton"``.
        update_weights_every: solve every this many steps; reuse the weights in between.
        cvxpy_solver: ``"CLARABEL"`` or ``"SCS"``.
        max_iter: iteration budget (default: 20 subproblems for cvxpy, 100 Newton steps).
        tol: accepted residual, or the problem's rounding floor if larger (default ``1e-9``
            for Newton, ``1e-5`` for cvxpy with CLARABEL, ``1e-3`` with SCS).
        on_failure: ``"raise"`` or ``"warn"`` (see above).

    Examples:
        >>> import torch, gradbalance as gb
        >>> J = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
        >>> m = gb.methods.get("nash-mtl", solver="newton")
        >>> m.bind(("a", "b"))
        >>> G = J @ J.T
        >>> alpha = m.weights(gb.methods.StepInputs(("a", "b"), torch.ones(2), gramian=G))
        >>> (alpha * (G @ alpha)).round(decimals=6).tolist()  # the condition α_i (Gα)_i = 1
        [1.0, 1.0]
    """

    name = "nash-mtl"
    requires = frozenset({LOSSES, GRAMIAN})
    paper = (
        "A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya. "
        "Multi-Task Learning as a Bargaining Game. ICML 2022."
    )
    stateful = True
    extra_dependencies = ("cvxpy",)
    scale_invariant = "update"
    non_conflicting = True

    alpha: Tensor
    has_alpha: Tensor

    def __init__(
        self,
        solver: str = "auto",
        *,
        update_weights_every: int = 1,
        cvxpy_solver: str = "CLARABEL",
        max_iter: int | None = None,
        tol: float | None = None,
        on_failure: str = "raise",
    ) -> None:
        super().__init__()
        if solver not in _SOLVERS:
            raise OptionError(f"solver must be one of {_SOLVERS}, got {solver!r}")
        if cvxpy_solver not in CVXPY_SOLVERS:
            raise OptionError(f"cvxpy_solver must be one of {CVXPY_SOLVERS}, got {cvxpy_solver!r}")
        if (
            isinstance(update_weights_every, bool)
            or not isinstance(update_weights_every, int)
            or update_weights_every < 1
        ):
            raise OptionError(
                f"update_weights_every must be a positive int, got {update_weights_every!r}"
            )
        if max_iter is not None and (
            isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1
        ):
            raise OptionError(f"max_iter must be a positive int or None, got {max_iter!r}")
        if tol is not None and not (math.isfinite(float(tol)) and float(tol) > 0):
            raise OptionError(f"tol must be a positive number or None, got {tol!r}")
        if on_failure not in _ON_FAILURE:
            raise OptionError(f"on_failure must be one of {_ON_FAILURE}, got {on_failure!r}")
        if solver == "auto":
            solver = "cvxpy" if importlib.util.find_spec("cvxpy") is not None else "newton"
            logger.info("Nash-MTL: solver='auto' uses %r", solver)
        elif solver == "cvxpy" and importlib.util.find_spec("cvxpy") is None:
            raise ImportError(
                "Nash-MTL's solver='cvxpy' needs the optional dependency cvxpy: "
                "pip install 'gradbalance[cvxpy]', or use solver='newton' (no extra dependency)"
            )
        self.solver = solver
        self.cvxpy_solver = cvxpy_solver
        self.update_weights_every = update_weights_every
        self.max_iter = max_iter
        self.tol = None if tol is None else float(tol)
        self.on_failure = on_failure

    @property
    def solver_used(self) -> str:
        """The solver in use: ``"cvxpy"`` or ``"newton"`` (``"auto"`` resolved)."""
        return self.solver

    def build(self, tasks: tuple[str, ...]) -> None:
        # the weights of the last applied step (warm start, and reused between updates)
        self.register_buffer("alpha", torch.zeros(len(tasks), dtype=torch.float64))
        self.register_buffer("has_alpha", torch.zeros((), dtype=torch.bool))

    def weights(self, inputs: StepInputs) -> Tensor:
        if not self.is_bound:
            raise RuntimeError("NashMTL is not bound to tasks yet; call bind(tasks) first")
        g = checked_gramian(inputs, "Nash-MTL")
        have = bool(self.has_alpha)
        previous = self.alpha.to(g.device)
        if have and inputs.step % self.update_weights_every != 0:
            return previous.clone()
        try:
            return nash_bargaining(
                g,
                solver=self.solver,
                cvxpy_solver=self.cvxpy_solver,
                init=previous if have else None,
                tol=self.tol,
                max_iter=self.max_iter,
            )
        except SolverError as e:
            if self.on_failure == "warn" and have:
                warnings.warn(
                    f"Nash-MTL: the bargaining problem failed at step {inputs.step} ({e}; "
                    f"tasks {', '.join(f'{i}={t}' for i, t in enumerate(inputs.tasks))}); "
                    "reusing the previous step's weights (on_failure='warn')",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return previous.clone()
            hint = (
                ""
                if self.on_failure == "raise"
                else " (on_failure='warn' has no previous weights to reuse at the first step)"
            )
            order = ", ".join(f"{i}={t}" for i, t in enumerate(inputs.tasks))
            raise SolverError(f"Nash-MTL (tasks {order}): {e}{hint}") from e

    def update(self, inputs: StepInputs, weights: Tensor) -> None:
        if not self.is_bound:
            raise RuntimeError("NashMTL is not bound to tasks yet; call bind(tasks) first")
        self.alpha.copy_(weights.detach().to(self.alpha))
        self.has_alpha.fill_(True)

    def extra_repr(self) -> str:
        parts = [f"solver={self.solver!r}"]
        if self.solver == "cvxpy":
            parts.append(f"cvxpy_solver={self.cvxpy_solver!r}")
        if self.update_weights_every != 1:
            parts.append(f"update_weights_every={self.update_weights_every}")
        if self.on_failure != "raise":
            parts.append(f"on_failure={self.on_failure!r}")
        return ", ".join(parts)
