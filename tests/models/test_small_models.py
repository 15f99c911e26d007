"""MultiLeNet (MultiMNIST) and MMoE (tabular)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradbalance import models


def test_multilenet_architecture():
    model = models.MultiLeNet()
    assert list(model.tasks) == ["left", "right"]
    assert model.tasks["left"] == models.TaskSpec("classification", 10)
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (
        1,
        10,
        (5, 5),
    )
    assert (model.conv2.out_channels, model.fc.in_features, model.fc.out_features) == (20, 320, 50)
    head = model.heads["left"]
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (50, 50, 10)
    # trunk 260 + 5020 + 16050, heads 2 × (2550 + 510)
    assert sum(p.numel() for p in model.parameters()) == 27_450
    assert {id(p) for p in model.last_shared_parameters()} == {id(p) for p in model.fc.parameters()}


def test_multilenet_dropout_only_in_training():
    torch.manual_seed(0)
    model = models.MultiLeNet()
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(model(x)["left"], model(x)["left"])
    no_drop = models.MultiLeNet(dropout=0.0).train()
    torch.testing.assert_close(no_drop(x)["right"], no_drop(x)["right"])


def test_multilenet_options():
    m = models.MultiLeNet(("a", "b", "c"), num_classes=4, image_size=36)
    assert tuple(m(torch.randn(2, 1, 36, 36))["c"].shape) == (2, 4)
    assert m.fc.in_features == 20 * 6 * 6
    with pytest.raises(ValueError, match="image_size"):
        models.MultiLeNet(image_size=12)


def test_mmoe_gates_and_mixture():
    torch.manual_seed(0)
    model = models.MMoE(in_features=5, num_experts=3, expert_hidden=(4,), tower_hidden=(2,))
    x = torch.randn(7, 5)
    gates = model.gates(x)
    assert list(gates) == ["income", "marital"]
    for g in gates.values():
        assert tuple(g.shape) == (7, 3)
        torch.testing.assert_close(g.sum(-1), torch.ones(7))
        assert bool((g >= 0).all())
    # y_k = tower_k(Σ_e g_k,e f_e(x))
    experts = torch.stack([e(x) for e in model.experts], 1)
    want = model.towers["marital"]((gates["marital"][:, :, None] * experts).sum(1))
    torch.testing.assert_close(model(x)["marital"], want)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.experts.parameters()}


def test_mmoe_tasks_and_sizes():
    model = models.MMoE(
        {"ctr": 2, "watch": ("regression", 1)},
        in_features=4,
        num_experts=2,
        expert_hidden=(8, 6),
        tower_hidden=(),
        dropout=0.1,
    )
    out = model(torch.randn(3, 4))
    assert tuple(out["ctr"].shape) == (3, 2) and tuple(out["watch"].shape) == (3, 1)
    assert len(list(model.last_shared_parameters())) == 4  # weight + bias of 2 experts' last layer
    with pytest.raises(ValueError, match="positive"):
        models.MMoE(in_features=0)
