"""PAD-Net: initial and final predictions, auxiliary tasks, distillation, deep supervision."""

from __future__ import annotations

import pytest
import torch

from gradbalance import models
from tests.models.helpers import inputs, target_for


def make(**kw):
    torch.manual_seed(0)
    return models.PADNet(
        {"segmentation": 5, "depth": 1},
        auxiliary={"normal": 3, "contour": ("segmentation", 2)},
        width=1 / 16,
        **kw,
    )


@pytest.mark.parametrize("distillation", ["attention", "gated"])
def test_initial_and_final_predictions(distillation):
    model = make(distillation=distillation)
    x = inputs("pad-net")
    final, initial = model.predict(x)
    assert list(final) == ["segmentation", "depth"]
    assert list(initial) == ["segmentation", "depth", "normal", "contour"]
    shapes = {"segmentation": 5, "depth": 1, "normal": 3, "contour": 2}
    for t, out in initial.items():
        assert tuple(out.shape) == (2, shapes[t], 32, 32)
    for t, out in final.items():
        assert tuple(out.shape) == (2, shapes[t], 32, 32)
    torch.testing.assert_close(initial["normal"].norm(dim=1), torch.ones(2, 32, 32))
    # forward returns the final predictions
    model.eval()
    out = model(x)
    again = model.predict(x).final
    for t in out:
        torch.testing.assert_close(out[t], again[t])
    assert model.all_tasks == ("segmentation", "depth", "normal", "contour")


def test_distillation_reads_other_tasks():
    model = make().eval()
    x = inputs("pad-net")
    base = model(x)["depth"]
    with torch.no_grad():  # perturb only the auxiliary normal branch
        for p in model.initial["normal"].parameters():
            p.add_(0.5)
    assert not torch.allclose(model(x)["depth"], base)


def test_distillation_formula():
    model = make()
    d = model.distill["depth"]
    feats = {
        t: torch.randn(2, d.msg["normal"].in_channels, 4, 4)
        for t in ["segmentation", "depth", "normal", "contour"]
    }
    got = d(feats["depth"], feats)
    want = feats["depth"] + sum(
        torch.sigmoid(d.msg[s](feats[s])) * feats[s] for s in ["segmentation", "normal", "contour"]
    )
    torch.testing.assert_close(got, want)
    assert sorted(d.sources) == ["contour", "normal", "segmentation"]


def test_deep_supervision_losses():
    model = make()
    x = inputs("pad-net")
    outputs = model.predict(x)
    specs = {**model.tasks, **model.auxiliary}
    targets = {t: target_for(s, outputs.initial[t], i) for i, (t, s) in enumerate(specs.items())}
    losses = model.deep_supervision_losses(outputs, targets)
    assert list(losses) == list(model.all_tasks)
    from gradbalance.losses import task_loss

    want = task_loss(specs["depth"], outputs.initial["depth"], targets["depth"]) + task_loss(
        specs["depth"], outputs.final["depth"], targets["depth"]
    )
    torch.testing.assert_close(losses["depth"], want)
    torch.testing.assert_close(
        losses["contour"],
        task_loss(specs["contour"], outputs.initial["contour"], targets["contour"]),
    )
    # auxiliary parameters: only initial branches, reached by their own loss
    own = list(model.task_parameters("contour"))
    assert {id(p) for p in own} == {
        id(p)
        for m in (model.initial["contour"], model.initial_out["contour"])
        for p in m.parameters()
    }
    with pytest.raises(ValueError, match="missing task"):
        model.deep_supervision_losses(outputs, {"depth": targets["depth"]})


def test_decode_output_size():
    model = make().eval()
    x = torch.randn(2, 3, 40, 56)
    z = model.encode(x)
    assert tuple(z.shape[-2:]) == (2, 3)
    assert tuple(model.decode(z)["depth"].shape[-2:]) == (32, 48)  # stride × feature size
    assert tuple(model.decode(z, output_size=(40, 56))["depth"].shape[-2:]) == (40, 56)
    assert tuple(model(x)["depth"].shape[-2:]) == (40, 56)


def test_padnet_validation():
    with pytest.raises(ValueError, match="both main and auxiliary"):
        models.PADNet({"depth": 1}, auxiliary={"depth": 1}, width=1 / 16)
    with pytest.raises(ValueError, match="distillation"):
        models.PADNet(width=1 / 16, distillation="nope")
    with pytest.raises(ValueError, match="encoder_stages"):
        models.PADNet(width=1 / 16, encoder_stages=6)
