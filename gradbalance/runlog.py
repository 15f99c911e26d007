"""Per-step logging of a training run: CSV always, TensorBoard when it is installed.

`RunLogger` is the first logger of the package, kept for the demo and existing code; it is a
`gradbalance.callbacks.Callback`. New code: `gradbalance.callbacks.CSVLogger` (steps and
epochs) and `gradbalance.callbacks.TensorBoardLogger` (also the gradient cosines).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradbalance.callbacks.base import Callback, StepRecord
from gradbalance.callbacks.tensorboard import INSTALL_HINT, tensorboard_available

__all__ = ["RunLogger"]

logger = logging.getLogger(__name__)


class RunLogger(Callback):
    """Write one row per logged step to ``<directory>/<name>.csv`` (and TensorBoard if present).

    Columns are fixed by the first row; later rows may only use those keys (missing ones are
    left empty). Use as a context manager or call `close`. As a callback of
    `gradbalance.training.fit` (``callbacks=[...]`` or ``run_logger=``) it logs every step's
    ``step``, ``epoch``, ``loss/<task>`` and ``weight/<task>``.

    Args:
        directory: where the CSV (and the TensorBoard event files) go; created if missing.
        name: the CSV file's stem.
        tensorboard: ``True`` to require TensorBoard, ``False`` to disable it, ``None`` (default)
            to use it when ``torch.utils.tensorboard`` imports.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with RunLogger(d, "run", tensorboard=False) as log:
        ...         log.log({"step": 0, "loss/a": 1.5})
        ...     print(open(f"{d}/run.csv").read().strip())
        step,loss/a
        0,1.5
    """

    def __init__(self, directory: str | Path, name: str, tensorboard: bool | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{name}.csv"
        self._file = self.path.open("w", newline="")
        self._writer: csv.DictWriter | None = None
        self._tb: Any = None
        if tensorboard and not tensorboard_available():
            raise ModuleNotFoundError(f"RunLogger(tensorboard=True) needs: {INSTALL_HINT}")
        if tensorboard is not False and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter  # optional: imported when used

            self._tb = SummaryWriter(log_dir=str(self.directory / "tb" / name))
        elif tensorboard is None:
            logger.debug("tensorboard not installed: logging to CSV only")

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row; numeric values also go to TensorBoard at ``row["step"]``."""
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(dict(row))
        if self._tb is not None:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def on_step(self, record: StepRecord) -> None:
        """Log the step's row (without the gradient cosines: the CSV keeps its layout)."""
        self.log(dataclasses.replace(record, cosines=None).row())

    def flush(self) -> None:
        """Write the rows logged so far to disk (`gradbalance.training.fit` calls it after
        every epoch, so a run killed later keeps them)."""
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
