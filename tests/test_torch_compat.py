"""The private torch entry points of `gradbalance._torch_compat` and their fallbacks agree.

Each test runs a shim with the private entry point and with it removed (as on a torch release
that dropped it), and checks that both give the same result.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance import _linalg, _torch_compat, engine
from gradbalance.balancer import guards


def test_the_engine_reexports_the_linear_algebra():
    assert engine.gramian is _linalg.gramian
    assert engine.combine is _linalg.combine


def test_flatten_without_the_private_helpers(monkeypatch):
    tensors = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    flat = _torch_compat.flatten_dense(tensors)
    views = _torch_compat.unflatten_dense(flat, tensors)
    monkeypatch.setattr(_torch_compat, "_FLATTEN", None)
    monkeypatch.setattr(_torch_compat, "_UNFLATTEN", None)
    assert torch.equal(_torch_compat.flatten_dense(tensors), flat)
    for a, b, t in zip(_torch_compat.unflatten_dense(flat, tensors), views, tensors):
        assert a.shape == t.shape and torch.equal(a, b)


def test_autograd_grad_without_the_private_engine_call(monkeypatch):
    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    fast = _torch_compat.autograd_grad((w**3).sum(), (w, unused), False)
    monkeypatch.setattr(_torch_compat, "_RUN_BACKWARD", None)
    slow = _torch_compat.autograd_grad((w**3).sum(), (w, unused), False)
    assert torch.equal(fast[0], slow[0]) and fast[1] is None and slow[1] is None


@pytest.mark.parametrize("bad", [False, True])
def test_nonfinite_check_without_the_fused_kernel(monkeypatch, bad):
    expanded = torch.randn(2, 2).expand(2, 2, 2)  # the fused kernel refuses internal overlap
    tensors = [torch.randn(3), expanded, torch.randn(4, dtype=torch.float64)]
    if bad:
        tensors[2][1] = float("inf")
    fused = guards.all_finite(tensors)
    monkeypatch.setattr(_torch_compat, "_FUSED_NONFINITE_CHECK", None)
    monkeypatch.setattr(guards, "HAS_FUSED_NONFINITE_CHECK", False)
    with pytest.raises(NotImplementedError):
        _torch_compat.fused_nonfinite_flag(tensors)
    assert guards.all_finite(tensors) == fused == (not bad)


def test_module_snapshot_undoes_registrations():
    m = nn.Sequential(nn.Linear(2, 2))
    snap = _torch_compat.module_snapshot(m)
    m.register_buffer("b", torch.zeros(1), persistent=False)
    m[0].extra = nn.Parameter(torch.zeros(1))
    m.add_module("more", nn.ReLU())
    _torch_compat.module_restore(snap)
    assert [n for n, _ in m.named_parameters()] == ["0.weight", "0.bias"]
    assert list(m.named_buffers()) == [] and len(m) == 1
    assert not hasattr(m[0], "extra") and not hasattr(m, "b")


def test_a_balancer_steps_the_same_without_any_private_entry_point(monkeypatch):
    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
        params = [*trunk.parameters(), *heads.parameters()]
        opt = gb.GradBalancer(torch.optim.SGD(params, lr=0.1), "mgda", shared=trunk)
        x = torch.randn(5, 4)
        for _ in range(3):
            z = trunk(x)
            opt.zero_grad()
            opt.backward([h(z).pow(2).mean() for h in heads])
            opt.step()
        return [p.detach().clone() for p in params]

    with_private = run()
    for name in ("_FLATTEN", "_UNFLATTEN", "_RUN_BACKWARD", "_FUSED_NONFINITE_CHECK"):
        monkeypatch.setattr(_torch_compat, name, None)
    monkeypatch.setattr(guards, "HAS_FUSED_NONFINITE_CHECK", False)
    for a, b in zip(with_private, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
