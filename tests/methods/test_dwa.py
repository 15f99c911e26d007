"""DWA: the weights equal the MTAN formula on a scripted loss sequence, are 1 for two epochs and
constant within an epoch; windows; checkpoints; skipped and failed steps."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import gradbalance as gb
from gradbalance.methods import DWA
from tests.conftest import MultiHeadNet
from tests.methods.resume import check_resume, method_state, same_state, train_step

# scripted per-step losses of 3 tasks: SCRIPT[epoch][step] = (L_0, L_1, L_2)
SCRIPT = [
    [(4.0, 2.0, 1.0), (3.0, 2.0, 0.9), (2.6, 1.8, 1.1)],
    [(2.0, 1.9, 0.8), (1.6, 1.7, 0.9), (1.5, 1.8, 0.7)],
    [(1.2, 1.7, 0.5), (1.0, 1.5, 0.6), (0.9, 1.6, 0.4)],
    [(0.8, 1.5, 0.3), (0.7, 1.4, 0.3), (0.7, 1.4, 0.2)],
    [(0.6, 1.3, 0.2), (0.6, 1.2, 0.2), (0.5, 1.2, 0.1)],
]


def expected_weights(script, temperature=2.0):
    """The paper's Eq. 7 written out with numpy, from the epoch means of the script."""
    means = [np.mean(np.array(epoch), axis=0) for epoch in script]
    out = []
    for e in range(len(script)):
        if e < 2:
            out.append(np.ones(3))
            continue
        r = means[e - 1] / means[e - 2]
        out.append(3 * np.exp(r / temperature) / np.exp(r / temperature).sum())
    return out


def scripted_balancer(**kw):
    theta = torch.zeros((), requires_grad=True)
    opt = gb.GradBalancer(torch.optim.SGD([theta], lr=0.0), method="dwa", **kw)
    return theta, opt


def scripted_losses(theta, values):
    return {f"t{i}": torch.tensor(v) + 0.0 * theta for i, v in enumerate(values)}


def run_script(theta, opt, script, end_epochs=True):
    got = []
    for epoch in script:
        ws = []
        for values in epoch:
            opt.zero_grad()
            ws.append(opt.backward(scripted_losses(theta, values)).double())
            opt.step()
        got.append(ws)
        if end_epochs:
            opt.end_epoch()
    return got


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_weights_equal_the_formula_on_a_scripted_loss_sequence(temperature):
    theta, opt = scripted_balancer(temperature=temperature)
    got = run_script(theta, opt, SCRIPT)
    expected = expected_weights(SCRIPT, temperature)
    for e, ws in enumerate(got):
        for w in ws:  # constant within the epoch
            np.testing.assert_allclose(w.numpy(), expected[e], rtol=1e-6, atol=1e-6)
    assert all(bool((w == 1).all()) for ws in got[:2] for w in ws)
    assert float(got[-1][0].sum()) == pytest.approx(3.0)
    # task 1's loss went down the least, so it gets the largest weight from epoch 2 on
    assert all(int(ws[0].argmax()) == 1 for ws in got[2:])


def test_window_closes_virtual_epochs_every_n_steps():
    theta, opt = scripted_balancer(window=3)
    got = run_script(theta, opt, SCRIPT, end_epochs=False)
    theta2, opt2 = scripted_balancer()
    ref = run_script(theta2, opt2, SCRIPT)
    for ws, rs in zip(got, ref):
        for w, r in zip(ws, rs):
            assert torch.equal(w, r)
    # with a window, end_epoch() is a no-op
    state = {k: v.clone() for k, v in opt.method.state_dict().items() if torch.is_tensor(v)}
    opt.end_epoch()
    assert all(torch.equal(v, opt.method.state_dict()[k]) for k, v in state.items())


def test_an_epoch_without_steps_is_not_counted():
    theta, opt = scripted_balancer()
    run_script(theta, opt, SCRIPT[:1])
    with pytest.warns(RuntimeWarning, match="no step"):
        opt.end_epoch()
    assert int(opt.method.epochs) == 1


