"""`CSVLogger`: every step and every epoch of a run as rows of two CSV files."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gradbalance.callbacks.base import Callback, EpochRecord, StepRecord

if TYPE_CHECKING:
    from gradbalance.training import History

__all__ = ["CSVLogger"]

logger = logging.getLogger(__name__)


class _Table:
    """One CSV file whose columns are fixed by its first row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter | None = None
        self._warned = False

    def write(self, row: Mapping[str, Any]) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), extrasaction="ignore")
            self._writer.writeheader()
        extra = [k for k in row if k not in self._writer.fieldnames]
        if extra and not self._warned:
            self._warned = True
            logger.warning(
                "%s: the columns are those of the first row; %s are not written", self.path, extra
            )
        self._writer.writerow(dict(row))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class CSVLogger(Callback):
    """Write ``steps.csv`` (one row per step) and ``epochs.csv`` (one row per epoch).

    ``steps.csv``: ``step``, ``epoch``, ``loss/<task>``, ``weight/<task>`` and, for
    gradient methods when ``cosines`` is set, ``cosine/<a>~<b>`` (the cosine similarity of the
    two tasks' gradients). ``epochs.csv``: ``epoch`` and the metrics of ``fit``'s ``evaluate``
    (the layout of `gradbalance.training.History.epochs`). A file is created at its first
    row; its columns are those of that row. Rows are on disk after every epoch's steps
    (`flush`), so a run that is killed keeps them. Use as a context manager or call `close`.

    Args:
        directory: where the files go (created if missing).
        steps: the steps file's name, or ``None`` for none.
        epochs: the epochs file's name, or ``None`` for none.
        cosines: add the task-pair gradient cosines to the steps file.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with CSVLogger(d) as log:
        ...         log.on_step(StepRecord(0, 0, {"a": 1.5}, {"a": 1.0}))
        ...         log.on_epoch(EpochRecord(0, 1, {"a/mae": 0.25}))
        ...     print(open(f"{d}/steps.csv").read().strip())
        ...     print(open(f"{d}/epochs.csv").read().strip())
        step,epoch,loss/a,weight/a
        0,0,1.5,1.0
        epoch,a/mae
        0,0.25
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        steps: str | None = "steps.csv",
        epochs: str | None = "epochs.csv",
        cosines: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.needs_cosines = cosines and steps is not None
        self._steps = None if steps is None else _Table(self.directory / steps)
        self._epochs = None if epochs is None else _Table(self.directory / epochs)

    @property
    def steps_path(self) -> Path | None:
        """The steps file (``None`` when disabled)."""
        return None if self._steps is None else self._steps.path

    @property
    def epochs_path(self) -> Path | None:
        """The epochs file (``None`` when disabled)."""
        return None if self._epochs is None else self._epochs.path

    def on_step(self, record: StepRecord) -> None:
        if self._steps is not None:
            self._steps.write(record.row())

    def on_epoch(self, record: EpochRecord) -> None:
        if self._epochs is not None:
            self._epochs.write(record.row())
            self._epochs.flush()

    def on_fit_end(self, history: History) -> None:
        self.flush()

    def flush(self) -> None:
        for table in (self._steps, self._epochs):
            if table is not None:
                table.flush()

    def close(self) -> None:
        """Flush and close the files."""
        for table in (self._steps, self._epochs):
            if table is not None:
                table.close()

    def __enter__(self) -> CSVLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
