"""Every model × task set: output shapes, gradient flow, the parameter partition, encode/decode."""

from __future__ import annotations

import pytest
import torch

from gradbalance import models
from gradbalance.errors import GradBalanceError
from tests.models.helpers import (
    BATCH,
    IMAGE,
    IMAGE_MODELS,
    IMAGE_TASK_SETS,
    NON_IMAGE_MODELS,
    ZOO_MODELS,
    build,
    inputs,
    task_losses,
)

SMALL_TASK_SETS = {
    "mmoe": {
        "default": None,
        "mixed": {"click": 2, "rating": ("regression", 1), "genre": ("classification", 4)},
    },
    "multilenet": {"default": None, "three": {"left": 10, "right": 10, "sum": 19}},
    "qm9-mpnn": {
        "default": None,
        "mixed": {"u0": 1, "pair": ("regression", 2), "kind": ("classification", 3)},
    },
}


def cases():
    for name in IMAGE_MODELS:
        for set_name, tasks in IMAGE_TASK_SETS.items():
            if name == "pad-net" and set_name == "mixed":
                continue  # PAD-Net is per-pixel only (checked below)
            yield pytest.param(name, tasks, id=f"{name}-{set_name}")
    for name, sets in SMALL_TASK_SETS.items():
        for set_name, tasks in sets.items():
            yield pytest.param(name, tasks, id=f"{name}-{set_name}")


CASES = list(cases())


def test_every_zoo_model_has_cases():
    # the registry decides which models exist; a non-image model needs its own task sets
    assert set(NON_IMAGE_MODELS) <= set(ZOO_MODELS), "a stale exclusion"
    assert set(SMALL_TASK_SETS) == set(NON_IMAGE_MODELS)
    assert {case.values[0] for case in CASES} == set(ZOO_MODELS)


def expected_shape(name: str, spec: models.TaskSpec) -> tuple[int, ...]:
    if spec.dense:
        return (BATCH, spec.channels, IMAGE, IMAGE)
    return (BATCH, spec.channels)


@pytest.mark.parametrize(("name", "tasks"), CASES)
def test_forward_shapes_and_heads(name, tasks):
    model = build(name, tasks)
    out = model(inputs(name))
    assert list(out) == list(model.tasks)  # task order
    for t, spec in model.tasks.items():
        assert tuple(out[t].shape) == expected_shape(name, spec), t
        assert torch.isfinite(out[t]).all()
        if spec.kind == "normal":
            # unit length, except where a tiny untrained network outputs exactly zero
            norm = out[t].norm(dim=1)
            assert bool((((norm - 1).abs() < 1e-5) | (norm == 0)).all())
            assert bool((norm > 0.5).float().mean() > 0.5)


@pytest.mark.parametrize(("name", "tasks"), CASES)
def test_gradient_flow_and_partition(name, tasks):
    model = build(name, tasks)
    losses = task_losses(model, inputs(name))
    assert set(losses) == set(model.all_tasks)
    shared, per_task = model.parameter_partition()

    # the partition covers every parameter exactly once
    ids = [id(p) for p in shared] + [id(p) for ps in per_task.values() for p in ps]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"

    # each task's loss reaches all of its own parameters
    for t, own in per_task.items():
        grads = torch.autograd.grad(losses[t], own, retain_graph=True, allow_unused=True)
        missing = [i for i, g in enumerate(grads) if g is None]
        assert not missing, f"task {t!r} does not reach {len(missing)} of its parameters"
    # every shared parameter is reached by some task, and the total gradient is finite
    total = sum(losses.values())
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    unreached = [n for n, g in zip(names, grads) if g is None]
    assert not unreached, f"parameters without gradient: {unreached[:5]}"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)

    # the last shared layer is shared
    last = list(model.last_shared_parameters())
    shared_ids = {id(p) for p in shared}
    assert all(id(p) in shared_ids for p in last)
    assert bool(last) == bool(shared)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_encode_decode(name):
    model = build(name).eval()
    x = inputs(name)
    if not model.has_shared_features:
        with pytest.raises(models.NoSharedFeaturesError, match="no single shared representation"):
            model.encode(x)
        with pytest.raises(NotImplementedError):
            model.decode(x)
        with pytest.raises(GradBalanceError):
            model.decode(x)
        return
    z = model.encode(x)
    assert isinstance(z, torch.Tensor) and z.requires_grad
    direct, through = model(x), model.decode(z)
    assert list(direct) == list(through)
    for t in direct:
        torch.testing.assert_close(direct[t], through[t])
    # every head reads the features: each task's loss has a gradient w.r.t. them
    for t, out in through.items():
        (g,) = torch.autograd.grad(out.float().pow(2).mean(), z, retain_graph=True)
        assert bool(g.abs().sum() > 0), t


