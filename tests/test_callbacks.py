"""`gradbalance.callbacks`: the records `fit` hands its observers, and the built-in writers."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.callbacks import base as callbacks_base
from gradbalance.callbacks import tensorboard as tensorboard_module
from gradbalance.training import fit


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in "abc"})

    def forward(self, x):
        z = self.trunk(x)
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 3, generator=g), {t: torch.randn(8, generator=g) for t in "abc"})
        for _ in range(n)
    ]


MSE = {t: nn.functional.mse_loss for t in "abc"}


class Recorder(gb.callbacks.Callback):
    def __init__(self, cosines: bool = False) -> None:
        self.needs_cosines = cosines
        self.steps, self.epochs, self.ends, self.flushes = [], [], [], 0

    def on_step(self, record):
        self.steps.append(record)

    def on_epoch(self, record):
        self.epochs.append(record)

    def on_fit_end(self, history):
        self.ends.append(history)

    def flush(self):
        self.flushes += 1


def run(method: str, callbacks, epochs: int = 2, **kwargs):
    net = Net()
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.05), method, shared=net.trunk)
    history = fit(
        net,
        opt,
        batches(),
        MSE,
        epochs=epochs,
        callbacks=callbacks,
        show_progress=False,
        evaluate=lambda model: {"a/mse": 0.5},
        **kwargs,
    )
    return net, opt, history


def test_every_hook_runs_and_the_records_match_the_history():
    rec = Recorder()
    _, _, history = run("mgda", [rec])
    assert [r.step for r in rec.steps] == list(range(6))
    assert [r.epoch for r in rec.steps] == [0, 0, 0, 1, 1, 1]
    assert all(r.cosines is None for r in rec.steps)  # nobody asked
    for record, row in zip(rec.steps, history.steps):
        assert record.row() == row  # the same numbers, the same columns
    assert [(e.epoch, e.step, e.metrics) for e in rec.epochs] == [
        (0, 3, {"a/mse": 0.5}),
        (1, 6, {"a/mse": 0.5}),
    ]
    assert rec.ends == [history] and rec.flushes == 2


def test_the_cosines_are_those_of_the_task_gradients():
    rec = Recorder(cosines=True)
    run("mgda", [rec], epochs=1)
    # the first step's gradients: those of the initial network on the first batch
    net = Net()
    x, y = batches()[0]
    out = net(x)
    grads = []
    for t in "abc":
        loss = MSE[t](out[t], y[t])
        g = torch.autograd.grad(loss, list(net.trunk.parameters()), retain_graph=True)
        grads.append(torch.cat([v.reshape(-1) for v in g]).double())
    cos = rec.steps[0].cosines
    assert list(cos) == [("a", "b"), ("a", "c"), ("b", "c")]
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        expected = float(nn.functional.cosine_similarity(grads[i], grads[j], dim=0))
        assert cos[("abc"[i], "abc"[j])] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert rec.steps[0].scalars()["cosine/a~b"] == cos[("a", "b")]


def test_no_cosine_work_unless_a_callback_asks(monkeypatch):
    def fail(gramian):
        raise AssertionError("cosines computed although no callback asked for them")

    monkeypatch.setattr(callbacks_base, "pair_cosines", fail)
    run("mgda", [Recorder(cosines=False), gb.callbacks.LambdaCallback(on_step=lambda r: None)])
    run("mgda", None)


def test_loss_weightings_have_no_cosines_even_when_asked():
    rec = Recorder(cosines=True)
    run("dwa", [rec], epochs=1)
    assert all(r.cosines is None for r in rec.steps)


def test_read_step_reads_once_and_marks_a_skipped_step():
    losses = [torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float16)]
    gram = torch.tensor([[4.0, -2.0], [-2.0, 4.0]], dtype=torch.float64)
    loss_v, weight_v, cos = gb.callbacks.read_step(
        losses, torch.tensor([0.5, 0.5]), gram, cosines=True
    )
    assert (loss_v, weight_v, cos) == ([1.0, 2.0], [0.5, 0.5], [-0.5])
    _, _, cos = gb.callbacks.read_step(
        losses, torch.tensor([math.nan, math.nan]), gram, cosines=True
    )
    assert math.isnan(cos[0])  # a skipped step: the Gramian is the previous step's
    _, _, cos = gb.callbacks.read_step(losses, torch.tensor([0.5, 0.5]), None, cosines=True)
    assert len(cos) == 1 and math.isnan(cos[0])  # the columns stay


def test_on_fit_end_runs_after_an_error_without_hiding_it(caplog):
    rec = Recorder()

    class Broken(gb.callbacks.Callback):
        def on_fit_end(self, history):
            raise RuntimeError("the tracker is down")

    calls = []

    def loss(output, target):
        calls.append(1)
        if len(calls) > 4:  # the second step (three tasks per step)
            raise ValueError("a bad batch")
        return nn.functional.mse_loss(output, target)

    net = Net()
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.05), "equal")
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="a bad batch"):
        fit(net, opt, batches(), dict.fromkeys("abc", loss), epochs=1,
            callbacks=[Broken(), rec], show_progress=False)  # fmt: skip
    assert len(rec.steps) == 1 and len(rec.ends) == 1 and len(rec.ends[0].steps) == 1
    assert "the tracker is down" in caplog.text


def test_an_object_without_hooks_is_rejected():
    with pytest.raises(TypeError, match="LambdaCallback"):
        run("equal", [object()])


def test_csv_logger_writes_steps_with_cosines_and_epochs(tmp_path):
    with gb.callbacks.CSVLogger(tmp_path) as log:
        run("mgda", [log])
    with (tmp_path / "steps.csv").open(newline="") as f:
        steps = list(csv.DictReader(f))
    with (tmp_path / "epochs.csv").open(newline="") as f:
        epochs = list(csv.DictReader(f))
    assert len(steps) == 6 and list(steps[0])[:4] == ["step", "epoch", "loss/a", "weight/a"]
    assert all(-1 <= float(s["cosine/a~c"]) <= 1 for s in steps)
    assert epochs == [{"epoch": "0", "a/mse": "0.5"}, {"epoch": "1", "a/mse": "0.5"}]


def test_run_logger_keeps_its_columns_beside_a_callback_that_wants_cosines(tmp_path):
    with gb.runlog.RunLogger(tmp_path, "steps", tensorboard=False) as log:
        run("mgda", [Recorder(cosines=True)], run_logger=log)
    header = (tmp_path / "steps.csv").read_text().splitlines()[0]
    assert header == "step,epoch,loss/a,weight/a,loss/b,weight/b,loss/c,weight/c"


def test_tensorboard_logger_names_the_extra_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(tensorboard_module, "tensorboard_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install gradbalance\[tensorboard\]"):
        gb.callbacks.TensorBoardLogger(tmp_path)


def test_tensorboard_logger_writes_losses_weights_cosines_and_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with gb.callbacks.TensorBoardLogger(tmp_path) as tb:
        run("mgda", [tb])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/a", "weight/c", "cosine/a~b", "cosine/b~c", "test/a/mse"} <= tags
    assert [e.step for e in events.Scalars("loss/b")] == list(range(6))
    assert [e.step for e in events.Scalars("test/a/mse")] == [3, 6]


HOST_READS = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__")


def count_host_reads(monkeypatch, fn) -> int:
    """How many times ``fn()`` reads a tensor's value back to Python (each a host
    synchronisation on a GPU)."""
    count = [0]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("method", ["mgda", "dwa"])
def test_tracking_adds_no_host_read(monkeypatch, method):
    plain = count_host_reads(monkeypatch, lambda: run(method, None))
    tracked = count_host_reads(monkeypatch, lambda: run(method, [Recorder(cosines=True)]))
    assert tracked == plain > 0
