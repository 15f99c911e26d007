"""Step overhead: one balanced training step relative to a plain summed-loss step.

For every registered method and every engine that applies to it, one training step (forward,
balancing, inner optimizer step) is timed against a *plain* step on the same model
(``zero_grad(); sum(losses).backward(); opt.step()``), for several numbers of tasks ``K`` and
two models:

- ``mlp``: a ReLU MLP trunk (64 -> 256 -> 256 -> 128, 115k shared parameters) and one small MLP
  head per task (128 -> 32 -> 1), batch 128, squared-error losses;
- ``segnet``: the model zoo's `gradbalance.models.Split` (SegNet, hard sharing, BatchNorm) at
  ``width=1/16`` (99k shared parameters) with ``K`` depth heads, batch 4 of 3 x 32 x 32 images,
  L1 losses.

Engines: loss weightings (equal, uncertainty, DWA, ..., GradNorm) have one path (``-``);
gradient methods run with ``loop``, ``batched`` and ``representation`` (Gramian of the
gradients w.r.t. the shared features), plus any other engine `gradbalance.engine.STRATEGIES`
offers (``chained``: the exact parameter Jacobian from K head backwards and one vmapped trunk
backward, given the features, which is what ``engine="auto"`` picks when ``features=`` are
passed; the memory-light ``memory`` engine, with its default ``memory_threshold``; for MGDA
also ``memory-min``: ``memory`` with ``memory_threshold = K x`` the largest parameter tensor,
so that it holds one tensor's Jacobian rows at a time); methods that need the features
(MGDA-UB) only with ``representation``. An engine the balancer refuses for a method (e.g.
``memory`` for methods that read the Jacobian itself) is left out.

Peers, when installed: TorchJD 0.18 (``mtl_backward`` + ``jac_to_grad`` with ``MGDA`` and
``UPGrad``; UPGrad needs ``qpsolvers`` and ``quadprog``) and LibMTL 1.1.5's ``MGDA`` on the
shared parameters (``rep_grad=False``) and on the representation (``rep_grad=True``, where
LibMTL sums the feature gradients over the batch before solving). LibMTL imports torchvision at
package level; this script replaces it by a stub module first (as ``benchmarks/solver.py`` does).
A reference row, ``checked-sum``: a hand-written summed-loss step that only adds the checks a
loss weighting keeps in `GradBalancer` (the losses' finiteness from one host copy, the gradients'
by one fused kernel call, before ``.grad`` is written): the floor of the loss-only rows.

Measurement: every configuration owns a copy of the same initial model and its own Adam
optimizer (lr 1e-5, so the model barely moves and every configuration sees the same kind of
Gramian). After warm-up steps, each repetition visits every configuration once, in a shuffled
order (interleaved, so drifts of a shared machine hit all of them alike); a visit times a few
consecutive steps (as many as fit in about 20 ms, at most 8, so that cheap steps get more
samples). The table gives the median step time and its ratio to the plain step's median on the
same model and K. Torch runs single-threaded by default (``--threads 1``) and steps are timed
in *CPU time of the process* (``time.process_time``, ``--clock cpu``): on a machine shared
with other jobs, wall-clock times include the time spent waiting for a core, which says more
about the neighbours than about the step; ``--clock wall`` times wall-clock instead (the right
choice with several threads on a quiet machine).

Peak memory: after the timing, two more steps of each configuration run under
``torch.profiler.profile(profile_memory=True)``, which records every allocation and free of
torch's CPU allocator; the reported peak is the largest sum of the sizes allocated minus freed
since the start of the second step: the peak memory a step adds on top of what is in use when it
starts (parameters, optimizer state and the previous step's gradients, which its ``zero_grad``
frees first). It counts activations, gradients, Jacobian rows and temporaries, and not memory
allocated outside torch (numpy arrays, e.g. inside quadprog: ``K x K``, negligible). The first
profiled step is discarded because the profiler cannot see the release of blocks allocated
before it started (the previous step's gradients). On CUDA the same number would be
``torch.cuda.max_memory_allocated()`` minus the allocation at the start of the step.

Usage::

    python benchmarks/step.py                       # K in 2 4 8 16 32, both models
    python benchmarks/step.py --quick               # smoke run: mlp, K=2, 2 reps (< 30 s)
    python benchmarks/step.py --k 8 --methods mgda mgda-ub torchjd-mgda --reps 20
    python benchmarks/step.py --models mlp --csv /tmp/step.csv
    python benchmarks/step.py --load /tmp/step.csv --pivot   # re-print a saved run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import importlib
import math
import os
import pkgutil
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import gradbalance as gb
import gradbalance.methods as gm
from gradbalance import engine as _engine
from gradbalance.methods import FEATURES, GRAMIAN, JACOBIAN, KPIS, LOSSES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import stub_torchvision

LR = 1e-5
PLAIN = "plain"
MEMORY_MIN = "memory-min"
#: a reference row: the floor of a loss weighting that keeps the balancer's finiteness checks
CHECKED_SUM = "checked-sum"
#: the clock of the timings: process CPU time by default (``--clock``), see the module docstring
CLOCK: Callable[[], float] = time.process_time
PEERS = ("torchjd-mgda", "torchjd-upgrad", "libmtl-mgda", "libmtl-mgda-rep", CHECKED_SUM)
_KNOWN_ENGINES = ("auto", "loop", "batched", "representation")


# ---------------------------------------------------------------------------------- models
class MLPNet(nn.Module):
    """A ReLU MLP trunk and one two-layer head per task."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128)
        )
        self.act = nn.ReLU()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 1)) for _ in range(k)
        )

    def encode(self, x: Tensor) -> Tensor:
        return self.act(self.trunk(x))

    def decode(self, z: Tensor) -> list[Tensor]:
        return [h(z).squeeze(-1) for h in self.heads]

    def decode_one(self, z: Tensor, i: int) -> Tensor:
        return self.heads[i](z).squeeze(-1)

    def shared(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def task_params(self) -> list[list[nn.Parameter]]:
        return [list(h.parameters()) for h in self.heads]

    @staticmethod
    def batch(k: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(128, 64, generator=gen), torch.randn(128, k, generator=gen)

    @staticmethod
    def losses(preds: list[Tensor], y: Tensor) -> list[Tensor]:
        return [(p - y[:, i]).pow(2).mean() for i, p in enumerate(preds)]


class SegNetNet(nn.Module):
    """`gradbalance.models.Split` (SegNet) with ``K`` depth heads, at a small width."""

    def __init__(self, k: int, width: float = 1 / 16) -> None:
        super().__init__()
        self.names = [f"t{i}" for i in range(k)]
        self.net = gb.models.Split({n: "depth" for n in self.names}, width=width)

    def encode(self, x: Tensor) -> Tensor:
        return self.net.encode(x)

    def decode(self, z: Tensor) -> list[Tensor]:
        out = self.net.decode(z)
        return [out[n] for n in self.names]

    def decode_one(self, z: Tensor, i: int) -> Tensor:
        return self.net.heads[self.names[i]](z)

    def shared(self) -> list[nn.Parameter]:
        return list(self.net.shared_parameters())

    def task_params(self) -> list[list[nn.Parameter]]:
        return [list(self.net.task_parameters(n)) for n in self.names]

    @staticmethod
    def batch(k: int, gen: torch.Generator, n: int = 4) -> tuple[Tensor, Tensor]:
        return torch.randn(n, 3, 32, 32, generator=gen), torch.randn(n, k, 32, 32, generator=gen)

    @staticmethod
    def losses(preds: list[Tensor], y: Tensor) -> list[Tensor]:
        return [(p[:, 0] - y[:, i]).abs().mean() for i, p in enumerate(preds)]


MODELS = {"mlp": MLPNet, "segnet": SegNetNet}


# ---------------------------------------------------------------------------------- configs
@dataclass
class Config:
    """One (method, engine) on its own copy of the model, with a `step` closure."""

    method: str
    engine: str
    step: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    peak: float | None = None
    note: str = ""


def _import_methods() -> dict[str, str]:
    """Import every ``gradbalance.methods`` module (new methods register on import)."""
    failed = {}
    for info in pkgutil.iter_modules(gm.__path__):
        if info.name.startswith("_") or info.name in ("base", "registry"):
            continue
        try:
            importlib.import_module(f"gradbalance.methods.{info.name}")
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"
    return failed


def method_engines(name: str) -> list[str]:
    """The engines that apply to a method: ``-`` for loss weightings."""
    cls = gb.methods.get_class(name)
    if FEATURES in cls.requires:
        return ["representation"]
    if not cls.requires & {GRAMIAN, FEATURES, JACOBIAN}:
        return ["-"]
    extra = [e for e in _engine.STRATEGIES if e not in _KNOWN_ENGINES]
    engines = ["loop", "batched", "representation", *extra]
    if name == "mgda" and "memory" in extra:
        engines.append(MEMORY_MIN)
    return engines


def _forward(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    z = model.encode(x)
    return z, model.losses(model.decode(z), y)


def _plain(model: nn.Module, x: Tensor, y: Tensor, k: int) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        _, losses = _forward(model, x, y)
        sum(losses).backward()
        opt.step()

    return step


def _checked_sum(model: nn.Module, x: Tensor, y: Tensor, k: int) -> Callable[[], None]:
    """The floor of any loss-weighting wrapper that keeps `GradBalancer`'s guarantees: a
    hand-written summed-loss step that checks the losses (one host copy) and the gradients (one
    fused kernel call) before writing ``.grad``, and does nothing else."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    params = list(model.parameters())
    found, one = torch.zeros(1), torch.ones(1)

    def step() -> None:
        opt.zero_grad()
        _, losses = _forward(model, x, y)
        stacked = torch.stack(losses)
        if not all(math.isfinite(v) for v in stacked.detach().tolist()):
            raise FloatingPointError("a loss is not finite")
        grads = list(torch.autograd.grad(stacked.sum(), params))
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
        if found.item():
            raise FloatingPointError("a gradient is not finite")
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def _ours(
    model: nn.Module, x: Tensor, y: Tensor, k: int, name: str, engine: str
) -> Callable[[], None]:
    tasks = [f"t{i}" for i in range(k)]
    options = gb.methods.get_class(name).example_options(tuple(tasks))
    method = gb.methods.get(name, **options)
    kwargs: dict = {} if engine == "-" else {"engine": engine}
    if engine == MEMORY_MIN:
        # the memory-light path at its lightest: one parameter tensor's rows at a time
        largest = max(p.numel() for p in model.parameters())
        kwargs = {"engine": "memory", "memory_threshold": k * largest}
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=LR), method=method, shared=model.shared(), **kwargs
    )
    kpis = {t: 0.2 + 0.6 * i / max(k - 1, 1) for i, t in enumerate(tasks)}
    # the chained engine (and what engine="auto" picks when features are given) needs them
    use_features = engine in ("representation", "chained")
    use_kpis = KPIS in method.requires

    def step() -> None:
        opt.zero_grad()
        z, losses = _forward(model, x, y)
        extra: dict = {}
        if use_features:
            extra["features"] = z
        if use_kpis:
            extra["kpis"] = kpis
        opt.backward(dict(zip(tasks, losses)), **extra)
        opt.step()

    return step


def _torchjd(model: nn.Module, x: Tensor, y: Tensor, k: int, which: str) -> Callable[[], None]:
    from torchjd.aggregation import MGDA, UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    aggregator = MGDA() if which == "mgda" else UPGrad()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    shared, task_params = model.shared(), model.task_params()

    def step() -> None:
        opt.zero_grad()
        z, losses = _forward(model, x, y)
        mtl_backward(losses, features=z, shared_params=shared, tasks_params=task_params)
        jac_to_grad(shared, aggregator)
        opt.step()

    return step


def _libmtl(model: nn.Module, x: Tensor, y: Tensor, k: int, rep: bool) -> Callable[[], None]:
    stub_torchvision()
    from LibMTL.weighting.MGDA import MGDA

    shared = model.shared()

    class Weighting(MGDA):
        """LibMTL's MGDA with the attributes its trainer normally mixes in."""

        def __init__(self) -> None:
            super().__init__()
            self.task_num = k
            self.task_name = [f"t{i}" for i in range(k)]
            self.device = torch.device("cpu")
            self.rep_grad = rep

        def get_share_params(self):
            return shared

        def zero_grad_share_params(self) -> None:
            for p in shared:
                if p.grad is not None:
                    p.grad.zero_()

    weighting = Weighting()
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        z = model.encode(x)
        if rep:  # LibMTL's architectures detach one copy of the representation per task
            weighting.rep = z
            weighting.rep_tasks = {
                t: z.detach().clone().requires_grad_(True) for t in weighting.task_name
            }
            preds = [
                model.decode_one(weighting.rep_tasks[t], i)
                for i, t in enumerate(weighting.task_name)
            ]
        else:
            preds = model.decode(z)
        weighting.backward(model.losses(preds, y), mgda_gn="none")
        opt.step()

    return step


def build_configs(
    model_name: str, k: int, methods: list[str], peers: list[str], seed: int, quick: bool
) -> tuple[list[Config], dict[str, str]]:
    torch.manual_seed(seed)
    base = MODELS[model_name](k)
    gen = torch.Generator().manual_seed(seed + k)
    if model_name == "segnet" and quick:
        x, y = SegNetNet.batch(k, gen, n=2)
    else:
        x, y = base.batch(k, gen)
    configs = [Config(PLAIN, "-")]
    configs[0].step = _plain(copy.deepcopy(base), x, y, k)
    for name in methods:
        for engine in method_engines(name):
            cfg = Config(name, engine)
            try:
                cfg.step = _ours(copy.deepcopy(base), x, y, k, name, engine)
            except ValueError:
                continue  # the balancer refuses this engine for this method: not applicable
            except Exception as exc:
                cfg.note = f"{type(exc).__name__}: {exc}"
            configs.append(cfg)
    unavailable = {}
    for peer in peers:
        engine = {"libmtl-mgda-rep": "representation", CHECKED_SUM: "reference"}.get(peer, "peer")
        cfg = Config(peer, engine)
        try:
            if peer == CHECKED_SUM:
                cfg.step = _checked_sum(copy.deepcopy(base), x, y, k)
            elif peer.startswith("torchjd"):
                cfg.step = _torchjd(copy.deepcopy(base), x, y, k, peer.split("-", 1)[1])
            else:
                cfg.step = _libmtl(copy.deepcopy(base), x, y, k, rep=peer.endswith("-rep"))
        except ImportError as exc:
            unavailable[peer] = f"not installed ({exc})"
            continue
        except Exception as exc:
            cfg.note = f"{type(exc).__name__}: {exc}"
        configs.append(cfg)
    return configs, unavailable


def _run_step(cfg: Config) -> float | None:
    """Time one step; on failure, record why and drop the configuration."""
    assert cfg.step is not None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = CLOCK()
            cfg.step()
            elapsed = CLOCK() - t0
        for w in caught:
            msg = str(w.message).splitlines()[0][:80]
            if msg not in cfg.note:
                cfg.note = f"{cfg.note}; {msg}" if cfg.note else msg
        return elapsed
    except Exception as exc:
        cfg.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        cfg.step = None
        return None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_peak(step: Callable[[], None]) -> float | None:
    from torch.profiler import ProfilerActivity, profile

    gc.disable()  # no cycle collection (of other configurations' garbage) inside the step
    try:
        with warnings.catch_warnings(), _quiet_stderr():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
    finally:
        gc.enable()
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
        allocation = torch._C._profiler._EventType.Allocation
    except Exception:  # pragma: no cover - private profiler API changed
        return None
    events = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.tag == allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return float(peak)


def peak_memory(step: Callable[[], None]) -> float | None:
    """Peak bytes allocated by torch's CPU allocator during one step, above the start level.

    The profiler only sees the frees of blocks allocated while a profiler was recording, so the
    first profiled step cannot credit the release of the previous step's gradients
    (``zero_grad``); two steps are profiled and the second one is reported.
    """
    _profiled_peak(step)
    return _profiled_peak(step)


def measure(
    configs: list[Config], warmup: int, reps: int, seed: int, visit_ms: float = 20.0
) -> None:
    """Interleaved timing: ``reps`` rounds, each visiting every configuration in random order.

    A visit runs ``n`` consecutive steps, ``n`` chosen from the warm-up (at most 8) so that a
    visit lasts about ``visit_ms``: cheap steps get more samples. Every step is one sample.
    """
    live = [c for c in configs if c.step is not None]
    per_visit = {}
    for cfg in live:
        seen = [t for _ in range(max(warmup, 1)) if (t := _run_step(cfg)) is not None]
        est = min(seen) if seen else 1.0
        per_visit[id(cfg)] = max(1, min(8, round(visit_ms / 1e3 / max(est, 1e-6))))
    rng = random.Random(seed)
    for _ in range(reps):
        order = [c for c in live if c.step is not None]
        rng.shuffle(order)
        for cfg in order:
            for _ in range(per_visit[id(cfg)]):
                t = _run_step(cfg)
                if t is None:
                    break
                cfg.times.append(t)
    gc.collect()
    for cfg in configs:
        if cfg.step is not None:
            try:
                cfg.peak = peak_memory(cfg.step)
            except Exception as exc:  # pragma: no cover - profiler trouble
                cfg.note = f"{cfg.note}; memory: {type(exc).__name__}"


def run(args: argparse.Namespace) -> list[dict]:
    failures = _import_methods()
    for name, why in failures.items():
        print(f"warning: gradbalance.methods.{name} does not import: {why}", file=sys.stderr)
    available = gb.methods.available()
    wanted = args.methods or [*available, *PEERS]
    unknown = [m for m in wanted if m not in available and m not in PEERS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; available: {[*available, *PEERS]}")
    methods = [m for m in available if m in wanted]
    peers = [p for p in PEERS if p in wanted]
    rows = []
    for model_name in args.models:
        for k in args.k:
            t0 = time.perf_counter()
            configs, unavailable = build_configs(
                model_name, k, methods, peers, args.seed, args.quick
            )
            measure(configs, args.warmup, args.reps, args.seed + k)
            plain = configs[0]
            plain_t = statistics.median(plain.times)
            for cfg in configs:
                row = {
                    "model": model_name,
                    "K": k,
                    "method": cfg.method,
                    "engine": cfg.engine,
                    "ms": None,
                    "ratio": None,
                    "peak_mb": None,
                    "mem_ratio": None,
                    "note": cfg.note,
                }
                if cfg.times:
                    med = statistics.median(cfg.times)
                    row["ms"] = 1e3 * med
                    row["ratio"] = med / plain_t
                if cfg.peak is not None:
                    row["peak_mb"] = cfg.peak / 2**20
                    if plain.peak:
                        row["mem_ratio"] = cfg.peak / plain.peak
                rows.append(row)
            for peer, why in unavailable.items():
                rows.append(
                    {"model": model_name, "K": k, "method": peer, "engine": "peer", "note": why}
                )
            print(
                f"{model_name} K={k}: {len(configs)} configurations, "
                f"{time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------- output
def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def print_table(rows: list[dict], args: argparse.Namespace | None) -> None:
    if args is not None:
        print(
            f"# step overhead, {datetime.date.today()}, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} threads "
            f"{torch.get_num_threads()}, reps {args.reps} (warm-up {args.warmup}), "
            f"{args.clock} time"
        )
        print()
    print("| model | K | method | engine | ms | time / plain | peak MB | memory / plain | note |")
    print("|---|---:|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['K']} | {r['method']} | {r['engine']} | "
            f"{_fmt(r.get('ms'), '.2f')} | {_fmt(r.get('ratio'), '.2f')} | "
            f"{_fmt(r.get('peak_mb'), '.2f')} | {_fmt(r.get('mem_ratio'), '.2f')} | "
            f"{r.get('note', '')} |"
        )


def print_pivot(rows: list[dict]) -> None:
    """One table per model: ``time / plain`` and ``peak MB`` per K, side by side."""
    for model in dict.fromkeys(r["model"] for r in rows):
        here = [r for r in rows if r["model"] == model]
        ks = sorted({int(r["K"]) for r in here})
        cell = {(r["method"], r["engine"], int(r["K"])): r for r in here}
        keys = list(dict.fromkeys((r["method"], r["engine"]) for r in here))
        print()
        print(f"{model}: time / plain step (peak MB of the step)")
        print()
        print("| method | engine | " + " | ".join(f"K={k}" for k in ks) + " |")
        print("|---|---|" + "---:|" * len(ks))
        for method, engine in keys:
            cells = []
            for k in ks:
                r = cell.get((method, engine, k))
                if r is None or r.get("ratio") is None:
                    cells.append("n/a" if r is None else (r.get("note") or "failed")[:40])
                    continue
                peak = "" if r.get("peak_mb") is None else f" ({r['peak_mb']:.1f})"
                cells.append(f"{r['ratio']:.2f}{peak}")
            print(f"| {method} | {engine} | " + " | ".join(cells) + " |")


def _requires(name: str) -> frozenset[str] | None:
    try:
        return gb.methods.get_class(name).requires
    except ValueError:  # a peer, or the plain step
        return None


def print_goals(rows: list[dict]) -> None:
    """The goals of issue 7, checked on these numbers."""
    timed = [r for r in rows if r.get("ratio") is not None]
    print()
    print("Goals:")
    loss_only = [
        r for r in timed if (req := _requires(r["method"])) is not None and req <= {LOSSES, KPIS}
    ]
    if loss_only:
        worst = max(loss_only, key=lambda r: r["ratio"])
        over = sorted({r["method"] for r in loss_only if r["ratio"] > 1.05})
        floor = [r for r in timed if r["method"] == CHECKED_SUM]
        floor_note = (
            f"; the checked sum, its floor: {min(r['ratio'] for r in floor):.2f}x to "
            f"{max(r['ratio'] for r in floor):.2f}x"
            if floor
            else ""
        )
        print(
            f"- loss-only methods <= 1.05x plain: {'met' if not over else 'MISSED'} (worst "
            f"{worst['ratio']:.2f}x: {worst['method']}, {worst['model']}, K={worst['K']}; "
            f"{len([r for r in loss_only if r['ratio'] > 1.05])} of {len(loss_only)} rows "
            f"above 1.05x{': ' + ', '.join(over) if over else ''}{floor_note})"
        )
    for r in timed:
        if r["method"] == "mgda-ub" and r["K"] == 8:
            ok = r["ratio"] <= 1.5
            print(
                f"- MGDA-UB (representation) <= 1.5x plain at K=8 on {r['model']}: "
                f"{'met' if ok else 'MISSED'} ({r['ratio']:.2f}x)"
            )
    keys = sorted({(r["model"], r["K"]) for r in timed}, key=lambda mk: (mk[0], int(mk[1])))
    for model, k in keys:
        here = {(r["method"], r["engine"]): r for r in timed if r["model"] == model and r["K"] == k}
        ours = {e: r for (m, e), r in here.items() if m == "mgda" and e != "representation"}
        peers = {m: r for (m, _), r in here.items() if m in ("torchjd-mgda", "torchjd-upgrad")}
        if not ours or not peers:
            continue
        best = min(ours.values(), key=lambda r: r["ms"])
        fastest_peer = min(peers.values(), key=lambda r: r["ms"])
        ok = best["ms"] < fastest_peer["ms"]
        parts = ", ".join(f"{e} {r['ms']:.1f}" for e, r in sorted(ours.items()))
        peer_parts = ", ".join(f"{m} {r['ms']:.1f}" for m, r in sorted(peers.items()))
        line = (
            f"- parameter-level MGDA faster than TorchJD on {model}, K={k}: "
            f"{'met' if ok else 'MISSED'} (ms, ours: {parts}; {peer_parts})"
        )
        mem = [
            r["peak_mb"]
            for e, r in ours.items()
            if e in ("memory", MEMORY_MIN) and r.get("peak_mb") is not None
        ]
        mem_peer = [r["peak_mb"] for r in peers.values() if r.get("peak_mb") is not None]
        if mem and mem_peer:
            lower = min(mem) < min(mem_peer)
            line += (
                f"; memory path peak {min(mem):.2f} MB vs TorchJD {min(mem_peer):.2f} MB: "
                f"{'lower' if lower else 'NOT lower'}"
            )
        print(line)


def read_csv(path: str) -> list[dict]:
    """Rows written by `write_csv` (numbers parsed, empty cells as ``None``)."""
    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row: dict = dict(r)
            row["K"] = int(row["K"])
            for f in ("ms", "ratio", "peak_mb", "mem_ratio"):
                row[f] = float(row[f]) if row.get(f) else None
            row["note"] = row.get("note") or ""
            out.append(row)
    return out


def write_csv(rows: list[dict], path: str) -> None:
    fields = ["model", "K", "method", "engine", "ms", "ratio", "peak_mb", "mem_ratio", "note"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({f: r.get(f) for f in fields})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: mlp, K=2, 2 reps (unless given)"
    )
    parser.add_argument("--k", type=int, nargs="+", default=None, help="numbers of tasks")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument(
        "--methods", nargs="+", default=None, help=f"method names and/or peers {PEERS}"
    )
    parser.add_argument(
        "--models", nargs="+", default=None, choices=list(MODELS), help="default: all"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    parser.add_argument(
        "--load",
        nargs="+",
        default=None,
        metavar="CSV",
        help="measure nothing: print the table and goals of CSV files written by --csv",
    )
    parser.add_argument(
        "--pivot", action="store_true", help="one column per K (time ratio and peak MB)"
    )
    args = parser.parse_args(argv)
    if args.load:
        _import_methods()
        rows = [row for path in args.load for row in read_csv(path)]
        if args.pivot:
            print_pivot(rows)
        else:
            print_table(rows, None)
        print_goals(rows)
        return
    if args.k is None:
        args.k = [2] if args.quick else [2, 4, 8, 16, 32]
    if args.models is None:
        args.models = ["mlp"] if args.quick else list(MODELS)
    if args.reps is None:
        args.reps = 2 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if any(k < 2 for k in args.k):
        parser.error("--k values must be at least 2")
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = run(args)
    if args.pivot:
        print_pivot(rows)
    else:
        print_table(rows, args)
    print_goals(rows)
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
