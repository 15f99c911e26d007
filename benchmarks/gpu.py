"""The GPU benchmark of issue 14, in one run: solver, step time and memory, host syncs.

Three tables, written as markdown files into ``--out`` (and printed):

- ``solver.md``: the solver table of ``benchmarks/solver.py`` on the device, from its
  ``gpu_solver_rows(device, ...)`` (a note instead while that function does not exist);
- ``step.md``: one training step (forward, balancing, Adam step) on the models of
  ``benchmarks/step.py`` (``mlp``, ``segnet``) for K = 2..32: plain (summed losses), equal,
  MGDA on the parameters (``engine="auto"``) and on the representation
  (``engine="representation"``), UPGrad, and TorchJD's ``mtl_backward`` with MGDA and UPGrad
  where ``torchjd`` imports; median time per step and, on CUDA, the peak memory a step adds
  above what is allocated when it starts (``torch.cuda.max_memory_allocated``);
- ``syncs.md``: host synchronisations per step of every registered method, with
  ``nonfinite="skip"`` and ``"raise"`` (fused Adam, MLP, K = 4): on CUDA the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")``, and everywhere the host reads that
  ``benchmarks/hostreads.py`` counts (``.item()``, ``.tolist()``, ``bool(t)``, ...); the steps
  run the device-side checks of docs/engines.md also on the CPU, as a proxy of the CUDA path.

Usage::

    python benchmarks/gpu.py --out /tmp/gpu                  # on a GPU machine (~5 min)
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step as step_bench
from hostreads import HostReads

import gradbalance as gb
from gradbalance.methods import FEATURES, KPIS

#: the methods of the sync table in a ``--quick`` run (every registered method otherwise)
QUICK_SYNC_METHODS = ["equal", "uncertainty", "mgda", "upgrad", "pcgrad"]
#: the step table's rows: (label, method, engine, use the features)
STEP_ROWS = [
    ("equal", "equal", "auto", False),
    ("mgda (parameters)", "mgda", "auto", False),
    ("mgda (representation)", "mgda", "representation", True),
    ("upgrad", "upgrad", "auto", False),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _place(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    return model.to(device), x.to(device), y.to(device)


def _balanced(
    model, x, y, k: int, method: str, engine: str, features: bool, nonfinite: str = "raise"
):
    tasks = [f"t{i}" for i in range(k)]
    options = gb.methods.get_class(method).example_options(tuple(tasks))
    fused = x.device.type in ("cuda", "cpu")
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=step_bench.LR, fused=fused),
        method=gb.methods.get(method, **options),
        shared=model.shared(),
        engine=engine,
        nonfinite=nonfinite,
    )
    opt._pipeline.device_checks = True  # the CUDA path, also on the CPU (as a proxy)
    cls = gb.methods.get_class(method)
    kpis = {t: 0.2 + 0.6 * i / max(k - 1, 1) for i, t in enumerate(tasks)}

    def run() -> None:
        opt.zero_grad()
        z, losses = step_bench._forward(model, x, y)
        extra: dict[str, Any] = {}
        if features or FEATURES in cls.requires:
            extra["features"] = z
        if KPIS in cls.requires:
            extra["kpis"] = kpis
        opt.backward(dict(zip(tasks, losses)), **extra)
        opt.step()

    return run, opt


def time_step(run: Callable[[], None], device: torch.device, warmup: int, reps: int):
    """Median seconds per step and the peak bytes a step adds (CUDA only, else ``None``)."""
    for _ in range(warmup):
        run()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    return statistics.median(times), peak


def _builders(
    base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, device: torch.device
) -> list[tuple[str, Callable[[], Callable[[], None]]]]:
    """The step table's rows for one model and K: a label and how to build the step."""

    def fresh() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        return _place(copy.deepcopy(base), x, y, device)

    out: list[tuple[str, Callable[[], Callable[[], None]]]] = [
        ("plain", lambda: step_bench._plain(*fresh(), k))
    ]
    for label, method, engine, feats in STEP_ROWS:
        out.append((label, lambda m=method, e=engine, f=feats: _balanced(*fresh(), k, m, e, f)[0]))
    for which in ("mgda", "upgrad"):
        out.append((f"torchjd {which}", lambda w=which: step_bench._torchjd(*fresh(), k, w)))
    return out