def test_shared_feature_models():
    flagged = {n for n in ZOO_MODELS if build(n).has_shared_features}
    assert flagged == {"split", "split-wide", "split-deep", "pad-net", "multilenet", "qm9-mpnn"}


@pytest.mark.parametrize("name", ["segnet", "stan"])
def test_independent_networks_share_nothing(name):
    model = build(name)
    assert list(model.shared_parameters()) == []
    assert list(model.last_shared_parameters()) == []


def test_width_scales_channels():
    small = build("split", width=1 / 32)
    larger = build("split", width=1 / 8)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(larger)
    assert small.backbone.channels == (2, 4, 8, 16, 16)
    assert build("split", width=1e-6).backbone.channels == (1, 1, 1, 1, 1)


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), float("inf")])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        models.create("split", width=width)


def test_width_type():
    with pytest.raises(TypeError, match="width"):
        models.create("mtan", width="1/16")


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_wrong_input_channels(name):
    model = build(name)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 1, IMAGE, IMAGE))


def test_wrong_inputs_small_models():
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        build("mmoe")(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        build("multilenet")(torch.randn(2, 3, 28, 28))


def test_task_parameters_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        list(build("split").task_parameters("nope"))


def test_pad_net_rejects_per_sample_tasks():
    with pytest.raises(ValueError, match="per pixel"):
        models.create("pad-net", {"depth": 1, "scene": ("classification", 3)}, width=1 / 16)


def test_per_sample_models_reject_dense_tasks():
    with pytest.raises(ValueError, match="per-pixel"):
        models.create("mmoe", {"depth": 1}, in_features=3)
    with pytest.raises(ValueError, match="per-pixel"):
        models.create("multilenet", {"segmentation": 3})


def test_odd_image_sizes():
    x = torch.randn(2, 3, 40, 56)  # 40 -> 20 -> 10 -> 5 -> 2 -> 1, 56 -> ... -> 7 -> 3 -> 1
    for name in ["split", "mtan", "dense", "cross-stitch", "nddr-cnn", "mtan-resnet", "pad-net"]:
        out = build(name)(x)
        assert tuple(out["depth"].shape) == (2, 1, 40, 56), name


def test_too_small_images():
    with pytest.raises(ValueError, match="at least 32×32"):
        build("split")(torch.randn(2, 3, 16, 16))


def test_extra_repr_names_tasks():
    assert "segmentation:segmentation[13]" in repr(build("split"))


@pytest.mark.parametrize("name", ["mtan", "pad-net", "cross-stitch", "mmoe", "multilenet"])
def test_copy_pickle_and_state_dict(name, tmp_path):
    import copy
    import pickle

    model = build(name).eval()
    x = inputs(name)
    want = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        got = clone(x)
        for t in want:
            torch.testing.assert_close(got[t], want[t])
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = build(name).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for t, v in fresh(x).items():
        torch.testing.assert_close(v, want[t])


def test_tasks_view_is_read_only():
    model = build("split")
    with pytest.raises(TypeError):
        model.tasks["extra"] = models.TaskSpec("depth", 1)
