"""Benchmark of the min-norm (MGDA) solver: median solve time and optimality gap per K.

Compares ``gradbalance.solvers.min_norm`` with

- cvxpy + Clarabel (an exact reference, general-purpose conic solver);
- ``published``: our re-implementation of the published solver (pairwise start + Frank-Wolfe,
  Python loops; ``benchmarks/published_mgda.py``);
- TorchJD's ``MGDAWeighting`` and LibMTL's ``MGDA`` when installed (optional peers:
  ``pip install --no-deps torchjd``; ``pip install --no-deps LibMTL``, whose package import
  needs torchvision, which this script replaces by a stub module before importing LibMTL).

Gramians are ``G = J Jᵀ`` with ``J`` of shape ``K x P``, ``P`` in ``[K, 4K]``, drawn from three
families in turn: Gaussian rows (about half of the task pairs conflict), rows sharing one
component with random signs (strong conflicts), rows sharing one positive component (mostly
aligned tasks). Each method solves every Gramian ``--repeats`` times; a Gramian's time is the
median of those, and the table reports the median over Gramians. Gaps are relative to
``max(diag G)`` and maximised over the Gramians:

- ``gap``: the Frank-Wolfe duality gap ``wᵀGw - min_i (Gw)_i``, a certificate that needs no
  reference (it bounds the suboptimality);
- ``subopt``: ``f(w) - f_best`` with ``f_best`` the smallest objective any method reached.

Both are measured in float64 on the weights put exactly on the simplex (clipped at 0 and divided
by their sum; this only matters for peers working in float32).

Usage::

    python benchmarks/solver.py                 # K in 2 4 8 16 40 100, 30 Gramians each
    python benchmarks/solver.py --ks 4 40 --n 10 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import stub_torchvision
from published_mgda import published_min_norm

from gradbalance.solvers import min_norm

Solver = Callable[[torch.Tensor, torch.Tensor], object]
SAFETY_CAP = 100_000  # iterations of the published Frank-Wolfe loop before we stop it
PUBLISHED = "published (ours, numpy)"


def make_problems(k: int, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` pairs ``(J, G)`` in float64, cycling through the three families."""
    rng = np.random.default_rng([seed, k])
    out = []
    for i in range(n):
        p = int(rng.integers(k, 4 * k + 1))
        j = rng.standard_normal((k, p))
        shared = 2.0 * rng.standard_normal(p)
        if i % 3 == 1:
            j += rng.choice([-1.0, 1.0], (k, 1)) * shared
        elif i % 3 == 2:
            j += shared
        jt = torch.from_numpy(j)
        out.append((jt, jt @ jt.T))
    return out


def _cvxpy() -> Solver | str:
    try:
        import cvxpy as cp
    except Exception as exc:  # pragma: no cover - optional
        return f"not installed ({type(exc).__name__})"

    def solve(j: torch.Tensor, g: torch.Tensor):
        gn = (g / g.diagonal().max()).numpy()
        w = cp.Variable(g.shape[0])
        objective = cp.Minimize(cp.quad_form(w, cp.psd_wrap(gn)))
        cp.Problem(objective, [w >= 0, cp.sum(w) == 1]).solve(solver=cp.CLARABEL)
        return w.value

    return solve


def _torchjd() -> Solver | str:
    try:
        from torchjd.aggregation import MGDAWeighting
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"
    weighting = MGDAWeighting()
    return lambda j, g: weighting(g)


def _libmtl() -> Solver | str:
    stub_torchvision()
    try:
        from LibMTL.weighting.MGDA import MGDA
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"
    weighting = MGDA()
    # LibMTL works on the gradients themselves, in float32 (its weights are created in float32)
    return lambda j, g: weighting._find_min_norm_element(j.float())


def _ours() -> Solver:
    return lambda j, g: min_norm(g)


CAP_HITS: dict[int, int] = {}


def _published() -> Solver:
    def solve(j: torch.Tensor, g: torch.Tensor):
        w, steps = published_min_norm(g.numpy(), safety_cap=SAFETY_CAP, return_steps=True)
        if steps >= SAFETY_CAP:  # the published loop would not have stopped
            CAP_HITS[g.shape[0]] = CAP_HITS.get(g.shape[0], 0) + 1
        return w

    return solve


