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


#: The Gramian families (``--families``): the first three are the original mix.
FAMILIES = ("gaussian", "conflicting", "aligned", "rank_deficient", "duplicated", "anti_collinear")


def make_jacobian(family: str, k: int, rng: np.random.Generator) -> np.ndarray:
    """One ``K x P`` Jacobian of the family.

    - ``gaussian``: Gaussian rows, ``P`` in ``[K, 4K]`` (about half the task pairs conflict);
    - ``conflicting``: the same plus a shared component with random signs (strong conflicts);
    - ``aligned``: the same plus a shared positive component (mostly aligned tasks);
    - ``rank_deficient``: Gaussian rows in ``P = max(1, K // 2)`` dimensions: rank ``K/2``, and
      by Wendel's theorem (``K`` symmetric points in ``R^P``) the origin is in the convex hull
      of the gradients with probability 1/2 (exactly, for even ``K``);
    - ``duplicated``: ``ceil(K / 2)`` distinct Gaussian rows, each task a copy of one of them;
    - ``anti_collinear``: pairs of nearly opposite gradients, ``g`` and ``-c g + 1e-6 noise``
      (``c`` log-uniform in ``[0.5, 2]``), the rest Gaussian: near-singular supports.
    """
    p = int(rng.integers(k, 4 * k + 1))
    if family in ("gaussian", "conflicting", "aligned"):
        j = rng.standard_normal((k, p))
        shared = 2.0 * rng.standard_normal(p)
        if family == "conflicting":
            j += rng.choice([-1.0, 1.0], (k, 1)) * shared
        elif family == "aligned":
            j += shared
        return j
    if family == "rank_deficient":
        return rng.standard_normal((k, max(1, k // 2)))
    if family == "duplicated":
        base = rng.standard_normal(((k + 1) // 2, p))
        rows = np.concatenate([np.arange(len(base)), rng.integers(0, len(base), k - len(base))])
        return base[rng.permutation(rows)]
    if family == "anti_collinear":
        j = rng.standard_normal((k, p))
        half = k // 2
        c = np.exp(rng.uniform(np.log(0.5), np.log(2.0), (half, 1)))
        j[half : 2 * half] = -c * j[:half] + 1e-6 * rng.standard_normal((half, p))
        return j
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def make_problems(
    k: int, n: int, seed: int, family: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` pairs ``(J, G)`` in float64 of one family, or (``family=None``) cycling through
    the first three."""
    rng = np.random.default_rng([seed, k] + ([FAMILIES.index(family) + 1] if family else []))
    out = []
    for i in range(n):
        j = make_jacobian(family or FAMILIES[i % 3], k, rng)
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


METHODS = {
    "gradbalance": "gradbalance",
    "cvxpy": "cvxpy (Clarabel)",
    "published": PUBLISHED,
    "torchjd": "TorchJD MGDAWeighting",
    "libmtl": "LibMTL MGDA",
}


def _peers(methods: list[str]) -> dict[str, Solver | str]:
    make = {
        "gradbalance": _ours,
        "cvxpy": _cvxpy,
        "published": _published,
        "torchjd": _torchjd,
        "libmtl": _libmtl,
    }
    return {METHODS[m]: make[m]() for m in methods}


def run(args: argparse.Namespace) -> list[dict]:
    peers = _peers(args.methods)
    rows = []
    for family in args.families:
        for k in args.ks:
            rows += _run_one(peers, family, k, args)
            print(f"{family} K={k} done", file=sys.stderr, flush=True)
    return rows


def _run_one(peers: dict[str, Solver | str], family: str, k: int, args) -> list[dict]:
    problems = make_problems(k, args.n, args.seed, None if family == "mix" else family)
    weights: dict[str, list[torch.Tensor]] = {}
    times: dict[str, list[float]] = {}
    # the methods take turns on each Gramian (one warm-up each first), so that a slow period of
    # a shared machine hits them alike and the ratios stay comparable
    live = {name: solve for name, solve in peers.items() if not isinstance(solve, str)}
    for name, solve in live.items():
        solve(*problems[0])  # warm-up (imports, caches)
        weights[name], times[name] = [], []
    CAP_HITS.pop(k, None)  # count timed solves only
    spent = dict.fromkeys(live, 0.0)
    for j, g in problems:
        for name, solve in live.items():
            if spent[name] > args.budget:  # keep slow peers from dominating the run
                continue
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                w = solve(j, g)
                ts.append(time.perf_counter() - t0)
            weights[name].append(_as_weights(w))
            times[name].append(statistics.median(ts))
            spent[name] += sum(ts)
    n_min = min(len(v) for v in weights.values())
    best = [
        min(float(weights[m][i] @ problems[i][1] @ weights[m][i]) for m in weights)
        for i in range(n_min)
    ]
    ours = "gradbalance" if "gradbalance" in times else next(iter(times))
    rows = []
    for name, solve in peers.items():
        if isinstance(solve, str):
            rows.append({"method": name, "family": family, "K": k, "status": solve})
            continue
        ws = weights[name]
        n = len(ws)
        scale = [float(problems[i][1].diagonal().max()) for i in range(n)]
        # the ratio on the Gramians both solved: median of per-Gramian ratios
        ratio = statistics.median(times[name][i] / times[ours][i] for i in range(n))
        rows.append(
            {
                "method": name,
                "family": family,
                "K": k,
                "n": n,
                "ms": 1e3 * statistics.median(times[name]),
                "ratio": ratio,
                "gap": max(relative_gap(problems[i][1], w) for i, w in enumerate(ws)),
                "subopt": max(
                    (float(ws[i] @ problems[i][1] @ ws[i]) - best[i]) / scale[i]
                    for i in range(min(n, n_min))
                ),
            }
        )
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"# min-norm solver benchmark, {datetime.date.today()}, {platform.python_version()}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
        f"{args.n} Gramians per family and K, {args.repeats} repeats"
    )
    for family in dict.fromkeys(r["family"] for r in rows):  # one table per family, in order
        print()
        print(
            f"family: {family}" + (" (gaussian, conflicting, aligned in turn)" * (family == "mix"))
        )
        print()
        print("| method | K | n | median ms | time / ours | max rel. gap | max rel. subopt |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in rows if r["family"] == family):
            if "status" in r:
                print(f"| {r['method']} | {r['K']} | | {r['status']} | | | |")
                continue
            print(
                f"| {r['method']} | {r['K']} | {r['n']} | {r['ms']:.3f} | {r['ratio']:.2f}x | "
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


# --------------------------------------------------------------------------- on a device

GPU_KS = (2, 4, 8, 16, 32, 64, 128)


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """``time(fn, repeats)``: the median seconds of ``fn()``, with CUDA events on CUDA (the
    device synchronised before and after each call) and ``perf_counter`` elsewhere."""

    def cpu(fn: Callable[[], object], repeats: int) -> float:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def cuda(fn: Callable[[], object], repeats: int) -> float:
        ts = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            ts.append(start.elapsed_time(end) / 1e3)
        return statistics.median(ts)

    return cuda if device.type == "cuda" else cpu


def _batch(k: int, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` Jacobians padded to one width and their Gramians, cycling through `FAMILIES`
    (mixed difficulties in one batch)."""
    js = [make_problems(k, 1, seed + i, FAMILIES[i % len(FAMILIES)])[0][0] for i in range(b)]
    width = max(j.shape[1] for j in js)
    jac = torch.stack([torch.nn.functional.pad(j, (0, width - j.shape[1])) for j in js])
    return jac, jac @ jac.mT


def _max_rel_gap(g: torch.Tensor, w: torch.Tensor) -> float:
    g, w = g.double().cpu(), w.double().cpu()
    w = w.clamp_min(0) / w.clamp_min(0).sum(-1, keepdim=True)
    gw = (g @ w.unsqueeze(-1)).squeeze(-1)
    gap = (w * gw).sum(-1) - gw.amin(-1)
    return float((gap / g.diagonal(dim1=-2, dim2=-1).amax(-1)).max())


def gpu_solver_rows(
    device: str | torch.device = "cuda",
    ks: tuple[int, ...] = GPU_KS,
    batches: tuple[int, ...] = (1, 256),
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    repeats: int = 5,
    peer_max: int = 8,
    seed: int = 0,
) -> list[dict]:
    """The solver table of issue 14, item 4(a), on one device: one row per method, K, B, dtype.

    Methods: ``fused (Triton)``: ``min_norm(G, backend="triton", early_exit=False)``, one launch
    (skipped with a reason where the kernel cannot run: no Triton, or a CPU device without
    ``TRITON_INTERPRET=1``); ``batched (torch)``: ``min_norm(G, backend="torch")``, the previous
    off-CPU path; TorchJD's ``MGDAWeighting`` and LibMTL's ``MGDA`` where importable (one
    Gramian at a time: for ``B > peer_max`` the loop runs over the first ``peer_max`` problems
    and its time is scaled by ``B / peer_max``, marked ``extrapolated``). Each row: median
    seconds of ``repeats`` timed calls after a warm-up (compilation), in ms, and the largest
    relative duality gap ``(wᵀGw - min_i (Gw)_i) / max_i G_ii`` over the batch (float64);
    for the kernel also the fraction of the batch it certified and its most rounds.

    Examples:
        >>> rows = gpu_solver_rows("cpu", ks=(3,), batches=(2,), dtypes=(torch.float64,),
        ...                        repeats=1)  # doctest: +SKIP
    """
    from gradbalance.solvers.fused import fused_available, min_norm_fused

    dev = torch.device(device)
    timed = _timer(dev)
    peers = {"TorchJD MGDAWeighting": _torchjd(), "LibMTL MGDA": _libmtl()}
    rows: list[dict] = []
    for k in ks:
        for b in batches:
            jac, gram = _batch(k, b, seed)
            for dtype in dtypes:
                g = gram.to(device=dev, dtype=dtype)
                j = jac.to(device=dev, dtype=dtype)
                base = {"K": k, "B": b, "dtype": str(dtype).replace("torch.", "")}
                try:
                    usable = fused_available(dev, k, "triton")
                    reason = ""
                except RuntimeError as exc:  # no Triton, or a CPU without the interpreter
                    usable, reason = False, str(exc).split(";")[0].split(" runs on")[0]
                ours: dict[str, Callable[[], torch.Tensor] | str] = {
                    "fused (Triton)": (
                        (lambda g=g: min_norm(g, backend="triton", early_exit=False))
                        if usable
                        else f"skipped: {reason or 'K out of range'}"
                    ),
                    "batched (torch)": lambda g=g: min_norm(g, backend="torch"),
                }
                for name, fn in ours.items():
                    if isinstance(fn, str):
                        rows.append({**base, "method": name, "status": fn})
                        continue
                    w = fn()  # warm-up: compilation, caches
                    ms = 1e3 * timed(fn, repeats)
                    row = {**base, "method": name, "ms": ms, "gap": _max_rel_gap(g, w)}
                    if name.startswith("fused"):  # the kernel's own certificate, untimed
                        tol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
                        _, _, certified, rounds = min_norm_fused(g, tol)
                        row["certified"] = float(certified.double().mean())
                        row["rounds (max)"] = int(rounds.max())
                    rows.append(row)
                n = min(b, peer_max)
                for name, peer in peers.items():
                    if isinstance(peer, str):
                        rows.append({**base, "method": name, "status": peer})
                        continue

                    def loop(peer=peer, j=j, g=g, n=n) -> torch.Tensor:
                        return torch.stack(
                            [torch.as_tensor(peer(j[i], g[i])).reshape(-1) for i in range(n)]
                        )

                    w = loop()
                    ms = 1e3 * timed(loop, max(1, repeats // 2)) * b / n
                    row = {**base, "method": name, "ms": ms, "gap": _max_rel_gap(g[:n], w)}
                    rows.append({**row, "extrapolated": n < b})
    return rows


def print_gpu_table(rows: list[dict], device: str) -> None:
    """The rows of `gpu_solver_rows` as a markdown table (time relative to TorchJD's)."""
    ref = {
        (r["K"], r["B"], r["dtype"]): r["ms"]
        for r in rows
        if r["method"] == "TorchJD MGDAWeighting" and "ms" in r
    }
    print(f"# min-norm solvers on {device}, {datetime.date.today()}, torch {torch.__version__}")
    print()
    print("| K | B | dtype | method | ms | TorchJD / this | max rel. gap |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        head = f"| {r['K']} | {r['B']} | {r['dtype']} | {r['method']} |"
        if "status" in r:
            print(f"{head} {r['status']} | | |")
            continue
        tj = ref.get((r["K"], r["B"], r["dtype"]))
        speed = f"{tj / r['ms']:.1f}x" if tj else ""
        note = " (extrapolated)" if r.get("extrapolated") else ""
        print(f"{head} {r['ms']:.3f}{note} | {speed} | {max(r['gap'], 0.0):.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 40, 100])
    parser.add_argument(
        "--families",
        nargs="+",
        default=["mix", *FAMILIES[3:]],
        choices=["mix", *FAMILIES],
        help="Gramian families ('mix': the first three in turn, the original table)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="solvers"
    )
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
