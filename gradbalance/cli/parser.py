"""The argument parser of the ``gradbalance`` command: one sub-parser per command.

Each sub-parser stores the command's ``run(args) -> int`` as ``args.run`` (looked up on the
command's module when the parser is built) and itself as ``args.subparser``, so a command can
report a usage error with ``args.subparser.error(...)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradbalance import __version__, engine
from gradbalance.cli import bench, demo, listing, options, recipes, train

__all__ = ["build_parser"]


def _threads_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    if default is None:
        text = "torch CPU threads (default: torch's choice, one per core); 1 avoids a large "
        text += "slowdown when other jobs share the CPU"
    else:
        text = f"torch CPU threads (default {default}: the demo's small networks gain little "
        text += "from more, the numbers do not depend on the core count, and a busy CPU does "
        text += "not stall it)"
    p.add_argument("--threads", type=options.thread_count, default=default, help=text)


def _run_options(
    p: argparse.ArgumentParser,
    seed_help: str,
    threads_default: int | None = None,
    seed_default: int | None = 0,
) -> None:
    """The options every training command shares: ``--seed``, ``--no-progress``, ``--threads``."""
    p.add_argument("--seed", type=options.seed, default=seed_default, help=seed_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _threads_option(p, default=threads_default)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="compare balancing methods on QM9's eleven targets (the main job)",
        description="Train one network with several balancing methods and print a results "
        "table (per-task test metrics, Δm% against equal weighting with its seed-to-seed "
        "spread, time per step, final weights); write a PNG and CSV logs into --out. "
        "--data qm9 (default): QM9's eleven molecular properties, whose units span orders of "
        "magnitude, with a small message-passing network; --data multimnist: the MultiMNIST "
        "LeNet of Sener & Koltun (2018). Fixed seeds: reruns give the same numbers.",
    )
    names = ", ".join(
        f"{name}: {d.epochs} (--quick: {d.quick_epochs})" for name, d in demo.DEMO_DATA.items()
    )
    p.add_argument(
        "--data",
        choices=list(demo.DEMO_DATA),
        default=next(iter(demo.DEMO_DATA)),
        help=f"the data set (default {next(iter(demo.DEMO_DATA))})",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run (seconds)")
    defaults = "; ".join(f"{n}: {' '.join(d.methods)}" for n, d in demo.DEMO_DATA.items())
    p.add_argument(
        "--methods",
        nargs="+",
        type=options.method_name,
        metavar="METHOD",
        help=f"methods to compare (default, {defaults}); `gradbalance list` shows all",
    )
    p.add_argument(
        "--epochs", type=options.positive_int, help=f"epochs per method (default {names})"
    )
    seeds = ", ".join(f"{n}: {d.seeds}" for n, d in demo.DEMO_DATA.items())
    p.add_argument(
        "--seeds",
        type=options.positive_int,
        help=f"seeds per method, --seed, --seed + 1, ... (default {seeds})",
    )
    p.add_argument(
        "--jobs",
        type=options.positive_int,
        help="seeds trained at the same time, one process each (default: one per CPU core, "
        "at most one per seed)",
    )
    p.add_argument(
        "--batch-size",
        type=options.positive_int,
        help="default: " + ", ".join(f"{n} {d.batch_size}" for n, d in demo.DEMO_DATA.items()),
    )
    p.add_argument(
        "--lr",
        type=options.positive_float,
        help="Adam's lr, default: " + ", ".join(f"{n} {d.lr:g}" for n, d in demo.DEMO_DATA.items()),
    )
    p.add_argument(
        "--out", type=Path, default=Path("gradbalance-demo"), help="default ./gradbalance-demo"
    )
    _run_options(p, "initialisation and shuffle seed (0 to 2**64-1)", threads_default=1)
    p.set_defaults(run=demo.run, subparser=p)


def _add_train(sub: argparse._SubParsersAction) -> None:
    # The options a config file can set default to None here: `runconfig.resolve` fills them
    # from --config, else from `runconfig.DEFAULTS` (so a flag beside --config wins).
    p = sub.add_parser(
        "train",
        help="train any model x method x dataset",
        description="Train a registered model with a registered balancing method on a "
        "dataset and report the test metrics. Defaults depend on the dataset: MultiMNIST "
        "10 epochs, batch 64, Adam 1e-3; QM9 (the demo's protocol) 4,000 molecules, "
        "model qm9-mpnn at width 0.5, 4 epochs, batch 32, Adam 3e-3, test MAE per target in "
        "the papers' units; NYUv2 and CityScapes the MTAN paper's protocol "
        "(200 epochs, batch 2 / 8, Adam 1e-4, StepLR(100, 0.5)); synthetic scenes 10 epochs, "
        "batch 16, Adam 1e-3, width 1/4. Writes the run folder --out: config.json (every "
        "option, resolved), steps.csv, epochs.csv, checkpoint.pt, run.png (and tb/ with "
        "--tensorboard).",
        epilog="Example: gradbalance train --data synthetic --model mtan --method dwa --quick; "
        "again: gradbalance train --config gradbalance-runs/synthetic-mtan-dwa/config.json",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="run the configuration of a run folder's config.json; flags given beside it "
        "override its values",
    )
    p.add_argument("--data", choices=recipes.DATASETS, help="default multimnist")
    defaults = ", ".join(f"{m} for {d}" for d, m in recipes.DEFAULT_MODELS.items())
    p.add_argument(
        "--model",
        type=options.model_name,
        help=f"a registered model (default: {defaults}, split otherwise)",
    )
    p.add_argument("--method", type=options.method_name, help="a registered method (default equal)")
    p.add_argument(
        "--method-arg",
        action="append",
        type=options.key_value,
        metavar="KEY=VALUE",
        help="an option of the method, repeatable (e.g. --method-arg alpha=1.5)",
    )
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the dataset's tasks")
    sizes = recipes.QM9_SIZES
    p.add_argument(
        "--size",
        type=options.positive_int,
        metavar="N",
        help=f"training molecules (--data qm9 only; default {sizes['train']:,}, --quick "
        f"{sizes['quick_train']}; the test set is {sizes['test']:,}, --quick "
        f"{sizes['quick_test']})",
    )
    p.add_argument("--epochs", type=options.positive_int)
    p.add_argument("--batch-size", type=options.positive_int)
    p.add_argument("--lr", type=options.positive_float)
    p.add_argument("--optimizer", choices=("adam", "sgd"), help="default adam")
    p.add_argument("--width", type=options.positive_float, help="the model's width multiplier")
    p.add_argument(
        "--engine",
        choices=engine.STRATEGIES,
        help="how per-task gradients are computed (gradient methods only; default auto)",
    )
    p.add_argument(
        "--root",
        type=Path,
        help="dataset folder (NYUv2, CityScapes; QM9: a folder of qm9pack-format "
        "qm9_part*.csv files, default the installed qm9pack)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="scale-crop-flip (NYUv2, CityScapes; default off)",
    )
    p.add_argument(
        "--device", type=options.device, help="torch device (cpu, cuda, cuda:1, ...; default cpu)"
    )
    p.add_argument(
        "--quick",
        action=argparse.BooleanOptionalAction,
        help="a few seconds: tiny data, 1 epoch (default off)",
    )
    p.add_argument("--out", type=Path, help="default ./gradbalance-runs/<data>-<model>-<method>")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to <out>/tb (needs pip install "
        "gradbalance[tensorboard])",
    )
    _run_options(p, "0 to 2**64-1 (default 0)", seed_default=None)
    p.set_defaults(run=train.run, subparser=p)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run the benchmark scripts of a source checkout",
        description="Run the scripts in the repository's benchmarks/ folder (solver: the "
        "min-norm solver against references; step: the cost of a balanced step). Arguments "
        "after `--` go to the script, e.g. `gradbalance bench solver -- --ks 4 40`.",
    )
    p.add_argument(
        "which", nargs="?", choices=(*bench.BENCHMARKS, "all"), default="all", help="default all"
    )
    p.add_argument("--quick", action="store_true", help="small problem sizes (seconds)")
    p.add_argument(
        "--dir",
        type=Path,
        help="the benchmarks folder (default: next to the package source, or ./benchmarks)",
    )
    p.set_defaults(run=bench.run, subparser=p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradbalance`` command."""
    parser = argparse.ArgumentParser(
        prog="gradbalance",
        description="Gradient balancing for multi-task learning: demo, training, listings "
        "and benchmarks.",
        epilog="Start with `gradbalance demo --quick` (seconds) or `gradbalance demo` "
        "(a few minutes on a laptop CPU). `gradbalance COMMAND --help` shows each command's "
        "options.",
    )
    parser.add_argument("--version", action="version", version=f"gradbalance {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every epoch's metrics (to stderr)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_train(sub)
    p = sub.add_parser("list", help="registered methods, models and datasets")
    p.set_defaults(run=listing.run, subparser=p)
    _add_bench(sub)
    return parser
