"""What the zoo declares shared agrees with what the autograd graph says: the last shared layer
(GradNorm's ``W``) and, for the soft-sharing models, the shared parameters themselves."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from tests.conftest import GramianFixed
from tests.models.helpers import NON_IMAGE_MODELS, ZOO_MODELS, build, inputs, task_losses

TWO_TASKS = {"segmentation": 3, "depth": 1}


def _tasks(name):
    return None if name in NON_IMAGE_MODELS else TWO_TASKS


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_default_last_shared_layer_is_the_models_declaration(name):
    model = build(name, _tasks(name))
    declared = list(model.last_shared_parameters())
    shared = list(model.shared_parameters())
    if not shared:  # single-task networks share nothing
        assert declared == []
        return
    # a weight of two or more dimensions, no BatchNorm scale or shift
    assert any(p.dim() >= 2 for p in declared)
    bn = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    }
    assert not _ids(declared) & bn
    # the balancer's default (from the graph, shared given as a plain list) is that layer
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.01), "gradnorm", shared=shared)
    opt.zero_grad()
    opt.backward(task_losses(model, inputs(name)))
    assert _ids(opt.last_shared_parameters) == _ids(declared)
    # and given the model itself, the balancer takes the declaration
    by_model = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.01), "gradnorm", shared=model
    )
    assert [id(p) for p in by_model.last_shared_parameters] == [id(p) for p in declared]


@pytest.mark.parametrize("name", ["cross-stitch", "nddr-cnn", "mtan", "split", "dense", "mmoe"])
def test_shared_parameters_are_those_two_tasks_reach(name):
    model = build(name, _tasks(name))
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.01), "equal", shared="auto")
    opt.zero_grad()
    opt.backward(task_losses(model, inputs(name)))
    assert _ids(opt.shared_parameters) == _ids(model.shared_parameters())
    shared, _ = model.parameter_partition()
    assert [id(p) for p in opt.shared_parameters] == [
        id(p) for p in model.parameters() if id(p) in _ids(shared)
    ]


@pytest.mark.parametrize("name", ["cross-stitch", "nddr-cnn"])
def test_soft_sharing_columns_are_balanced(name):
    """Weights [1, 0]: every shared parameter, the depth column included, gets the
    segmentation gradient only (before, the columns got the plain sum of both)."""
    model = build(name, TWO_TASKS)
    opt = gb.GradBalancer(
        torch.optim.SGD(model.parameters(), lr=0.01), GramianFixed([1.0, 0.0]), shared=model
    )
    losses = task_losses(model, inputs(name))
    shared = list(model.shared_parameters())
    seg = torch.autograd.grad(losses["segmentation"], shared, retain_graph=True)
    opt.zero_grad()
    opt.backward(losses)
    depth_column = _ids(model.columns["depth"].parameters())
    assert any(id(p) in depth_column for p in shared)
    for p, g in zip(shared, seg):
        torch.testing.assert_close(p.grad, g)


def test_padnet_auto_adds_the_initial_branches_to_the_shared_encoder():
    # distillation feeds every initial branch to every other main task: shared="auto" balances
    # the branches too, while shared_parameters() stays the hard-shared encoder (MGDA-UB's)
    model = build("pad-net", TWO_TASKS)
    opt = gb.GradBalancer(torch.optim.SGD(model.parameters(), lr=0.01), "equal", shared="auto")
    opt.zero_grad()
    opt.backward(task_losses(model, inputs("pad-net")))
    branches = _ids(model.initial.parameters())
    assert _ids(opt.shared_parameters) == _ids(model.shared_parameters()) | branches
    assert not _ids(model.shared_parameters()) & branches
