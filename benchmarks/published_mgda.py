"""Our own re-implementation of the published MGDA min-norm solver, for benchmarking only.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018: Algorithm 2
(Frank-Wolfe over the simplex) started, as in the authors' released solver, from the best pair
of tasks. Written from the paper and the behaviour described in gradbalance issue 3, not copied
from any implementation. Faithful on purpose, including what we consider defects:

- the pairwise initialisation loops over all K(K-1)/2 pairs in Python;
- the two-point solver clips the end points to 0.999 / 0.001 instead of 1 / 0;
- the loop stops when the L1 change of the weights falls below 1e-5 (``STOP_CRIT``); its
  iteration cap (250) is never reached because the counter is never incremented.

The only addition is ``safety_cap`` (default 10^5 iterations), so a benchmark cannot hang. It *is*
reached: when the current point is already optimal on an edge of the simplex, the clipped
two-point step still moves it by 0.001 towards a vertex, the next step moves it back, and the L1
change never falls below 1e-5, so the published loop would run forever (one Gramian of 30 at
K = 4 in ``benchmarks/solver.py``; at larger K the cap also cuts runs that are merely slow, as
Frank-Wolfe converges sublinearly). Not part of the library; see ``gradbalance.solvers.min_norm``.
"""

from __future__ import annotations

import numpy as np

STOP_CRIT = 1e-5
MAX_ITER = 250


def _two_point(v1v1: float, v1v2: float, v2v2: float) -> tuple[float, float]:
    """min over gamma in [0, 1] of |gamma x1 + (1 - gamma) x2|^2 from the three inner products.

    Returns (gamma, cost). As published, the end points are clipped to 0.999 and 0.001.
    """
    if v1v2 >= v1v1:  # x1 itself is the closest point of the segment
        return 0.999, v1v1
    if v1v2 >= v2v2:  # x2 is
        return 0.001, v2v2
    gamma = (v2v2 - v1v2) / (v1v1 + v2v2 - 2.0 * v1v2)
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _best_pair(gram: np.ndarray) -> tuple[int, int, float]:
    """Solve every two-task problem (Python loop over pairs) and keep the cheapest."""
    k = gram.shape[0]
    best = (0, 1, 0.5)
    best_cost = np.inf
    for i in range(k):
        for j in range(i + 1, k):
            gamma, cost = _two_point(gram[i, i], gram[i, j], gram[j, j])
            if cost < best_cost:
                best_cost = cost
                best = (i, j, gamma)
    return best


def published_min_norm(
    gram: np.ndarray, safety_cap: int = 100_000, return_steps: bool = False
) -> np.ndarray | tuple[np.ndarray, int]:
    """Weights of the published solver (pairwise start + Frank-Wolfe) for one Gramian.

    Args:
        gram: (K, K) Gramian as a float64 numpy array.
        safety_cap: hard iteration limit added for benchmarking (not in the original).
        return_steps: also return the number of Frank-Wolfe steps taken (``safety_cap`` when
            the published loop would not have stopped).

    Returns:
        (K,) weights on the simplex, or ``(weights, steps)``.
    """
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    sol = np.zeros(k)
    if k == 1:
        sol[0] = 1.0
        return (sol, 0) if return_steps else sol
    i, j, gamma = _best_pair(gram)
    sol[i], sol[j] = gamma, 1.0 - gamma
    if k < 3:
        return (sol, 0) if return_steps else sol
    iter_count = 0
    steps = 0
    while iter_count < MAX_ITER and steps < safety_cap:  # iter_count stays 0, as published
        steps += 1
        t = int(np.argmin(gram @ sol))
        v1v1 = float(sol @ gram @ sol)
        v1v2 = float(sol @ gram[:, t])
        v2v2 = float(gram[t, t])
        nc, _ = _two_point(v1v1, v1v2, v2v2)
        new_sol = nc * sol
        new_sol[t] += 1.0 - nc
        if np.abs(new_sol - sol).sum() < STOP_CRIT:
            break
        sol = new_sol
    return (sol, steps) if return_steps else sol
