"""Run a function on several gloo ranks (CPU processes) and collect what each rank returns.

One harness for every DDP test: a fork server (or spawn) starts the ranks, each joins a gloo
process group through a file, runs ``scenarios(rank, world)`` and saves its result; the test gets
the results in rank order. A rank that blocks (a collective another rank never joins) fails the
test at the deadline instead of stalling the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(
    rank: int,
    scenarios: Callable[[int, int], Any],
    world: int,
    init_file: str,
    out_dir: str,
    collective_timeout_s: float,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    try:
        torch.save(scenarios(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(
    scenarios: Callable[[int, int], Any],
    world: int,
    preload: Sequence[str] = ("torch",),
    deadline_s: float = 300.0,
    collective_timeout_s: float = 120.0,
) -> list[Any]:
    """``[scenarios(0, world), ..., scenarios(world - 1, world)]``, each run on its own rank.

    ``scenarios`` must be a module-level function (the ranks import it by name); ``preload``
    names the modules the fork server imports once before forking the ranks (faster than one
    interpreter per rank on 2 cores).
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "init")
        method = (
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
        if method == "forkserver":
            multiprocessing.get_context(method).set_forkserver_preload(list(preload))
        ctx = mp.start_processes(
            _rank_main,
            args=(scenarios, world, init_file, tmp, collective_timeout_s),
            nprocs=world,
            start_method=method,
            join=False,
        )
        deadline = time.monotonic() + deadline_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"the ranks did not finish within {deadline_s} s (a rank blocked)")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
