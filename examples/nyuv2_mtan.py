"""MTAN, Cross-Stitch or PAD-Net on NYUv2 with the MTAN paper's training protocol.

Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019: 13-class
segmentation, depth and surface normals on NYUv2 (the community's preprocessed ``.npy``
copy, 795 train / 654 val images at 288×384); Adam with lr 1e-4, the lr halved every 100
epochs (``StepLR(100, 0.5)``), 200 epochs, batch 2, and the reported numbers are the mean of
the validation metrics over the last 10 epochs. These are the defaults here.

    python examples/nyuv2_mtan.py --root /data/nyuv2 [--model mtan] [--method dwa]
    python examples/nyuv2_mtan.py --model pad-net --method uncertainty --root /data/nyuv2
    python examples/nyuv2_mtan.py --quick     # a tiny fixture dataset written into --out

The full protocol is a GPU job (days on a CPU). ``--quick`` writes a 4-image NYUv2-layout
fixture with `gradbalance.data.write_fixture`, builds the model at width 1/16 and trains 2
epochs. Writes ``<out>/steps.csv`` (losses and weights per step) and ``<out>/epochs.csv``
(validation metrics per epoch).
"""

from __future__ import annotations

import argparse
import csv
import functools
from pathlib import Path

import torch

import gradbalance as gb
from gradbalance.data import NYUv2, write_fixture
from gradbalance.losses import task_loss
from gradbalance.runlog import RunLogger
from gradbalance.training import fit, make_evaluator, make_kpi_fn

MODELS = ("mtan", "cross-stitch", "pad-net")
# Options a method needs here: segmentation is a classification, depth and normals regressions.
METHOD_OPTIONS = {
    "uncertainty": {
        "task_types": {
            "segmentation": "classification",
            "depth": "regression",
            "normal": "regression",
        }
    },
    # hand-tuned weights: edit them here
    "fixed": {"weights": {"segmentation": 1.0, "depth": 1.0, "normal": 1.0}},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="NYUv2 folder holding train/ and val/")
    parser.add_argument(
        "--model", choices=MODELS, default="mtan", help="the network (default: %(default)s)"
    )
    parser.add_argument(
        "--method",
        default="dwa",
        choices=gb.methods.available(),
        metavar="METHOD",
        help="a registered method (`gradbalance list`) (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=200, help="training epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=2, help="images per step (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="Adam's initial learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--width", type=float, default=1.0, help="channel multiplier (default: %(default)s)"
    )
    parser.add_argument(
        "--last", type=int, default=10, help="report the mean of the last N (default: %(default)s)"
    )
    parser.add_argument("--augment", action="store_true", help="random scale-crop and flip")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation and shuffle seed")
    parser.add_argument("--quick", action="store_true", help="tiny fixture, width 1/16, 2 epochs")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("nyuv2-run"),
        help="folder for the CSV logs (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.width = 2, 1 / 16
        if args.root is None:
            args.root = write_fixture(args.out / "nyuv2-fixture", n=4, size=(32, 32))
    if args.root is None:
        parser.error("--root is required (or --quick to run on a tiny fixture)")

    try:
        train = NYUv2(args.root, "train", augment=args.augment)
        val = NYUv2(args.root, "val")
    except gb.data.DatasetError as exc:
        parser.error(str(exc))
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, generator=generator
    )
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size)

    torch.manual_seed(args.seed)
    model = gb.models.create(args.model, tasks=gb.models.NYUV2_TASKS, width=args.width)
    if "features" in gb.methods.get_class(args.method).requires and not model.has_shared_features:
        parser.error(f"--method {args.method} needs shared features: use it with --model pad-net")
    model.to(args.device)
    optimizer = torch.optim.Adam(model.param_groups(args.lr), lr=args.lr)
    opt = gb.GradBalancer(
        optimizer,
        method=args.method,
        shared=model.shared_parameters(),
        tasks=list(model.all_tasks),  # creates a method's own parameters before the scheduler
        **METHOD_OPTIONS.get(args.method, {}),
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)

    if args.model == "pad-net" and "features" not in opt.method.requires:
        # PAD-Net's deep supervision: each task's loss covers its initial and final predictions.
        forward, losses = model.predict, model.deep_supervision_losses
    else:
        forward = None
        losses = {t: functools.partial(task_loss, spec) for t, spec in model.tasks.items()}

    kpi_fn = make_kpi_fn(model.tasks) if "kpis" in opt.method.requires else None
    with RunLogger(args.out, "steps") as log:
        history = fit(
            model,
            opt,
            loader,
            losses,
            epochs=args.epochs,
            evaluate=make_evaluator(val_loader, model.tasks, device=args.device),
            kpi_fn=kpi_fn,
            scheduler=scheduler,
            run_logger=log,
            desc=f"{args.model} + {args.method}",
            forward=forward,
            device=args.device,
        )

    with (args.out / "epochs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history.epochs[0]))
        writer.writeheader()
        writer.writerows(history.epochs)
    n = min(args.last, len(history.epochs))
    mean = history.mean_of_last(n)
    print(f"{args.model} + {args.method} on {args.root}: mean of the last {n} epoch(s) on val")
    for key, value in mean.items():
        print(f"  {key:<26} {value:.4f}")
    print("(Δm% against your single-task runs: gb.metrics.delta_m(results, baselines))")


if __name__ == "__main__":
    main()
