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

The package, one job per module: this file dispatches (exit statuses, Ctrl-C and SIGTERM);
``parser`` builds the command line from the converters of ``options``; ``demo``, ``train``,
``listing`` and ``bench`` are the commands; ``recipes`` holds the datasets and how a model is
wired to a `GradBalancer`; ``outdir`` checks ``--out``; ``report`` prints tables and writes
CSV files and the figures; ``runconfig`` (a run's ``config.json`` and ``--config``) and
``rundir`` (the files of a ``train`` run folder) serve ``train``.

Function-level imports: only matplotlib (``report``'s figures), an optional dependency
(TensorBoard is imported by `gradbalance.callbacks` when a run asks for it).
Everything else is imported at module level: ``import gradbalance`` already loads torch and
every subpackage, so deferring the package's own modules would not make ``--help`` faster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gradbalance.cli.bench import BENCHMARKS
from gradbalance.cli.demo import DEMO_METHODS
from gradbalance.cli.errors import CommandError
from gradbalance.cli.parser import build_parser
from gradbalance.cli.recipes import DATASETS
from gradbalance.cli.report import write

__all__ = ["BENCHMARKS", "DATASETS", "DEMO_METHODS", "build_parser", "main"]

logger = logging.getLogger(__name__)


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


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s: %(message)s")
    logging.getLogger("gradbalance").setLevel(logging.INFO if verbose else logging.WARNING)


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
    except CommandError as exc:
        write(f"gradbalance {args.command}: error: {exc}", sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if isinstance(exc, _Terminated):
            name = signal.Signals(exc.signum).name
            write(f"gradbalance {args.command}: terminated by {name}", sys.stderr)
            return 128 + exc.signum
        write("interrupted", sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gradbalance list | head`
        # As the Python docs advise: point stdout at devnull so the exit flush does not fail.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
