"""The recipe behind the checkpoint fixtures of this folder, and the run that resumes them.

Each ``format<N>.ckpt`` holds, for every method of `METHODS`, the ``state_dict`` of a tiny
model and of its `GradBalancer` after `SAVED_AT` steps, written by the code of the day the
balancer's checkpoint format was ``N``, and what `MORE` further steps from there gave on that
day: the parameters and the method's tensor state. ``tests/test_checkpoint_formats.py`` loads
each file into freshly built objects, runs the same `MORE` steps and compares.

``format1.ckpt`` (``{"optimizer", "method", "balancer"}``) was written at commit ``ae624f1``;
``format2.ckpt`` (torch's ``{"state", "param_groups"}`` plus ``"gradbalance"``) by the change
that introduced it. To keep a checkpoint of a new format, run at the commit that writes it::

    python -m tests.checkpoints.recipe tests/checkpoints/format<N>.ckpt

and never rewrite an existing file: it stands for checkpoints users already hold.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gradbalance as gb

#: Methods with state of different kinds: GradNorm's weights and Adam moments, uncertainty
#: weighting's learnable log-variances (a param group of their own), DWA's epoch history (the
#: checkpoint falls mid-epoch), PCGrad's generator state.
METHODS = ("gradnorm", "uncertainty", "dwa", "pcgrad")

#: Steps before the checkpoint, and after it.
SAVED_AT = 3
MORE = 3

TASKS = ("a", "b", "c")


class TinyNet(nn.Module):
    """A shared ``Linear(4, 8) + tanh`` trunk and one ``Linear(8, 1)`` head per task."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in TASKS)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def balancer(model: TinyNet, method: str) -> gb.GradBalancer:
    """The balancer of the recipe: Adam on every parameter, the trunk shared."""
    return gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=0.05), method, shared=model.trunk
    )


def run(model: TinyNet, opt: gb.GradBalancer, start: int, steps: int) -> None:
    """Train ``steps`` steps from step ``start``; the data is a function of the step index and
    an epoch ends after every odd step."""
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(6, 4, generator=g)
        y = torch.randn(6, len(TASKS), generator=g)
        outs = model(x)
        losses = {t: ((o - y[:, i]) ** 2).mean() for i, (t, o) in enumerate(zip(TASKS, outs))}
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        if step % 2 == 1:
            opt.end_epoch()


def method_tensors(opt: gb.GradBalancer) -> dict[str, Tensor]:
    """The method's tensor state (copies)."""
    return {k: v.detach().clone() for k, v in opt.method.state_dict().items() if torch.is_tensor(v)}


def write(path: Path) -> dict[str, Any]:
    """Run the recipe for every method and save what it gives to ``path``."""
    out: dict[str, Any] = {"torch": str(torch.__version__), "methods": {}}
    for method in METHODS:
        torch.manual_seed(0)  # the default seed of PCGrad's generator
        model = TinyNet()
        opt = balancer(model, method)
        run(model, opt, 0, SAVED_AT)
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        run(model, opt, SAVED_AT, MORE)
        out["methods"][method] = {
            **saved,
            "parameters": [p.detach().clone() for p in model.parameters()],
            "method_state": method_tensors(opt),
        }
    torch.save(out, path)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.checkpoints.recipe OUT.ckpt")
    write(Path(sys.argv[1]))
