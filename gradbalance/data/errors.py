"""Errors raised by the dataset loaders of `gradbalance.data`.

Every one derives from `gradbalance.errors.GradBalanceError`, so ``except
GradBalanceError`` catches them with the library's other errors, and from the built-in error a
user would expect (``FileNotFoundError`` for a missing file, ``ValueError`` for a broken one).
Each message names the offending file and says what was expected.
"""

from __future__ import annotations

from gradbalance.errors import GradBalanceError

__all__ = ["DatasetError", "DatasetFormatError", "DatasetNotFoundError"]


class DatasetError(GradBalanceError):
    """Base class of the errors raised while finding, reading or checking a dataset."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder or file that the loader needs does not exist."""


class DatasetFormatError(DatasetError, ValueError):
    """A dataset file exists but cannot be read, or holds data of the wrong shape, type or range."""