def step_table(args: argparse.Namespace, device: torch.device, deadline: float) -> list[dict]:
    rows: list[dict] = []
    for model_name in args.models:
        for k in args.k:
            if time.perf_counter() > deadline:
                rows.append({"model": model_name, "K": k, "method": "-", "note": "time budget"})
                continue
            torch.manual_seed(args.seed)
            base = step_bench.MODELS[model_name](k)
            gen = torch.Generator().manual_seed(args.seed + k)
            if model_name == "segnet" and args.quick:
                x, y = step_bench.SegNetNet.batch(k, gen, n=2)
            else:
                x, y = base.batch(k, gen)
            configs = _builders(base, x, y, k, device)
            plain_t = None
            for label, build in configs:
                row: dict[str, Any] = {"model": model_name, "K": k, "method": label}
                try:
                    t, peak = time_step(build(), device, args.warmup, args.reps)
                except ImportError as exc:
                    row["note"] = f"not installed ({str(exc).splitlines()[0][:60]})"
                    rows.append(row)
                    continue
                except Exception as exc:
                    row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    rows.append(row)
                    continue
                if label == "plain":
                    plain_t = t
                row["ms"] = f"{1e3 * t:.3f}"
                row["x plain"] = f"{t / plain_t:.2f}" if plain_t else "-"
                row["peak MiB"] = "-" if peak is None else f"{peak / 2**20:.1f}"
                rows.append(row)
    return rows


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device) -> Iterator[list]:
    """Record the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def sync_table(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    k = 4
    torch.manual_seed(args.seed)
    base = step_bench.MLPNet(k)
    x, y = base.batch(k, torch.Generator().manual_seed(args.seed))
    methods = QUICK_SYNC_METHODS if args.quick else gb.methods.available()
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for policy in ("skip", "raise"):
            try:
                run, _ = _balanced(
                    *_place(copy.deepcopy(base), x, y, device), k, method, "auto", False, policy
                )
                for _ in range(3):  # binding, the engine probe, the optimizer state
                    run()
                _sync(device)
                with cuda_sync_warnings(device) as caught, HostReads() as reads:
                    run()
                syncs = [w for w in caught if "synchroniz" in str(w.message)]
                row[f"{policy}: host reads"] = reads.total
                row[f"{policy}: CUDA syncs"] = len(syncs) if device.type == "cuda" else "-"
                sites = sorted({site for _, site in reads.hits})
                row[f"{policy}: where"] = ", ".join(sites[:4]) + (" ..." if len(sites) > 4 else "")
            except Exception as exc:
                row[f"{policy}: host reads"] = f"{type(exc).__name__}"
        rows.append(row)
    return rows


def solver_section(args: argparse.Namespace, device: torch.device) -> list[dict] | str:
    """The solver table from ``benchmarks/solver.py``'s ``gpu_solver_rows``, if it exists."""
    try:
        import solver as solver_bench
    except Exception as exc:  # its optional peers may fail to import
        return f"benchmarks/solver.py does not import here: {type(exc).__name__}: {exc}"
    fn = getattr(solver_bench, "gpu_solver_rows", None)
    if fn is None:
        return "benchmarks/solver.py has no gpu_solver_rows(device, ...) yet: no solver table"
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if args.quick:  # a smoke run: one small problem (the CPU runs Triton's interpreter, if at all)
        small = {"ks": (3,), "batches": (2,), "dtypes": (torch.float64,), "repeats": 1}
        kwargs = {key: value for key, value in small.items() if key in params}
        if "quick" in params:
            kwargs["quick"] = True
    try:
        return list(fn(device, **kwargs))
    except Exception as exc:
        return f"gpu_solver_rows failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict] | str) -> str:
    """A markdown table of ``rows`` (columns in order of first appearance), or the note."""
    if isinstance(rows, str):
        return f"> {rows}\n"
    if not rows:
        return "> no rows\n"
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def header(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{when}; device {device} ({name or platform.machine()}); torch {torch.__version__}\n\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder for the markdown tables")
    parser.add_argument("--quick", action="store_true", help="smoke run: mlp, K=2, 2 reps")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(step_bench.MODELS))
    parser.add_argument("--k", nargs="+", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the step table")
    parser.add_argument("--skip", nargs="*", default=[], choices=["solver", "step", "syncs"])
    args = parser.parse_args(argv)
    args.models = args.models or (["mlp"] if args.quick else ["mlp", "segnet"])
    args.k = args.k or ([2] if args.quick else [2, 4, 8, 16, 32])
    args.reps = args.reps or (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    head = header(device)
    parts = {
        "solver": lambda: solver_section(args, device),
        "step": lambda: step_table(args, device, time.perf_counter() + args.budget),
        "syncs": lambda: sync_table(args, device),
    }
    notes = {
        "syncs": "On the CPU, IMTL-G's branches and the solvers' NumPy path and early exits are "
        "host reads by design (free there); off the CPU those paths are not taken.\n\n"
        if device.type == "cpu"
        else "",
    }
    for name, make in parts.items():
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        text = f"# {name}\n\n{head}{notes.get(name, '')}{markdown(make())}"
        (args.out / f"{name}.md").write_text(text)
        print(text, flush=True)
        print(f"({name}: {time.perf_counter() - t0:.1f} s)\n", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
