"""``gradbalance demo``: several balancing methods on one data set, one table.

Every method trains the same initial network on the same batches, for each seed; the table
reports per-task test metrics (the mean over seeds), Δm% against equal weighting with its
seed-to-seed spread, the time per step and the final weights, and the run writes CSV logs and a
figure into ``--out``. ``--data qm9`` (the default) trains QM9's eleven targets,
``--data multimnist`` MultiMNIST's two digits (`gradbalance.cli.demo_data`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gradbalance.cli.demo_data import DEMO_DATA, DemoData
from gradbalance.cli.errors import CommandError
from gradbalance.cli.outdir import check_out, make_out
from gradbalance.cli.recipes import build_balancer, loss_fns
from gradbalance.cli.report import demo_figure, fmt_time, table, write, write_csv
from gradbalance.errors import GradBalanceError
from gradbalance.methods import KPIS
from gradbalance.metrics import delta_m
from gradbalance.runlog import RunLogger
from gradbalance.training import TensorLoader, fit, make_evaluator, make_kpi_fn, progress_bar

__all__ = [
    "DEMO_DATA",
    "DEMO_METHODS",
    "DemoRun",
    "MethodFailed",
    "Settings",
    "baseline",
    "header_line",
    "run",
    "seed_runs",
    "settings_for",
]

#: The methods of the default data set, in table order.
DEMO_METHODS = next(iter(DEMO_DATA.values())).methods


class MethodFailed(Exception):
    """One method of the demo could not run; the others go on."""


@dataclass
class DemoRun:
    """One method's training run with one seed."""

    method: str
    seed: int
    history: Any
    steps_per_epoch: int


@dataclass(frozen=True)
class Settings:
    """What a run of the demo needs from the command line (picklable, for the workers)."""

    data: str
    out: Path
    epochs: int
    lr: float
    batch_size: int
    seeds: tuple[int, ...]
    quick: bool
    threads: int | None
    progress: bool
    split_seed: int


def train_one(
    data: DemoData, method: str, seed: int, splits: tuple[Any, Any], settings: Settings
) -> DemoRun:
    """Train the data set's model with ``method``; `MethodFailed` when it cannot run."""
    train, test = splits
    torch.manual_seed(seed)  # the same initial network (and dropout draws) for every method
    model = data.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    try:
        balancer = build_balancer(
            model, method, optimizer, method_kwargs=data.method_kwargs.get(method)
        )
        if KPIS in balancer.method.requires:
            make_kpi_fn(model.tasks)  # raises where the tasks define no KPI (regression)
    except (TypeError, ValueError) as exc:
        raise MethodFailed(
            f"cannot be built with its default options ({exc}); run it with "
            f"`gradbalance train --method {method} --method-arg KEY=VALUE`"
        ) from None
    x, y = train.tensors()
    loader = TensorLoader(x, y, settings.batch_size, seed=seed)
    xt, yt = test.tensors()
    evaluate = make_evaluator(TensorLoader(xt, yt, 1000, shuffle=False), model.tasks)
    name = method if len(settings.seeds) == 1 else f"{method}-seed{seed}"
    with RunLogger(settings.out / "steps", name) as run_logger:
        try:
            history = fit(
                model,
                balancer,
                loader,
                loss_fns(model.tasks),
                epochs=settings.epochs,
                evaluate=evaluate,
                kpi_fn=make_kpi_fn(model.tasks) if KPIS in balancer.method.requires else None,
                run_logger=run_logger,
                show_progress=settings.progress,
                desc=f"{name:<18}",
                pass_features=True,
            )
        except GradBalanceError as exc:  # e.g. a solver that fails: report it, go on
            raise MethodFailed(f"failed during training: {exc}") from None
    return DemoRun(method, seed, history, len(loader))


def baseline(methods: list[str]) -> str:
    """The method Δm% is measured against: ``equal`` if it ran, else the first."""
    return "equal" if "equal" in methods else methods[0]


def _final(run: DemoRun, metric: str, tasks: list[str]) -> dict[str, float]:
    return {f"{t}/{metric}": run.history.final[f"{t}/{metric}"] for t in tasks}