def test_skipped_step_does_not_count_in_the_epoch_average():
    theta, opt = scripted_balancer(nonfinite="skip")
    for e, epoch in enumerate(SCRIPT[:3]):
        for values in epoch:
            opt.zero_grad()
            opt.backward(scripted_losses(theta, values))
            opt.step()
            if e == 1:  # a bad step in the middle of epoch 1
                opt.zero_grad()
                opt.backward(scripted_losses(theta, (math.nan, 100.0, 100.0)))
                opt.step()
        opt.end_epoch()
    assert opt.skipped_steps == 3
    opt.zero_grad()
    w = opt.backward(scripted_losses(theta, (1.0, 1.0, 1.0))).double()
    np.testing.assert_allclose(w.numpy(), expected_weights(SCRIPT[:4])[3], rtol=1e-6)


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_skipped_or_failed_step_leaves_state_untouched(policy):
    theta, opt = scripted_balancer(nonfinite=policy)
    run_script(theta, opt, SCRIPT[:2])
    opt.zero_grad()
    opt.backward(scripted_losses(theta, (1.0, 1.0, 1.0)))
    opt.step()
    before = method_state(opt.method)
    opt.zero_grad()
    bad = scripted_losses(theta, (1.0, math.inf, 1.0))
    if policy == "skip":
        opt.backward(bad)
        opt.step()
    else:
        with pytest.raises(gb.NonFiniteError, match="t1"):
            opt.backward(bad)
    assert same_state(before, method_state(opt.method))


@pytest.mark.parametrize("window", [None, 3])
def test_save_and_resume_bit_identically(window):
    """Saved in the middle of an epoch (partial sums) after the weights left 1."""

    def make(model, seed):
        return gb.GradBalancer(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            method="dwa",
            window=window,
            shared=model.trunk,
        )

    def step(opt, model, t):
        weights = train_step(opt, model, t, batch=8)
        if (t + 1) % 2 == 0:
            opt.end_epoch()
        return weights

    run = check_resume(
        make, steps=11, split=7, make_model=lambda seed: MultiHeadNet("mlp", seed=seed), step=step
    )
    assert int(run.split_state["epoch_steps"]) == 1
    assert not torch.equal(run.resumed.last_weights, torch.ones(3))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DWA(**kwargs)


def test_registry_and_repr():
    m = gb.methods.get("dwa", temperature=3.0, window=10)
    assert isinstance(m, DWA)
    assert "window=10" in repr(m)
    assert "Liu" in DWA.paper


# ---------------------------------------------------------------------------- no epochs (issue 12)
def test_warns_once_when_no_epoch_is_ever_closed(monkeypatch):
    """Without end_epoch() or window= the weights stay 1 forever: one UserWarning says so once
    the first `epoch_warning_steps` applied steps passed without any epoch closed."""
    monkeypatch.setattr(DWA, "epoch_warning_steps", 5)
    theta, opt = scripted_balancer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            opt.zero_grad()
            opt.backward(scripted_losses(theta, (1.0, 2.0, 3.0)))
            opt.step()
    with pytest.warns(UserWarning, match="end_epoch") as record:
        for _ in range(20):
            opt.zero_grad()
            opt.backward(scripted_losses(theta, (1.0, 2.0, 3.0)))
            opt.step()
    assert len([w for w in record if "end_epoch" in str(w.message)]) == 1


@pytest.mark.parametrize("window", [None, 3])
def test_no_warning_when_epochs_are_closed(monkeypatch, window):
    monkeypatch.setattr(DWA, "epoch_warning_steps", 5)
    theta, opt = scripted_balancer(window=window)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_script(theta, opt, SCRIPT + SCRIPT, end_epochs=window is None)


def test_default_warning_threshold():
    assert DWA.epoch_warning_steps == 1000
