"""``gradbalance bench``: run the scripts of a source checkout's ``benchmarks/`` folder."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gradbalance
from gradbalance.cli.errors import CommandError
from gradbalance.cli.report import write

__all__ = ["BENCHMARKS", "find_benchmarks", "run"]

#: ``gradbalance bench`` targets: script file and the arguments ``--quick`` adds.
BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "solver": ("solver.py", ("--ks", "2", "4", "8", "--n", "5", "--repeats", "2")),
    "step": ("step.py", ("--quick",)),
}


def find_benchmarks(explicit: Path | None) -> Path:
    """``--dir`` if given, else the ``benchmarks/`` folder next to the package source or in the
    current folder."""
    if explicit is not None:
        if not explicit.is_dir():
            raise CommandError(f"--dir {str(explicit)!r} is not a folder")
        return explicit
    candidates = [
        Path(gradbalance.__file__).resolve().parent.parent / "benchmarks",
        Path.cwd() / "benchmarks",
    ]
    for path in candidates:
        if path.is_dir():
            return path
    raise CommandError(
        "no benchmarks/ folder found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "). The benchmarks ship with the source repository, not with the installed "
        "package: run from a clone installed with `pip install -e .`, or pass --dir PATH"
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark scripts; the exit status is the worst of theirs."""
    directory = find_benchmarks(args.dir)
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
        write(f"$ {' '.join(cmd)}")
        sys.stdout.flush()
        status = max(status, subprocess.call(cmd, cwd=directory.parent))
    if missing:
        have = sorted(p.name for p in directory.glob("*.py"))
        raise CommandError(
            "; ".join(
                f"benchmark {n!r} needs {directory / BENCHMARKS[n][0]}, which does not exist"
                for n in missing
            )
            + f" (scripts found there: {have or 'none'}). Update your checkout, or pass "
            "--dir to a benchmarks folder that has it."
        )
    return status
