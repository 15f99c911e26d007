r"""Two objectives with a known Pareto set: where does each balancing method go?

The Fonseca–Fleming problem in two variables, with the second objective scaled by ``--scale``:

$$ f_1(x) = 1 - e^{-\lVert x - c\rVert^2}, \qquad
   f_2(x) = s\,\big(1 - e^{-\lVert x + c\rVert^2}\big), \qquad c = (1, 1)/\sqrt2. $$

Its Pareto set is the segment from ``-c`` to ``c`` (whatever ``s``), and its Pareto front is
concave, the case where a fixed weighting of the losses can only reach the two ends of the
front. Every method starts from the same points and takes plain SGD steps on ``x`` (the
"shared parameters"); the figure shows the trajectories on the loss landscape (left) and in
objective space (right), and the table how far each method ended from the Pareto set and where
along it (``t = 0`` is the minimum of ``f_2``, ``t = 1`` that of ``f_1``).

    python examples/pareto_toy.py [--methods equal mgda ...] [--steps 500] [--scale 1]
    python examples/pareto_toy.py --quick        # 60 steps from 3 starts: seconds

Writes ``<out>/pareto_toy.png`` (default out: ``pareto-toy``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import gradbalance as gb
from gradbalance.methods import FEATURES, KPIS

C = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2.0)
# Methods drawn by default (those registered); any registered name works with --methods.
DEFAULT = ["equal", "mgda", "uncertainty", "dwa", "gradnorm", "dtp", "pcgrad", "cagrad", "famo"]
# Options a method needs on this toy.
OPTIONS: dict[str, dict] = {
    # The learned weights grow like 1 / loss as a loss nears 0 (the minimum of f1 and f2):
    # a slower lr for the log-variances keeps the oscillation this causes visible but bounded.
    "uncertainty": {"lr": 0.02},
    "dwa": {"window": 10},  # a "virtual epoch" of 10 steps: the toy has no epochs
    "fixed": {"weights": [1.0, 1.0]},
}
STARTS = [(-1.2, 0.3), (0.3, -1.2), (1.3, 0.0), (-0.2, 1.4), (-1.4, -1.0), (1.0, 1.5)]


def objectives(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f1, f2)`` at ``x`` of shape ``(..., 2)``."""
    f1 = 1.0 - torch.exp(-((x - C) ** 2).sum(-1))
    f2 = scale * (1.0 - torch.exp(-((x + C) ** 2).sum(-1)))
    return f1, f2


def pareto_position(x: torch.Tensor) -> tuple[float, float]:
    """Distance from ``x`` to the Pareto set (the segment ``[-c, c]``) and the position
    ``t`` in ``[0, 1]`` of the nearest point (``x = (2t - 1) c``)."""
    t = float(((x @ C) / 2.0 + 0.5).clamp(0.0, 1.0))
    nearest = (2.0 * t - 1.0) * C
    return float((x - nearest).norm()), t


def run(
    method: str, options: dict, start: tuple[float, float], steps: int, lr: float, scale: float
) -> list[list[float]]:
    """The trajectory ``[[x1, x2], ...]`` of one method from one start."""
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = gb.GradBalancer(
        torch.optim.SGD([x], lr=lr), method=method, shared=[x], tasks=["f1", "f2"], **options
    )
    path = [x.detach().tolist()]
    for _ in range(steps):
        extra = {}
        z = x
        if FEATURES in opt.method.requires:  # MGDA-UB: the identity "encoder", features = x
            z = extra["features"] = x * 1.0
        f1, f2 = objectives(z, scale)
        if KPIS in opt.method.requires:  # DTP: a KPI in [0, 1], 1 = solved
            extra["kpis"] = {"f1": 1.0 - f1.item(), "f2": 1.0 - f2.item() / scale}
        opt.zero_grad()
        opt.backward({"f1": f1, "f2": f2}, **extra)
        opt.step()
        path.append(x.detach().tolist())
    return path


def draw(paths: dict[str, list[list[list[float]]]], scale: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    grid = torch.linspace(-2.0, 2.0, 161, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    f1, f2 = objectives(torch.stack([xx, yy], -1), scale)
    ax.contourf(xx, yy, f1 + f2, levels=20, cmap="Greys", alpha=0.35)
    ax.contour(xx, yy, f1, levels=6, colors="tab:blue", linewidths=0.6, alpha=0.6)
    ax.contour(xx, yy, f2, levels=6, colors="tab:red", linewidths=0.6, alpha=0.6)
    ax.plot([-C[0], C[0]], [-C[1], C[1]], color="black", lw=3, label="Pareto set")
    t = torch.linspace(0.0, 1.0, 200, dtype=torch.float64)
    front = objectives((2 * t - 1)[:, None] * C, scale)
    bx.plot(front[0], front[1], color="black", lw=3, label="Pareto front")
    for i, (method, runs) in enumerate(paths.items()):
        color, width = f"C{i % 10}", max(0.8, 2.6 - 0.3 * i)  # earlier methods drawn wider
        for j, trajectory in enumerate(runs):
            p = torch.tensor(trajectory, dtype=torch.float64)
            label = method if j == 0 else None
            ax.plot(p[:, 0], p[:, 1], color=color, lw=width, label=label)
            ax.plot(p[-1, 0], p[-1, 1], "o", color=color, ms=5)
            o1, o2 = objectives(p, scale)
            bx.plot(o1, o2, color=color, lw=width, label=label)
            bx.plot(o1[-1], o2[-1], "o", color=color, ms=5)
    starts = torch.tensor([r[0] for r in next(iter(paths.values()))])
    ax.plot(starts[:, 0], starts[:, 1], "k^", ms=7, label="starts")
    ax.set(
        xlim=(-2, 2),
        ylim=(-2, 2),
        aspect="equal",
        xlabel="$x_1$",
        ylabel="$x_2$",
        title="trajectories on the landscape (blue: $f_1$, red: $f_2$ contours)",
    )
    bx.set(xlabel="$f_1$", ylabel="$f_2$", title="trajectories in objective space")
    ax.legend(fontsize="small", loc="lower right")
    bx.legend(fontsize="small")
    bx.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", help="default: the registered ones of " + " ".join(DEFAULT)
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--scale", type=float, default=1.0, help="the scale s of f2")
    parser.add_argument("--quick", action="store_true", help="60 steps from 3 starts")
    parser.add_argument("--out", type=Path, default=Path("pareto-toy"))
    args = parser.parse_args(argv)
    steps, starts = (60, STARTS[:3]) if args.quick else (args.steps, STARTS)
    registered = set(gb.methods.available())
    methods = args.methods or [m for m in DEFAULT if m in registered]

    paths: dict[str, list[list[list[float]]]] = {}
    print(f"{'method':<12} {'distance to Pareto set':>22}  {'position t of each end point'}")
    for method in methods:
        options = OPTIONS.get(method, {})
        try:
            runs = [run(method, options, s, steps, args.lr, args.scale) for s in starts]
        except Exception as exc:  # a method that cannot run on this toy: say so, go on
            print(f"{method:<12} skipped: {type(exc).__name__}: {exc}")
            continue
        paths[method] = runs
        ends = [pareto_position(torch.tensor(r[-1], dtype=torch.float64)) for r in runs]
        worst = max(d for d, _ in ends)
        where = ", ".join(f"{t:.2f}" for _, t in ends)
        print(f"{method:<12} {worst:>22.2e}  {where}")
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "pareto_toy.png"
    draw(paths, args.scale, target)
    print(f"(largest distance over the {len(starts)} starts after {steps} steps) -> {target}")


if __name__ == "__main__":
    main()
