"""QM9 with eleven targets: every method of the registry against the published table.

The protocol of the multi-task QM9 experiments of Nash-MTL (Navon et al., ICML 2022) and FAMO
(Liu et al., NeurIPS 2023), as far as a 2-core CPU allows, and what differs:

==================  ====================================  =====================================
                    the papers (code of both)             this script (defaults)
==================  ====================================  =====================================
data                PyG QM9, 110,831 / 10k / 10k          `gradbalance.data.QM9`, first
                                                          ``--train-size`` molecules of the
                                                          110,000 training split / 10k val /
                                                          ``--test-size`` of the test split
targets             11 (PyG 0,1,2,3,5,6,12,13,14,15,11),  the same, standardised with the
                    z-scored                              training split's mean and std
model               PyG NNConv MPNN + GRU + Set2Set,      ``qm9-mpnn`` (SchNet-style, sum
                    width 64                              pooling), ``--width`` x 64
training            300 epochs, batch 120, Adam 1e-3,     ``--epochs``, batch ``--batch-size``,
                    ReduceLROnPlateau on val Δm           Adam ``--lr``, no schedule
method parameters   lr 0.025 (UW's log σ², FAMO logits)   the same (uncertainty ``lr=0.025``;
                                                          FAMO's default)
Nash-MTL failure    keeps the previous weights            the same, with a warning
                                                          (``on_failure="warn"``)
selection           test at the epoch of best val Δm      test after the last epoch
Δm%                 mean_k (M_k - STL_k) / STL_k x 100,   the same, against single-task runs of
                    lower is better, STL constants        this script (same model, one head)
seeds               3                                     ``--seeds`` (default 3)
==================  ====================================  =====================================

Every (method, seed) run and every single-task run is appended to ``--out/runs.csv`` as soon
as it ends, so a long run can be read (and resumed: finished rows are skipped) while it goes
on; ``--summary`` prints the table from that file: per method the mean ± std over seeds of
Δm% (the papers' sign: positive is worse than single-task), its rank, and the published Δm%
beside it. Methods that need more than the targets provide are left out (DTP needs a KPI in
[0, 1]; ``fixed`` needs its weights).

Usage::

    python benchmarks/qm9.py --out /tmp/qm9 --jobs 2          # runs (hours with the defaults)
    python benchmarks/qm9.py --out /tmp/qm9 --summary         # the table so far
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

#: Published Δm% (lower is better) on QM9: Navon et al. 2022, Table 1 (mean of 3 seeds, ±
#: as printed there), and FAMO (Liu et al. 2023, Table 2; its ± is Table 6's standard error).
PUBLISHED = {
    "equal": ("LS", 177.6, 3.4),
    "gls": ("SI", 77.8, 9.2),
    "rlw": ("RLW", 203.8, 3.4),
    "dwa": ("DWA", 175.3, 6.3),
    "uncertainty": ("UW", 108.0, 22.5),
    "mgda": ("MGDA", 120.5, 2.0),
    "pcgrad": ("PCGrad", 125.7, 10.3),
    "cagrad": ("CAGrad", 112.8, 4.0),
    "imtl-g": ("IMTL-G", 77.2, 9.3),
    "nash-mtl": ("Nash-MTL", 62.0, 1.4),
    "famo": ("FAMO", 58.5, 3.26),
}

#: Registered methods this benchmark cannot run with their defaults on regression targets.
SKIPPED = {"dtp": "needs a KPI in [0, 1]", "fixed": "needs its weights"}

#: Options the papers' code gives some methods: uncertainty's lr of the log-variances; Nash-MTL
#: keeps the previous weights when its solver does not converge (the official code's behaviour,
#: with a warning here; gradbalance's default raises).
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "uncertainty": {"lr": 0.025},
    "nash-mtl": {"on_failure": "warn"},
}

FIELDS = ["kind", "method", "seed", "target", "seconds", "steps", "seconds_per_step"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder of runs.csv")
    p.add_argument("--methods", nargs="+", default=None, help="default: every runnable method")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, +1, ...")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--jobs", type=int, default=1, help="processes (one torch thread each)")
    p.add_argument("--summary", action="store_true", help="print the table of runs.csv")
    p.add_argument("--markdown", action="store_true", help="the summary as a markdown table")
    return p.parse_args(argv)


def runnable_methods() -> list[str]:
    import gradbalance as gb

    return [m for m in gb.methods.available() if m not in SKIPPED]


def train(job: dict[str, Any]) -> dict[str, Any]:
    """One training run: ``job["kind"]`` is ``"mtl"`` (all targets, one method) or ``"stl"``
    (one target, plain Adam). Returns the row of runs.csv."""
    import torch

    torch.set_num_threads(1)
    import gradbalance as gb
    from gradbalance.data.qm9 import MEV_TARGETS, TARGETS
    from gradbalance.training import TensorLoader, fit, make_evaluator

    targets = TARGETS if job["kind"] == "mtl" else (job["target"],)
    train_set = gb.data.QM9("train", targets, size=job["train_size"])
    test_set = gb.data.QM9("test", targets, size=job["test_size"])
    torch.manual_seed(job["seed"])
    tasks = {t: gb.models.TaskSpec("regression", 1) for t in targets}
    model = gb.models.create("qm9-mpnn", tasks=tasks, width=job["width"])
    inner = torch.optim.Adam(model.parameters(), lr=job["lr"])
    method = job["method"] if job["kind"] == "mtl" else "equal"
    opt = gb.GradBalancer(
        inner,
        method,
        shared=model,
        tasks=list(targets),
        **METHOD_KWARGS.get(method, {}),
    )
    x, y = train_set.tensors()
    loader = TensorLoader(x, y, job["batch_size"], seed=job["seed"])
    xt, yt = test_set.tensors()
    evaluate = make_evaluator(TensorLoader(xt, yt, 1000, shuffle=False), model.tasks)
    started = time.perf_counter()
    history = fit(
        model,
        opt,
        loader,
        {t: gb.losses.regression_loss for t in targets},
        epochs=job["epochs"],
        evaluate=evaluate,
        show_progress=False,
        pass_features=True,
    )
    row = {k: job[k] for k in ("kind", "method", "seed", "target")}
    row.update(
        seconds=round(time.perf_counter() - started, 1),
        steps=len(history.steps),
        seconds_per_step=history.seconds_per_step,
    )
    for i, t in enumerate(targets):
        mae = history.final[f"{t}/mae"] * float(test_set.target_scale[i])
        row[f"{t}_mae"] = mae * (1000 if t in MEV_TARGETS else 1)  # the papers' units
    return row


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def jobs_to_run(args: argparse.Namespace, done: list[dict[str, str]]) -> list[dict[str, Any]]:
    from gradbalance.data.qm9 import TARGETS

    finished = {(r["kind"], r["method"], r["seed"], r["target"]) for r in done}
    common = {
        "train_size": args.train_size,
        "test_size": args.test_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "width": args.width,
    }
    jobs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for target in TARGETS:
            jobs.append({"kind": "stl", "method": "stl", "seed": seed, "target": target, **common})
        for method in args.methods or runnable_methods():
            jobs.append({"kind": "mtl", "method": method, "seed": seed, "target": "", **common})
    return [
        j for j in jobs if (j["kind"], j["method"], str(j["seed"]), j["target"]) not in finished
    ]


def run(args: argparse.Namespace) -> None:
    from gradbalance.data.qm9 import TARGETS

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.csv"
    fields = FIELDS + [f"{t}_mae" for t in TARGETS]
    todo = jobs_to_run(args, read_rows(path))
    print(f"{len(todo)} runs to go; rows are appended to {path}", flush=True)
    new_file = not path.exists()
    with path.open("a", newline="") as f, ProcessPoolExecutor(max_workers=args.jobs) as pool:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        futures = {pool.submit(train, job): job for job in todo}
        for i, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # report it, go on with the others
                print(f"  {job['method']} seed {job['seed']}: failed: {exc}", flush=True)
                continue
            writer.writerow(row)
            f.flush()
            name = row["target"] or row["method"]
            print(
                f"  [{i}/{len(todo)}] {row['kind']} {name} seed {row['seed']}: {row['seconds']} s",
                flush=True,
            )


def summary(args: argparse.Namespace) -> str:
    from gradbalance.data.qm9 import TARGETS

    rows = read_rows(args.out / "runs.csv")
    stl: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "stl":
            stl.setdefault(r["target"], []).append(float(r[f"{r['target']}_mae"]))
    missing = [t for t in TARGETS if t not in stl]
    if missing:
        return f"no single-task baseline yet for {missing}: Δm% needs all eleven"
    base = {t: statistics.fmean(v) for t, v in stl.items()}
    by_method: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] != "mtl":
            continue
        delta = 100 * statistics.fmean((float(r[f"{t}_mae"]) - base[t]) / base[t] for t in TARGETS)
        by_method.setdefault(r["method"], []).append(delta)
    ranked = sorted(by_method, key=lambda m: statistics.fmean(by_method[m]))
    published = sorted((v[1], m) for m, v in PUBLISHED.items())
    paper_rank = {m: i + 1 for i, (_, m) in enumerate(published)}
    ours_rank = {m: i + 1 for i, m in enumerate(m for m in ranked if m in PUBLISHED)}
    header = ["method", "seeds", "Δm% (ours)", "rank", "published Δm%", "published rank"]
    lines = []
    for m in ranked:
        d = by_method[m]
        spread = statistics.stdev(d) if len(d) > 1 else math.nan
        pub = PUBLISHED.get(m)
        lines.append(
            [
                m,
                str(len(d)),
                f"{statistics.fmean(d):+.1f} ± {spread:.1f}",
                str(ours_rank.get(m, "")),
                f"{pub[1]:.1f} ± {pub[2]:g} ({pub[0]})" if pub else "",
                str(paper_rank.get(m, "")),
            ]
        )
    if args.markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.summary:
        print(summary(args))
        return 0
    run(args)
    print(summary(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
