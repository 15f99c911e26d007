"""Per-step logging of a training run: CSV always, TensorBoard when it is installed."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunLogger"]

logger = logging.getLogger(__name__)


class RunLogger:
    """Write one row per logged step to ``<directory>/<name>.csv`` (and TensorBoard if present).

    Columns are fixed by the first row; later rows may only use those keys (missing ones are
    left empty). Use as a context manager or call `close`.

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
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise
                logger.debug("tensorboard not installed: logging to CSV only")
            else:
                self._tb = SummaryWriter(log_dir=str(self.directory / "tb" / name))

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
