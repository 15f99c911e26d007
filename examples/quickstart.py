"""Quickstart: train one shared trunk on two conflicting regression tasks with several methods.

Runs in a few seconds on a CPU and prints a table of the final per-task losses and weights.

    python examples/quickstart.py [--steps 300] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradbalance as gb

METHODS = [("equal", {}), ("mean", {}), ("fixed", {"weights": [1.0, 4.0]})]
OPTIONAL = [("mgda", {}), ("mgda-ub", {}), ("uncertainty", {}), ("dwa", {"window": 20})]


class TwoTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleDict({"smooth": nn.Linear(32, 1), "sharp": nn.Linear(32, 1)})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = self.trunk(x)
        return {name: head(z).squeeze(-1) for name, head in self.heads.items()}, z


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(n, 8, generator=generator)
    targets = {
        "smooth": torch.sin(x[:, 0]) + 0.5 * x[:, 1],
        "sharp": 10.0 * torch.sign(x[:, 0]) * x[:, 2].abs(),
    }
    return x, targets


def train(method: str, options: dict, steps: int) -> tuple[dict[str, float], list[float]]:
    torch.manual_seed(0)
    model = TwoTaskNet()
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=3e-3), method=method, shared=model.trunk, **options
    )
    g = torch.Generator().manual_seed(1)
    weights = torch.zeros(2)
    for _ in range(steps):
        x, y = make_data(64, g)
        out, z = model(x)
        losses = {k: nn.functional.mse_loss(out[k], y[k]) for k in out}
        opt.zero_grad()
        weights = opt.backward(losses, features=z)
        opt.step()
    x, y = make_data(2048, torch.Generator().manual_seed(99))
    with torch.no_grad():
        out, _ = model(x)
    # normalise by each task's target variance: 1.0 means "predicts the mean"
    return (
        {k: float(nn.functional.mse_loss(out[k], y[k]) / y[k].var()) for k in out},
        weights.tolist(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps per method (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="30 steps (for smoke tests)")
    args = parser.parse_args()
    steps = 30 if args.quick else args.steps
    available = set(gb.methods.available())
    methods = METHODS + [(m, o) for m, o in OPTIONAL if m in available]
    print(f"{'method':<12} {'smooth (rel. MSE)':>18} {'sharp (rel. MSE)':>17}  last weights")
    for name, options in methods:
        metrics, weights = train(name, options, steps)
        w = ", ".join(f"{v:.3f}" for v in weights)
        print(f"{name:<12} {metrics['smooth']:>18.4f} {metrics['sharp']:>17.4f}  [{w}]")


if __name__ == "__main__":
    main()