def results_rows(
    runs: list[DemoRun], base: str, tasks: list[str], metric: str, epochs: int
) -> list[dict[str, Any]]:
    """One row of ``results.csv`` per method: metrics averaged over seeds, and Δm% against
    ``base`` of the same seed, its mean and its spread (half the range over seeds)."""
    by_method: dict[str, list[DemoRun]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    base_runs = {r.seed: r for r in by_method[base]}
    rows = []
    for method, group in by_method.items():
        deltas = [
            delta_m(_final(r, metric, tasks), _final(base_runs[r.seed], metric, tasks))
            for r in group
            if r.seed in base_runs
        ]
        finals = [r.history.final for r in group]
        rows.append(
            {
                "method": method,
                "seeds": len(group),
                **{
                    f"{t}_{metric}": statistics.fmean(f[f"{t}/{metric}"] for f in finals)
                    for t in tasks
                },
                f"delta_m_vs_{base}": statistics.fmean(deltas) if deltas else float("nan"),
                "delta_m_spread": (max(deltas) - min(deltas)) / 2 if deltas else float("nan"),
                "seconds_per_step": statistics.fmean(r.history.seconds_per_step for r in group),
                "epochs": epochs,
                "steps": len(group[0].history.steps),
                **{
                    f"final_weight_{t}": statistics.fmean(
                        r.history.steps[-1][f"weight/{t}"] for r in group
                    )
                    for t in tasks
                },
            }
        )
    return rows


def seed_noise(runs: list[DemoRun], base: str, tasks: list[str], metric: str) -> float:
    """How far the baseline moves with the seed alone: the largest |Δm%| of one of its seeds
    against another (0 with one seed)."""
    finals = [_final(r, metric, tasks) for r in runs if r.method == base]
    return max((abs(delta_m(a, b)) for i, a in enumerate(finals) for b in finals[:i]), default=0.0)


def results_table(
    data: DemoData,
    results: list[dict[str, Any]],
    tasks: list[str],
    base: str,
    test: Any,
    noise: float,
) -> str:
    """The printed table: per-task metrics, Δm% (± spread; ``~`` within seed noise), ms/step,
    final weights."""
    headers = ["method", *data.columns(tasks), f"Δm% vs {base}", "ms/step", "final weights"]
    rows = []
    for r in results:
        final = {f"{t}/{data.metric}": r[f"{t}_{data.metric}"] for t in tasks}
        delta = r[f"delta_m_vs_{base}"]
        spread = r["delta_m_spread"]
        cell = f"{delta:+.2f}"
        if r["seeds"] > 1 and r["method"] != base:
            cell += f" ±{spread:.2f}"
            if abs(delta) <= max(spread, noise):
                cell += " ~"
        rows.append(
            [
                r["method"],
                *data.values(final, tasks, test),
                cell,
                f"{1000 * r['seconds_per_step']:.1f}",
                ", ".join(f"{r[f'final_weight_{t}']:.3g}" for t in tasks),
            ]
        )
    return table(headers, rows, [False, *([True] * (len(headers) - 2)), False])


def seed_runs(
    settings: Settings,
    methods: list[str],
    seed: int,
    done: Any = None,
    splits: tuple[Any, Any] | None = None,
) -> tuple[list[DemoRun], dict[str, str]]:
    """Every method with one seed: the runs, and why each failed method failed. ``done``, a
    queue, receives ``(method, seed)`` after each method (the parent's progress bar);
    ``splits``, the data already loaded in this process (a worker loads its own)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    # reruns give the same numbers: no choice by timing (the chained engine would time its two
    # trunk variants, equal up to rounding, and keep the faster, which depends on the load)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _seed_runs(settings, methods, seed, done, splits)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _seed_runs(
    settings: Settings,
    methods: list[str],
    seed: int,
    done: Any,
    splits: tuple[Any, Any] | None,
) -> tuple[list[DemoRun], dict[str, str]]:
    data = DEMO_DATA[settings.data]
    if splits is None:
        splits = data.load(settings.split_seed, settings.quick)
    runs, failed = [], {}
    for method in methods:
        try:
            runs.append(train_one(data, method, seed, splits, settings))
        except MethodFailed as exc:
            failed[method] = str(exc)
        if done is not None:
            done.put((method, seed))
    return runs, failed


def _in_parallel(
    settings: Settings, methods: list[str], jobs: int
) -> tuple[list[DemoRun], dict[str, str]]:
    """`seed_runs` for every seed, ``jobs`` processes at a time, with one progress bar."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that ran torch
    total = len(methods) * len(settings.seeds)
    bar = progress_bar(total, "methods x seeds", settings.progress)
    runs: list[DemoRun] = []
    failed: dict[str, str] = {}
    with context.Manager() as manager:
        done = manager.Queue()
        quiet = replace(settings, progress=False)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(seed_runs, quiet, methods, s, done) for s in settings.seeds]
            finished = 0
            while finished < total:
                try:
                    method, seed = done.get(timeout=0.5)
                except queue.Empty:
                    if all(f.done() for f in futures):
                        break  # a worker died: its error is raised below
                    continue
                finished += 1
                bar.update(1)
                bar.set_postfix_str(f"{method} seed {seed}")
            for future in futures:
                seed_result, seed_failed = future.result()
                runs.extend(seed_result)
                failed.update(seed_failed)
    bar.close()
    return runs, failed


