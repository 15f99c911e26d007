"""The ``--out`` folder: checked before a run loads anything, created when the run starts."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_out", "make_out"]


def check_out(
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


def make_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Create ``out`` (`check_out` has checked it; this catches what changed since)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {str(out)!r}: cannot create the folder ({exc.strerror or exc})")