def _as_weights(w) -> torch.Tensor:
    """float64 weights put exactly on the simplex (float32 peers sum to 1 only to ~1e-7, which
    would otherwise let an infeasible point look better than the optimum)."""
    w = torch.as_tensor(np.asarray(w.detach().cpu() if torch.is_tensor(w) else w, dtype=float))
    w = w.clamp_min(0)
    return w / w.sum()


def relative_gap(g: torch.Tensor, w: torch.Tensor) -> float:
    gw = g @ w
    return float((w @ gw - gw.min()) / g.diagonal().max())


def run(args: argparse.Namespace) -> list[dict]:
    peers: dict[str, Solver | str] = {
        "gradbalance": _ours(),
        "cvxpy (Clarabel)": _cvxpy(),
        PUBLISHED: _published(),
        "TorchJD MGDAWeighting": _torchjd(),
        "LibMTL MGDA": _libmtl(),
    }
    rows = []
    for k in args.ks:
        problems = make_problems(k, args.n, args.seed)
        weights: dict[str, list[torch.Tensor]] = {}
        times: dict[str, list[float]] = {}
        for name, solve in peers.items():
            if isinstance(solve, str):
                continue
            solve(*problems[0])  # warm-up (imports, caches)
            if name == PUBLISHED:
                CAP_HITS.pop(k, None)  # count timed solves only
            weights[name], times[name] = [], []
            spent = 0.0
            for j, g in problems:
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    w = solve(j, g)
                    ts.append(time.perf_counter() - t0)
                weights[name].append(_as_weights(w))
                times[name].append(statistics.median(ts))
                spent += sum(ts)
                if spent > args.budget:  # keep slow peers from dominating the run
                    break
        n_min = min(len(v) for v in weights.values())
        best = [
            min(float(weights[m][i] @ problems[i][1] @ weights[m][i]) for m in weights)
            for i in range(n_min)
        ]
        ours_time = statistics.median(times["gradbalance"])
        for name, solve in peers.items():
            if isinstance(solve, str):
                rows.append({"method": name, "K": k, "status": solve})
                continue
            ws = weights[name]
            scale = [float(problems[i][1].diagonal().max()) for i in range(len(ws))]
            rows.append(
                {
                    "method": name,
                    "K": k,
                    "n": len(ws),
                    "ms": 1e3 * statistics.median(times[name]),
                    "ratio": statistics.median(times[name]) / ours_time,
                    "gap": max(relative_gap(problems[i][1], w) for i, w in enumerate(ws)),
                    "subopt": max(
                        (float(ws[i] @ problems[i][1] @ ws[i]) - best[i]) / scale[i]
                        for i in range(n_min)
                    ),
                }
            )
        print(f"K={k} done", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"# min-norm solver benchmark, {datetime.date.today()}, {platform.python_version()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
        f"{args.n} Gramians per K, {args.repeats} repeats"
    )
    print()
    print("| method | K | n | median ms | time / ours | max rel. gap | max rel. subopt |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "status" in r:
            print(f"| {r['method']} | {r['K']} | | {r['status']} | | | |")
            continue
        print(
            f"| {r['method']} | {r['K']} | {r['n']} | {r['ms']:.3f} | {r['ratio']:.1f}x | "
            f"{max(r['gap'], 0.0):.1e} | {max(r['subopt'], 0.0):.1e} |"
        )
    if CAP_HITS:
        hits = ", ".join(f"K={k}: {n}" for k, n in sorted(CAP_HITS.items()))
        print()
        print(
            f"published: timed solves cut at {SAFETY_CAP} Frank-Wolfe iterations ({hits}): "
            "on an edge-optimal point the clipped step oscillates forever; elsewhere the loop "
            "is only slow (see published_mgda.py)."
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 40, 100])
    parser.add_argument("--n", type=int, default=30, help="Gramians per K")
    parser.add_argument("--repeats", type=int, default=5, help="timed solves per Gramian")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds per method and K before stopping"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print_table(run(args), args)


if __name__ == "__main__":
    main()
