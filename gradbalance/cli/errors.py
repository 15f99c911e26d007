"""The failures a command reports itself (exit status 1), apart from usage errors (exit 2).

Usage errors go through ``argparse``'s ``parser.error`` (which exits with 2); `main`
catches `CommandError` and prints it as ``gradbalance <command>: error: ...``.
"""

from __future__ import annotations

__all__ = ["CommandError"]


class CommandError(Exception):
    """A failure to report as ``gradbalance <command>: error: ...`` with exit status 1."""