def _in_sequence(
    settings: Settings, methods: list[str], splits: tuple[Any, Any]
) -> tuple[list[DemoRun], dict[str, str]]:
    """`seed_runs` for every seed in this process, on the data already loaded; a method that
    failed with one seed is not tried with the next."""
    runs: list[DemoRun] = []
    failed: dict[str, str] = {}
    for seed in settings.seeds:
        todo = [m for m in methods if m not in failed]
        seed_result, seed_failed = seed_runs(settings, todo, seed, splits=splits)
        runs.extend(seed_result)
        failed.update(seed_failed)
    return runs, failed


def header_line(data: DemoData, settings: Settings, n_train: int, n_test: int, jobs: int) -> str:
    """The line the demo prints before training: the data, the protocol, the seeds."""
    steps = -(-n_train // settings.batch_size)
    seeds = settings.seeds
    seed_note = (
        f"seeds {', '.join(map(str, seeds))} ({jobs} at a time)"
        if len(seeds) > 1
        else f"one seed ({seeds[0]}): differences between methods may be seed noise"
    )
    return (
        f"{data.describe(n_train, n_test)}; Adam lr {settings.lr:g}, batch "
        f"{settings.batch_size}, {settings.epochs} epochs x {steps} steps, {seed_note}, "
        f"{settings.threads or torch.get_num_threads()} thread(s) each"
    )


def settings_for(args: argparse.Namespace) -> Settings:
    """The run's settings: the command line's, else the data set's defaults."""
    data = DEMO_DATA[args.data]
    seeds = args.seeds or data.seeds
    return Settings(
        data=data.name,
        out=args.out,
        epochs=args.epochs or (data.quick_epochs if args.quick else data.epochs),
        lr=args.lr or data.lr,
        batch_size=args.batch_size or data.batch_size,
        seeds=tuple(args.seed + i for i in range(seeds)),
        quick=args.quick,
        threads=args.threads,
        progress=not args.no_progress,
        split_seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo: 0 when every method ran, 1 when some were left out."""
    started = time.perf_counter()
    data = DEMO_DATA[args.data]
    methods = list(dict.fromkeys(args.methods or data.methods))
    settings = settings_for(args)
    seeds = len(settings.seeds)
    names = [m if seeds == 1 else f"{m}-seed{s}" for m in methods for s in settings.seeds]
    demo_files = ["results.csv", "epochs.csv", "demo.png", *(f"steps/{n}.csv" for n in names)]
    check_out(args.subparser, args.out, files=demo_files, folders=["steps", "steps/tb"])
    train, test = data.load(settings.split_seed, settings.quick)  # errors before any work
    make_out(args.subparser, args.out)
    jobs = min(args.jobs or os.cpu_count() or 1, seeds)
    write(header_line(data, settings, len(train), len(test), jobs))
    if jobs > 1:
        runs, failures = _in_parallel(settings, methods, jobs)
    else:
        runs, failures = _in_sequence(settings, methods, (train, test))
    order = {m: i for i, m in enumerate(methods)}
    runs.sort(key=lambda r: (order[r.method], r.seed))
    for method, why in failures.items():
        write(f"gradbalance demo: method {method!r} {why}; left out", sys.stderr)
    failed = list(failures)
    runs = [r for r in runs if r.method not in failed]
    if not runs:
        raise CommandError("no method could be run")
    epochs = settings.epochs
    tasks = list(train.tasks)
    base = baseline(list(dict.fromkeys(r.method for r in runs)))
    results = results_rows(runs, base, tasks, data.metric, epochs)
    noise = seed_noise(runs, base, tasks, data.metric)
    write()
    write(results_table(data, results, tasks, base, test, noise))
    write()
    write_csv(args.out / "results.csv", results)
    write_csv(
        args.out / "epochs.csv",
        [{"method": r.method, "seed": r.seed, **row} for r in runs for row in r.history.epochs],
    )
    drew = demo_figure(data.name, runs, tasks, args.out / "demo.png", base)
    write(f"{data.footnote(test, base)} ms/step times forward + balancing + step.")
    if seeds > 1:
        write(
            f"± is half the range of Δm% over the {seeds} seeds; ~ marks a difference within the "
            f"seed-to-seed spread (that of the method, or {base}'s own: {noise:.2f})."
        )
    files = ["results.csv", "epochs.csv", "steps/<run>.csv"] + (["demo.png"] if drew else [])
    write(f"Wrote {', '.join(files)} to {args.out}/ in {fmt_time(time.perf_counter() - started)}.")
    if failed:
        write(f"Left out (see the messages above): {', '.join(failed)}.")
    return 1 if failed else 0
