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
    """One small landscape panel per method (its trajectories, the Pareto set on top) and one
    objective-space panel with every method."""
    from matplotlib import patheffects
    from matplotlib.figure import Figure

    methods = list(paths)
    cols = min(3, max(1, len(methods)))
    rows = max(1, math.ceil(len(methods) / cols))
    fig = Figure(figsize=(5.2 + 2.9 * cols, max(5.6, 2.85 * rows + 0.6)), layout="constrained")
    grid = fig.add_gridspec(rows, cols + 2)
    lattice = torch.linspace(-2.0, 2.0, 161, dtype=torch.float64)
    xx, yy = torch.meshgrid(lattice, lattice, indexing="xy")
    f1, f2 = objectives(torch.stack([xx, yy], -1), scale)
    # The Pareto set / front: thick black with a white outline, drawn above the trajectories.
    pareto_style = {
        "color": "black",
        "lw": 2.5,
        "zorder": 10,
        "path_effects": [patheffects.withStroke(linewidth=4.5, foreground="white")],
    }
    t = torch.linspace(0.0, 1.0, 200, dtype=torch.float64)
    front = objectives((2 * t - 1)[:, None] * C, scale)

    bx = fig.add_subplot(grid[:, cols:])
    for i, method in enumerate(methods):
        color = f"C{i % 10}"
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.contourf(xx, yy, f1 + f2, levels=12, cmap="Greys", alpha=0.25)
        ax.contour(xx, yy, f1, levels=5, colors="tab:blue", linewidths=0.5, alpha=0.5)
        ax.contour(xx, yy, f2, levels=5, colors="tab:red", linewidths=0.5, alpha=0.5)
        ax.plot([-C[0], C[0]], [-C[1], C[1]], **pareto_style)
        for j, trajectory in enumerate(paths[method]):
            p = torch.tensor(trajectory, dtype=torch.float64)
            ax.plot(p[:, 0], p[:, 1], color=color, lw=1.6, zorder=5)
            ax.plot(p[0, 0], p[0, 1], "k^", ms=5, zorder=6)
            ax.plot(p[-1, 0], p[-1, 1], "o", color=color, mec="black", mew=0.6, ms=6, zorder=11)
            o1, o2 = objectives(p, scale)
            label = method if j == 0 else None
            bx.plot(o1, o2, color=color, lw=1.0, alpha=0.45, zorder=3)
            bx.plot(
                o1[-1], o2[-1], "o", color=color, mec="black", mew=0.6, ms=7, zorder=12, label=label
            )
        ax.set(xlim=(-2, 2), ylim=(-2, 2), aspect="equal", xticks=[-2, 0, 2], yticks=[-2, 0, 2])
        ax.set_title(method, color=color, fontsize="medium", fontweight="bold")
        ax.tick_params(labelsize="small")
    bx.plot(front[0], front[1], label="Pareto front", **pareto_style)
    bx.set(
        xlabel="$f_1$",
        ylabel="$f_2$",
        title="objective space: trajectories (faint) and end points",
        aspect="equal",
    )
    bx.legend(fontsize="small", loc="upper right", framealpha=0.9)
    bx.grid(alpha=0.3)
    fig.suptitle(
        "Fonseca–Fleming: black = Pareto set / front, ▲ = starts, ● = end points; "
        "contours of $f_1$ (blue) and $f_2$ (red)",
        fontsize="medium",
    )
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=gb.methods.available(),
        metavar="METHOD",
        help="registered methods to draw (default: " + " ".join(DEFAULT) + ")",
    )
    parser.add_argument(
        "--steps", type=int, default=500, help="SGD steps from each start (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=0.2, help="SGD learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="the scale s of f2 (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="60 steps from 3 starts")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("pareto-toy"),
        help="folder for pareto_toy.png (default: %(default)s)",
    )
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
