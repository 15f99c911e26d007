"""Wrap your own model: any `nn.Module` with a shared part and one head per task.

Part 1 is the whole integration, ten lines marked ``# (n)``: wrap your optimizer in a
``GradBalancer``, tell it which parameters are shared, and hand it one loss per task.
Part 2 gives the same network the zoo's face (`gradbalance.models.MultiTaskModel`) so that
`gradbalance.training.fit`, MGDA-UB (``encode``/``decode``) and ``gb.models.create`` work too.

    python examples/custom_model.py [--method mgda] [--steps 300] [--quick]

The data: 16 features; task ``kind`` classifies the sign pattern of two of them (4 classes),
task ``size`` regresses their norm.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradbalance as gb


class MyNet(nn.Module):
    """Your model, unchanged: a trunk and two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.kind = nn.Linear(32, 4)
        self.size = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {"kind": self.kind(z), "size": self.size(z).squeeze(-1)}


def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(n, 16, generator=g)
    kind = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    return x, {"kind": kind, "size": x[:, :2].norm(dim=1)}


def part1(method: str, steps: int, out_dir: Path) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MyNet()
    opt = gb.GradBalancer(  # (1)
        torch.optim.Adam(model.parameters(), lr=1e-3),  # (2) your optimizer, as before
        method=method,  # (3) any name from `gradbalance list`
        shared=model.trunk,  # (4) the parameters every task uses
    )
    for _ in range(steps):
        x, y = batch(128, g)
        out = model(x)  # (5)
        losses = {
            "kind": F.cross_entropy(out["kind"], y["kind"]),  # (6)
            "size": F.mse_loss(out["size"], y["size"]),  # (7)
        }
        opt.zero_grad()  # (8)
        weights = opt.backward(losses)  # (9) instead of sum(losses.values()).backward()
        opt.step()  # (10)
    # Checkpoints carry the method's state too (DWA history, uncertainty variances, ...).
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out_dir / "checkpoint.pt")
    x, y = batch(2000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    acc = float((out["kind"].argmax(1) == y["kind"]).float().mean())
    mse = float(F.mse_loss(out["size"], y["size"]))
    print(
        f"part 1, {method:<8} kind accuracy {acc:.3f}, size MSE {mse:.4f}, weights "
        f"{[round(w, 3) for w in weights.tolist()]}"
    )


class MyZooNet(gb.models.MultiTaskModel):
    """The same network with the zoo's face: tasks, the parameter partition, encode/decode."""

    has_shared_features = True

    def __init__(self, tasks=None) -> None:
        super().__init__(
            gb.models.parse_tasks(
                tasks, default={"kind": ("classification", 4), "size": ("regression", 1)}
            )
        )
        self.net = MyNet()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(x)

    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kind": self.net.kind(z), "size": self.net.size(z)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(x))

    def _shared_members(self):
        return [self.net.trunk]

    def _task_members(self, task: str):
        return [getattr(self.net, task)]

    def _last_shared_members(self):
        return [self.net.trunk[2]]


def part2(steps: int) -> None:
    from gradbalance.losses import task_loss
    from gradbalance.training import fit, make_evaluator

    if "my-net" not in gb.models.list():
        gb.models.register("my-net", MyZooNet)  # now gb.models.create("my-net") works
    torch.manual_seed(0)
    model = gb.models.create("my-net")
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        method="mgda-ub",  # works on encode()'s features: needs the zoo's face
        shared=model.shared_parameters(),
    )
    g = torch.Generator().manual_seed(0)
    train = [batch(128, g) for _ in range(steps)]
    test = [batch(2000, torch.Generator().manual_seed(1))]
    history = fit(
        model,
        opt,
        train,
        {t: functools.partial(task_loss, spec) for t, spec in model.tasks.items()},
        epochs=1,
        evaluate=make_evaluator(test, model.tasks),
        show_progress=False,
    )
    final = history.final
    print(
        f"part 2, mgda-ub  kind accuracy {final['kind/accuracy']:.3f}, size MSE "
        f"{final['size/mse']:.4f} (via gradbalance.training.fit)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method",
        default="mgda",
        choices=gb.methods.available(),
        metavar="METHOD",
        help="a registered method (`gradbalance list`) (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps of each part (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="30 steps")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("custom-model-run"),
        help="folder for the checkpoint (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        gb.methods.get(args.method)
    except TypeError as exc:  # e.g. "fixed" needs its hand-tuned weights
        parser.error(f"--method {args.method} cannot be built without options ({exc})")
    steps = 30 if args.quick else args.steps
    part1(args.method, steps, args.out)
    part2(steps)


if __name__ == "__main__":
    main()
