"""The run folder of ``gradbalance train`` (``--out``): what it holds and how each file is
written.

* ``config.json``: every option of the run after the defaults were applied
  (`resolved_config`; ``gradbalance train --config <out>/config.json`` runs it again);
* ``steps.csv`` and ``epochs.csv``: `gradbalance.callbacks.CSVLogger`;
* ``checkpoint.pt``: the model's and the balancer's state dicts (`save_checkpoint`);
* ``run.png``: losses, weights and test metrics (`gradbalance.cli.report.run_figure`);
* ``tb/``: TensorBoard event files, with ``--tensorboard``
  (`gradbalance.callbacks.TensorBoardLogger`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from gradbalance import __version__
from gradbalance.callbacks import INSTALL_HINT, CSVLogger, TensorBoardLogger, tensorboard_available
from gradbalance.cli.report import run_figure

__all__ = [
    "FILES",
    "FOLDERS",
    "callbacks",
    "check_tensorboard",
    "clear",
    "figure",
    "resolved_config",
    "save_checkpoint",
    "written",
]

logger = logging.getLogger(__name__)

#: The files a run writes into ``--out`` (checked by `gradbalance.cli.outdir.check_out`).
FILES = ["config.json", "steps.csv", "epochs.csv", "checkpoint.pt", "run.png"]
#: The folders a run writes into ``--out``.
FOLDERS = ["tb"]
#: The prefix of TensorBoard's event files.
_EVENTS = "events.out.tfevents."


def check_tensorboard(parser: argparse.ArgumentParser) -> None:
    """A usage error for ``--tensorboard`` when TensorBoard is not installed."""
    if not tensorboard_available():
        parser.error(
            f"--tensorboard needs the tensorboard package: {INSTALL_HINT} (or drop --tensorboard)"
        )


def resolved_config(args: argparse.Namespace, **resolved: Any) -> dict[str, Any]:
    """Every key of `gradbalance.cli.runconfig.DEFAULTS`, from ``args`` (already resolved by
    `gradbalance.cli.runconfig.resolve`) and the values the dataset's defaults decided
    (``resolved``: model, tasks, size, epochs, batch size, lr, width)."""
    root = None if args.root is None else str(Path(args.root).resolve())
    config = {
        "data": args.data,
        "model": resolved["model"],
        "method": args.method,
        "method_args": dict(args.method_arg),
        "tasks": resolved["tasks"],
        "size": resolved["size"],
        "epochs": resolved["epochs"],
        "batch_size": resolved["batch_size"],
        "lr": resolved["lr"],
        "width": resolved["width"],
        "optimizer": args.optimizer,
        "engine": args.engine,
        "root": root,
        "augment": args.augment,
        "device": args.device,
        "seed": args.seed,
        "quick": args.quick,
    }
    return config


def clear(out: Path) -> None:
    """Remove what an earlier run wrote into ``out`` (`FILES` and ``tb/``'s event files).

    Called before the run writes anything: a run that stops early (an error, Ctrl-C) must
    not leave an earlier run's checkpoint, epochs, figure or event files beside its own
    ``config.json`` and ``steps.csv``. Other files in ``out`` are left alone.
    """
    for name in FILES:
        path = out / name
        if path.is_file():
            path.unlink()
    tb = out / "tb"
    if tb.is_dir():
        for old in tb.glob(f"{_EVENTS}*"):
            old.unlink()


@contextlib.contextmanager
def callbacks(out: Path, *, tensorboard: bool) -> Iterator[list[Any]]:
    """The run's observers: the CSV files and, with ``tensorboard``, ``tb/``; closed when the
    block ends (`clear` removed an earlier run's files first)."""
    opened: list[Any] = [CSVLogger(out)]
    try:
        if tensorboard:
            opened.append(TensorBoardLogger(out / "tb"))
        yield opened
    finally:
        for cb in opened:
            cb.close()


def save_checkpoint(
    out: Path,
    model: torch.nn.Module,
    balancer: Any,
    scheduler: Any,
    epochs: int,
    config: Mapping[str, Any],
) -> Path:
    """``checkpoint.pt``: ``model``, ``optimizer`` (the `GradBalancer`'s state dict, the
    wrapped optimizer's inside), ``scheduler`` (or ``None``), ``epoch`` (epochs done),
    ``config`` and ``gradbalance`` (the version). Tensors and plain containers only, so
    ``torch.load(path, weights_only=True)`` reads it."""
    path = out / "checkpoint.pt"
    state = {
        "model": model.state_dict(),
        "optimizer": balancer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "epoch": epochs,
        "config": dict(config),
        "gradbalance": __version__,
    }
    torch.save(state, path)
    return path


def figure(history: Any, out: Path, title: str, steps_per_epoch: int) -> bool:
    """``run.png``; ``False`` (with a logged note) when matplotlib is missing."""
    return run_figure(history, out / "run.png", title, steps_per_epoch)


def written(drawn: bool, tensorboard: bool) -> str:
    """The list of what the run wrote, for its last line."""
    names = [name for name in FILES if drawn or name != "run.png"]
    return ", ".join(names + (["tb/"] if tensorboard else []))
