"""What the commands print and write: text tables, CSV files, durations, the demo's figure and
the figure of a ``gradbalance train`` run."""

from __future__ import annotations

import csv
import logging
import math
import shutil
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "demo_figure",
    "fmt_time",
    "moving_average",
    "run_figure",
    "table",
    "write",
    "write_csv",
]

logger = logging.getLogger(__name__)


def write(text: str = "", stream: TextIO | None = None) -> None:
    """Print one line to ``stream`` (default: the current ``sys.stdout``)."""
    (stream or sys.stdout).write(text + "\n")


def fmt_time(seconds: float) -> str:
    """``12.3 s`` under a minute, ``4 min 05 s`` above."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    right: Sequence[bool],
    *,
    wrap_last: bool = False,
) -> str:
    """A plain-text table; ``right`` right-aligns columns, ``wrap_last`` wraps the last column
    to the terminal's width.

    Examples:
        >>> print(table(["name", "n"], [["a", "1"], ["bb", "22"]], [False, True]))
        name   n
        ----  --
        a      1
        bb    22
    """
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    if wrap_last:
        columns = shutil.get_terminal_size((100, 24)).columns
        room = columns - 1 - sum(w + 2 for w in widths[:-1])
        widths[-1] = max(30, min(widths[-1], room))

    def line(cells: Sequence[str]) -> list[str]:
        last = textwrap.wrap(cells[-1], widths[-1]) if wrap_last else [cells[-1]]
        first = [*cells[:-1], last[0] if last else ""]
        out = [
            "  ".join(
                c.rjust(w) if r else c.ljust(w) for c, w, r in zip(first, widths, right)
            ).rstrip()
        ]
        indent = " " * sum(w + 2 for w in widths[:-1])
        out += [indent + more for more in last[1:]]
        return out

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([*line(headers), sep, *(x for r in rows for x in line(r))])


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` to ``path``; the columns are every key, in order of first appearance."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start).

    Examples:
        >>> moving_average([1.0, 3.0, 5.0], 2)
        [1.0, 2.0, 4.0]
    """
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def demo_figure(
    data: str, runs: Sequence[Any], tasks: Sequence[str], path: Path, base: str = "equal"
) -> bool:
    """The demo's figure: the test metrics (top) and one panel of task weights per method.

    ``runs`` are the demo's runs (``.method``, ``.seed``, ``.history``, ``.steps_per_epoch``).
    For ``data="multimnist"`` the top row holds each task's test accuracy over the epochs; for
    ``"qm9"`` each target's final test MAE relative to ``base``'s (the mean over seeds of the
    ratio for the same seed: below 1 is better). The weight panels show the first seed's run.
    Returns whether the figure was written: ``False`` when matplotlib is not installed.
    """
    try:  # optional dependency (the ``examples`` extra): imported only when drawing
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no figure (pip install gradbalance[examples])")
        return False
    first_seed = min(run.seed for run in runs)
    shown = [run for run in runs if run.seed == first_seed]
    per_row = 3
    weight_rows = math.ceil(len(shown) / per_row)
    fig = Figure(figsize=(12, 3.4 * (1 + weight_rows)), layout="constrained")
    grid = fig.add_gridspec(1 + weight_rows, 2 * per_row)
    if data == "qm9":
        _relative_error_panel(fig.add_subplot(grid[0, :]), runs, tasks, base)
        title = "QM9: the message-passing network with each balancing method"
    else:
        _accuracy_panels(fig, grid, shown, tasks, per_row)
        title = "MultiMNIST: MultiLeNet with each balancing method"
    k = len(tasks)
    for j, run in enumerate(shown):
        ax = fig.add_subplot(grid[1 + j // per_row, 2 * (j % per_row) : 2 * (j % per_row) + 2])
        steps = run.history.steps
        x = [(row["step"] + 1) / run.steps_per_epoch for row in steps]
        totals = [sum(row[f"weight/{t}"] for t in tasks) for row in steps]
        window = max(1, len(steps) // 150)
        for i, task in enumerate(tasks):
            share = [
                k * row[f"weight/{task}"] / tot if tot else math.nan
                for row, tot in zip(steps, totals)
            ]
            ax.plot(
                x,
                moving_average(share, window),
                color=f"C{i % 10}",
                lw=1.2,
                label=task,
                ls="-" if i < 10 else "--",
            )
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        note = f", mean of {window} steps" if window > 1 else ""
        ax.set_title(f"{run.method}: task weights × K / Σw{note}", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize="x-small", ncol=2 if k > 4 else 1)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return True


def _accuracy_panels(
    fig: Any, grid: Any, runs: Sequence[Any], tasks: Sequence[str], per_row: int
) -> None:
    """One panel per task: test accuracy over the epochs, one line per method."""
    span = 2 * per_row // len(tasks)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(grid[0, i * span : (i + 1) * span])
        for j, run in enumerate(runs):
            epochs = [row["epoch"] + 1 for row in run.history.epochs]
            acc = [100 * row[f"{task}/accuracy"] for row in run.history.epochs]
            ax.plot(epochs, acc, color=f"C{j % 10}", label=run.method, marker=".")
        ax.set_title(f"test accuracy: {task} digit")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="small")


def _relative_error_panel(ax: Any, runs: Sequence[Any], tasks: Sequence[str], base: str) -> None:
    """Grouped bars: each target's final test MAE over ``base``'s, one bar per method."""
    base_runs = {run.seed: run for run in runs if run.method == base}
    methods = [m for m in dict.fromkeys(run.method for run in runs) if m != base]
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        ratios = []
        for task in tasks:
            per_seed = [
                run.history.final[f"{task}/mae"] / base_runs[run.seed].history.final[f"{task}/mae"]
                for run in runs
                if run.method == method and run.seed in base_runs
            ]
            ratios.append(sum(per_seed) / len(per_seed) if per_seed else math.nan)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, ratios, width=width, color=f"C{(j + 1) % 10}", label=method)
    ax.axhline(1.0, color="0.3", lw=0.9)
    ax.set_xticks(range(len(tasks)), list(tasks))
    ax.set_ylabel(f"test MAE / {base}'s")
    ax.set_title(f"final test MAE per target relative to {base} (below 1: better)")
    ax.grid(alpha=0.3, axis="y")
    if methods:
        ax.legend(fontsize="small", ncol=min(4, len(methods)))


def run_figure(history: Any, path: Path, title: str, steps_per_epoch: int) -> bool:
    """A ``gradbalance train`` run's figure: the losses and weights per step (top), one panel
    per test metric over the epochs (below).

    ``history`` is the run's `gradbalance.training.History`. Returns whether the figure was
    written: ``False`` when matplotlib is not installed (a warning says what to install).
    """
    try:  # optional dependency (the ``examples`` extra): imported only when drawing
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.warning("matplotlib is not installed: no figure (pip install gradbalance[examples])")
        return False
    steps, tasks = history.steps, history.tasks
    metrics = [k for k in (history.epochs[0] if history.epochs else {}) if k != "epoch"]
    per_row = 4
    rows = 1 + math.ceil(len(metrics) / per_row)
    fig = Figure(figsize=(12, 3.2 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, per_row)
    x = [(row["step"] + 1) / max(1, steps_per_epoch) for row in steps]
    window = max(1, len(steps) // 150)
    note = f" (mean of {window} steps)" if window > 1 else ""
    for col, (kind, label) in enumerate((("loss", "training loss"), ("weight", "task weight"))):
        ax = fig.add_subplot(grid[0, 2 * col : 2 * col + 2])
        for i, task in enumerate(tasks):
            values = moving_average([row[f"{kind}/{task}"] for row in steps], window)
            ax.plot(x, values, color=f"C{i % 10}", lw=1.2, label=task)
        losses = [v for row in steps for k, v in row.items() if k.startswith("loss/")]
        if kind == "loss" and losses and min(losses) > 0 and max(losses) > 10 * min(losses):
            ax.set_yscale("log")  # losses of different scales
        ax.set_title(f"{label} per step{note}", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize="x-small", ncol=2 if len(tasks) > 4 else 1)
    epochs = [row["epoch"] + 1 for row in history.epochs]
    for j, name in enumerate(metrics):
        ax = fig.add_subplot(grid[1 + j // per_row, j % per_row])
        ax.plot(epochs, [row[name] for row in history.epochs], marker=".", color="C0")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # one point: show its epoch, not a tick every 0.01 around it
            ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
            ax.set_xticks(epochs)
        ax.set_title(f"test {name}", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return True
