"""Checkpoint/resume across processes: every registered method continues bit-identically.

For each method of the registry, a first process trains ``N`` steps, saves the model's and the
balancer's ``state_dict`` with ``torch.save`` and keeps training ``M`` more steps (the
uninterrupted reference). A second, fresh process builds the model and the balancer again,
loads the checkpoint with ``torch.load(weights_only=True)`` and trains the same ``M`` steps. The
parameters, the weights of every continued step and the method's tensor state must be equal bit
for bit (``torch.equal``) on CPU.

The data stream is DataLoader-free and a pure function of the step index, the model has no
dropout, DTP gets KPIs, DWA sees ``end_epoch`` calls (the checkpoint falls in the middle of an
epoch), MGDA-UB gets the shared features. Both processes loop over all methods, so the whole
file costs two interpreter start-ups. Methods are collected from the registry after importing
every module of ``gradbalance.methods``, so a new method is covered without editing this file
(a method with required arguments gives them in its ``example_options``).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradbalance as gb
import gradbalance.methods as gm

ROOT = Path(__file__).resolve().parents[1]


def _import_method_modules() -> dict[str, str]:
    """Import every ``gradbalance.methods.<module>``; return the ones that failed to import."""
    failed = {}
    for info in pkgutil.iter_modules(gm.__path__):
        if info.name.startswith("_") or info.name in ("base", "registry"):
            continue
        try:
            importlib.import_module(f"gradbalance.methods.{info.name}")
        except Exception as exc:  # a module another change is still writing
            failed[info.name] = f"{type(exc).__name__}: {exc}"
    return failed


IMPORT_FAILURES = _import_method_modules()
METHODS = [
    name
    for name in gb.methods.available()
    if gb.methods.get_class(name).__module__.startswith("gradbalance.methods.")
]

SCRIPT = textwrap.dedent(
    r'''
    """One phase of the resume test, in a fresh interpreter: "train" or "resume"."""
    import importlib
    import json
    import pkgutil
    import sys
    import traceback
    from pathlib import Path

    import torch
    from torch import nn

    import gradbalance as gb
    import gradbalance.methods as gm
    from gradbalance.methods import FEATURES, KPIS

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the global RNG must not matter: methods own their randomness
    K, N, M, EPOCH, BATCH = 3, 6, 6, 4, 16
    TASKS = [f"t{i}" for i in range(K)]

    for info in pkgutil.iter_modules(gm.__path__):
        if not info.name.startswith("_"):
            try:
                importlib.import_module(f"gradbalance.methods.{info.name}")
            except Exception:
                pass


    class Net(nn.Module):
        """A dropout-free tanh MLP trunk with one linear head per task."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
            self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)

        def forward(self, x):
            z = self.trunk(x)
            return z, [h(z).squeeze(-1) for h in self.heads]


    def batch(t):
        g = torch.Generator().manual_seed(1000 + t)
        return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, K, generator=g)


    def kpis(t):
        return {name: 0.1 + 0.8 * ((3 * t + 5 * i) % 7) / 7 for i, name in enumerate(TASKS)}


    def build(name):
        model = Net()
        method = gb.methods.get(name, **gm.get_class(name).example_options(tuple(TASKS)))
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, gb.GradBalancer(inner, method=method, shared=model.trunk)


    def step(model, opt, t):
        x, y = batch(t)
        z, preds = model(x)
        losses = {}
        for i, (name, pred) in enumerate(zip(TASKS, preds)):
            err = pred - y[:, i]
            loss = err.pow(2).mean() if i % 2 == 0 else err.abs().mean()
            losses[name] = (i + 1) * loss + 0.01
        extra = {}
        if FEATURES in opt.method.requires:
            extra["features"] = z
        if KPIS in opt.method.requires:
            extra["kpis"] = kpis(t)
        opt.zero_grad()
        w = opt.backward(losses, **extra)
        opt.step()
        if (t + 1) % EPOCH == 0:
            opt.end_epoch()
        return w.detach().clone()


    def result(model, opt, weights):
        state = {
            k: v.detach().clone()
            for k, v in opt.method.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
        return {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "weights": torch.stack(weights),
            "method_state": state,
        }


    def main(phase, out):
        out = Path(out)
        status = {}
        for name in gb.methods.available():
            if not gb.methods.get_class(name).__module__.startswith("gradbalance.methods."):
                continue
            try:
                model, opt = build(name)
                if phase == "train":
                    for t in range(N):
                        step(model, opt, t)
                    torch.save(
                        {"model": model.state_dict(), "opt": opt.state_dict()},
                        out / f"{name}.ckpt.pt",
                    )
                else:
                    ckpt = torch.load(out / f"{name}.ckpt.pt", weights_only=True)
                    model.load_state_dict(ckpt["model"])
                    opt.load_state_dict(ckpt["opt"])
                    if opt.steps != N:
                        raise AssertionError(f"restored {opt.steps} steps, expected {N}")
                weights = [step(model, opt, t) for t in range(N, N + M)]
                torch.save(result(model, opt, weights), out / f"{name}.{phase}.pt")
                status[name] = "ok"
            except Exception:
                status[name] = traceback.format_exc()
        (out / f"{phase}.json").write_text(json.dumps(status))


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    '''
)


def _run(script: Path, phase: str, out: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script), phase, str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{phase} process failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / f"{phase}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the train phase and the resume phase, each in its own fresh interpreter."""
    out = tmp_path_factory.mktemp("resume")
    script = out / "resume_phase.py"
    script.write_text(SCRIPT)
    train = _run(script, "train", out)
    resume = _run(script, "resume", out)
    return out, train, resume


def test_every_method_module_imports():
    assert not IMPORT_FAILURES, f"method modules that do not import: {IMPORT_FAILURES}"


def test_core_methods_are_covered():
    assert {"uncertainty", "dwa", "dtp", "gradnorm", "mgda", "mgda-ub"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_identical(runs, name):
    out, train, resume = runs
    if name not in train:
        pytest.fail(f"{name!r} is registered here but not in a fresh interpreter")
    assert train[name] == "ok", f"training {name!r} failed:\n{train[name]}"
    assert resume[name] == "ok", f"resuming {name!r} failed:\n{resume[name]}"
    ref = torch.load(out / f"{name}.train.pt", weights_only=True)
    got = torch.load(out / f"{name}.resume.pt", weights_only=True)
    bad_weights = [
        i for i, (a, b) in enumerate(zip(ref["weights"], got["weights"])) if not torch.equal(a, b)
    ]
    assert not bad_weights, (
        f"{name}: the weights of continued steps {bad_weights} differ after resuming:\n"
        f"uninterrupted {ref['weights'].tolist()}\nresumed {got['weights'].tolist()}"
    )
    bad_params = [k for k in ref["params"] if not torch.equal(ref["params"][k], got["params"][k])]
    assert not bad_params, f"{name}: parameters {bad_params} differ after resuming"
    assert ref["method_state"].keys() == got["method_state"].keys()
    bad_state = [
        k
        for k in ref["method_state"]
        if not torch.equal(ref["method_state"][k], got["method_state"][k])
    ]
    assert not bad_state, f"{name}: method state {bad_state} differs after resuming"
