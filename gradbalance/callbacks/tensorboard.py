"""`TensorBoardLogger`: a run's losses, weights, gradient cosines and test metrics as
TensorBoard scalars (``pip install gradbalance[tensorboard]``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradbalance.callbacks.base import Callback, EpochRecord, StepRecord

if TYPE_CHECKING:
    from gradbalance.training import History

__all__ = ["INSTALL_HINT", "TensorBoardLogger", "tensorboard_available"]

#: What to install for `TensorBoardLogger`.
INSTALL_HINT = "pip install gradbalance[tensorboard]"


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package, which ``torch.utils.tensorboard`` writes with, is
    installed (checked without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


def _summary_writer(log_dir: Path) -> Any:
    if not tensorboard_available():
        raise ModuleNotFoundError(
            f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}"
        )
    from torch.utils.tensorboard import SummaryWriter  # optional: imported when used

    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardLogger(Callback):
    """Log a run to TensorBoard event files in ``log_dir``.

    Every step (every ``every``-th): ``loss/<task>``, ``weight/<task>`` and, for gradient
    methods, ``cosine/<a>~<b>``, the cosine similarity of the two tasks' gradients from the
    step's Gramian (1: aligned, 0: orthogonal, below 0: conflicting). Every epoch:
    ``<prefix><metric>`` for each metric of ``fit``'s ``evaluate`` (``test/left/accuracy``).
    The x axis of both is the step count, so the test metrics line up with the steps. View
    with ``tensorboard --logdir <log_dir>``.

    Args:
        log_dir: the folder of the event files (created if missing).
        every: log every ``every``-th step (the epochs are always logged).
        cosines: log the task-pair gradient cosines.
        prefix: prepended to the metric names.

    Raises:
        ModuleNotFoundError: tensorboard is not installed (the message says what to install).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +SKIP
        ...     with TensorBoardLogger(d) as tb:
        ...         tb.on_step(StepRecord(0, 0, {"a": 1.5}, {"a": 1.0}))
    """

    def __init__(
        self, log_dir: str | Path, *, every: int = 1, cosines: bool = True, prefix: str = "test/"
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.log_dir = Path(log_dir)
        self.every = every
        self.prefix = prefix
        self.needs_cosines = cosines
        self._writer = _summary_writer(self.log_dir)

    def on_step(self, record: StepRecord) -> None:
        if record.step % self.every == 0:
            for name, value in record.scalars().items():
                self._writer.add_scalar(name, value, record.step)

    def on_epoch(self, record: EpochRecord) -> None:
        for name, value in record.metrics.items():
            self._writer.add_scalar(f"{self.prefix}{name}", float(value), record.step)
        self._writer.flush()

    def on_fit_end(self, history: History) -> None:
        self.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
