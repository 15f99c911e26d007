"""Hand-built Jacobians (rows = task gradients), hypothesis strategies and end-to-end helpers
shared by the tests of the Gramian methods (PCGrad, CAGrad, Nash-MTL, IMTL-G, Aligned-MTL,
UPGrad, GradVac). The resume check is `tests.methods.resume.check_resume`."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

import gradbalance as gb
import gradbalance.methods.aligned_mtl
import gradbalance.methods.cagrad
import gradbalance.methods.gradvac
import gradbalance.methods.imtl_g
import gradbalance.methods.nash_mtl
import gradbalance.methods.pcgrad
import gradbalance.methods.upgrad  # the imports above register the methods
from gradbalance.methods import Method, StepInputs
from tests.conftest import MultiHeadNet

F64 = torch.float64

#: Two gradients at an obtuse angle, different lengths.
TWO_CONFLICT = [[1.0, 0.0, 0.0], [-2.0, 1.0, 0.5]]
#: Two gradients at an acute angle.
TWO_AGREE = [[1.0, 0.5, 0.0], [0.5, 2.0, 1.0]]
#: Three gradients in R^4, each pair conflicting, different lengths.
THREE_CONFLICT = [
    [1.0, 0.2, 0.0, 0.3],
    [-0.7, 1.5, 0.1, 0.0],
    [-0.4, -0.9, 2.0, -0.2],
]
#: Three gradients with only non-negative inner products.
THREE_AGREE = [[1.0, 0.0, 0.5], [0.3, 2.0, 0.0], [0.0, 0.4, 0.7]]
#: Two orthogonal gradients of lengths 3 and 1.
ORTHOGONAL = [[3.0, 0.0], [0.0, 1.0]]
#: Four gradients in R^2 (rank 2 < K = 4).
RANK_DEFICIENT = [[1.0, 0.2], [0.5, 1.0], [1.5, 1.2], [-0.3, 0.8]]

HAND_BUILT = {
    "two_conflict": TWO_CONFLICT,
    "two_agree": TWO_AGREE,
    "three_conflict": THREE_CONFLICT,
    "three_agree": THREE_AGREE,
    "orthogonal": ORTHOGONAL,
    "rank_deficient": RANK_DEFICIENT,
}


def jac(rows) -> torch.Tensor:
    """A Jacobian (K, P) in float64."""
    return torch.as_tensor(rows, dtype=F64).clone()


def tasks_of(k: int) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(k))


def step_inputs(J: torch.Tensor, step: int = 0) -> StepInputs:
    k = J.shape[0]
    return StepInputs(
        tasks=tasks_of(k), losses=torch.ones(k, dtype=F64), gramian=J @ J.T, step=step
    )


def weights_of(method: Method, J: torch.Tensor, step: int = 0) -> torch.Tensor:
    """The method's weights for the Jacobian ``J`` (binding the method if needed)."""
    if not method.is_bound:
        method.bind(tasks_of(J.shape[0]))
    return method.weights(step_inputs(J, step))


def update_of(method: Method, J: torch.Tensor, step: int = 0) -> torch.Tensor:
    """The shared update ``Jᵀw`` the method produces for ``J``."""
    return weights_of(method, J, step) @ J


# ----------------------------------------------------------------------- hypothesis
@st.composite
def jacobians(
    draw,
    min_k: int = 2,
    max_k: int = 5,
    full_rank: bool = False,
    feasible: bool = False,
    scales: bool = True,
):
    """Random Jacobians ``(K, P)`` in float64.

    ``full_rank``: P >= K (independent rows almost surely). ``feasible``: a common component
    makes a direction that decreases every task exist (0 not in the convex hull). ``scales``:
    rows scaled by e^[-2, 2].
    """
    seed = draw(st.integers(0, 2**32 - 1))
    k = draw(st.integers(min_k, max_k))
    rng = np.random.default_rng(seed)
    p = int(rng.integers(k, 2 * k + 3)) if full_rank else int(rng.integers(1, 2 * k + 3))
    J = rng.standard_normal((k, p))
    if feasible:
        common = rng.standard_normal(p)
        common /= np.linalg.norm(common)
        J = J + (1.5 + np.abs(J @ common))[:, None] * common[None, :]
    if scales:
        J = J * np.exp(rng.uniform(-2, 2, (k, 1)))
    return torch.from_numpy(J)


def permutations(k: int):
    return st.permutations(list(range(k)))


# ----------------------------------------------------------------------- end-to-end
def make_net(seed: int = 0, num_tasks: int = 3) -> MultiHeadNet:
    return MultiHeadNet("mlp", num_tasks=num_tasks, seed=seed).double()


def make_balancer(model: MultiHeadNet, method: Method | str, **kw) -> gb.GradBalancer:
    return gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.05), method=method, shared=model.trunk, **kw
    )


def batch(model: MultiHeadNet, t: int):
    x, y = model.inputs(batch=16, seed=t)
    return x.double(), y.double()


def check_training_step(method: Method, num_tasks: int = 3) -> torch.Tensor:
    """One step through `GradBalancer`: the trunk receives ``Σ w_i g_i`` with the method's
    weights for the Gramian of the per-task gradients (both recomputed here with autograd),
    each head its own task's gradient, and the parameters move. Returns the weights."""
    model = make_net(num_tasks=num_tasks)
    opt = make_balancer(model, method)
    x, y = batch(model, 0)
    losses = model.losses(x, y)
    trunk = list(model.trunk.parameters())
    per_task = [torch.autograd.grad(loss, trunk, retain_graph=True) for loss in losses.values()]
    head_grads = [
        torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        for loss, head in zip(losses.values(), model.heads)
    ]
    J = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in per_task])
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    w = opt.backward(losses)
    assert w.shape == (num_tasks,) and bool(torch.isfinite(w).all())
    gram = opt.last_gramian
    torch.testing.assert_close(gram, J @ J.T, rtol=1e-10, atol=1e-12)
    # the weights the balancer used (pure: computing them again does not change the method)
    expected_w = method.weights(
        StepInputs(tuple(losses), torch.stack(list(losses.values())).detach(), gramian=gram)
    )
    torch.testing.assert_close(w, expected_w.to(w.dtype))
    for i, p in enumerate(trunk):
        expected = sum(expected_w[t] * per_task[t][i] for t in range(num_tasks))
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)
    for head, grads in zip(model.heads, head_grads):
        for p, g in zip(head.parameters(), grads):
            torch.testing.assert_close(p.grad, g)
    opt.step()
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(bool(torch.isfinite(p).all()) for p in after)
    return expected_w


def run(opt: gb.GradBalancer, model: MultiHeadNet, steps: range) -> list[torch.Tensor]:
    out = []
    for t in steps:
        x, y = batch(model, t)
        opt.zero_grad()
        out.append(opt.backward(model.losses(x, y)).clone())
        opt.step()
    return out
