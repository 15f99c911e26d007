"""Checkpoints of every format the balancer ever wrote load, and resume where they stopped.

The files under ``tests/checkpoints`` were written by earlier versions (see
`tests.checkpoints.recipe`). Each one is loaded into freshly built objects: the loaded state must
equal the saved tensors exactly, and the steps run from there must give what they gave when the
file was written (to a float32 rounding tolerance: the file may come from another CPU).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.checkpoints import recipe

FILES = sorted((Path(__file__).parent / "checkpoints").glob("format*.ckpt"))


def _parts(sd: dict) -> tuple[dict, dict, dict]:
    """(inner optimizer state, method state, balancer counters) of a checkpoint of any format."""
    if "gradbalance" in sd:
        inner = {k: v for k, v in sd.items() if k != "gradbalance"}
        return inner, sd["gradbalance"]["method"], sd["gradbalance"]["balancer"]
    return sd["optimizer"], sd["method"], sd["balancer"]


def _assert_same(a: object, b: object) -> None:
    """Equal, tensors bit for bit, containers entry by entry."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_the_fixtures_exist():
    assert [f.name for f in FILES][:2] == ["format1.ckpt", "format2.ckpt"]


@pytest.mark.parametrize("method", recipe.METHODS)
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_an_old_checkpoint_loads_and_resumes(path, method):
    saved = torch.load(path, weights_only=True)["methods"][method]
    model = recipe.TinyNet(seed=1)  # other values than the saved ones
    model.load_state_dict(saved["model"])
    opt = recipe.balancer(model, method)
    opt.load_state_dict(copy.deepcopy(saved["opt"]))

    inner, method_state, counters = _parts(saved["opt"])
    now_inner, now_method, now_counters = _parts(opt.state_dict())
    _assert_same(now_inner, inner)
    _assert_same({k: v for k, v in now_method.items()}, dict(method_state))
    assert now_counters["steps"] == counters["steps"] == recipe.SAVED_AT
    assert now_counters["tasks"] == list(recipe.TASKS)

    recipe.run(model, opt, recipe.SAVED_AT, recipe.MORE)
    for p, expected in zip(model.parameters(), saved["parameters"], strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    after = recipe.method_tensors(opt)
    assert after.keys() == saved["method_state"].keys()
    for k, v in saved["method_state"].items():
        torch.testing.assert_close(after[k], v, rtol=1e-6, atol=1e-7)


def test_the_state_dict_has_torchs_shape():
    model = recipe.TinyNet()
    opt = recipe.balancer(model, "uncertainty")
    recipe.run(model, opt, 0, 2)
    sd = opt.state_dict()
    inner = opt.optimizer.state_dict()
    assert set(sd) == {"state", "param_groups", "gradbalance"}
    _assert_same(sd["state"], inner["state"])
    _assert_same(sd["param_groups"], inner["param_groups"])
    assert sd["gradbalance"]["format"] == 2
    assert set(sd["gradbalance"]) == {"format", "method", "balancer"}
    assert "log_vars" in sd["gradbalance"]["method"]


def test_a_plain_optimizer_reads_the_state_dict():
    # generic optimizer-state tools see the inner optimizer's state: a plain Adam loads it
    model = recipe.TinyNet()
    opt = recipe.balancer(model, "dwa")
    recipe.run(model, opt, 0, 2)
    plain = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=0.05)
    plain.load_state_dict(opt.state_dict())
    _assert_same(plain.state_dict(), opt.optimizer.state_dict())


def _format1(sd: dict) -> dict:
    """A format-2 state dict written the way format 1 laid it out."""
    meta = dict(sd["gradbalance"]["balancer"], format=1)
    inner = {k: v for k, v in sd.items() if k != "gradbalance"}
    return {"optimizer": inner, "method": sd["gradbalance"]["method"], "balancer": meta}


def test_both_formats_give_the_same_state():
    model = recipe.TinyNet()
    opt = recipe.balancer(model, "gradnorm")
    recipe.run(model, opt, 0, 3)
    sd = copy.deepcopy(opt.state_dict())
    for checkpoint in (sd, _format1(sd)):
        other = recipe.balancer(recipe.TinyNet(seed=2), "gradnorm")
        other.load_state_dict(copy.deepcopy(checkpoint))
        _assert_same(other.state_dict(), sd)


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"state": {}, "param_groups": []},
        {"optimizer": {"state": {}, "param_groups": []}, "method": {}},
        {"state": {}, "param_groups": [], "gradbalance": {"format": 2, "method": {}}},
        {"state": {}, "param_groups": [], "gradbalance": dict(format=3, method={}, balancer={})},
        {"state": {}, "param_groups": [], "gradbalance": "no"},
    ],
)
def test_what_is_not_a_balancer_state_dict_is_refused(bad):
    model = recipe.TinyNet()
    opt = recipe.balancer(model, "dwa")
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)


def test_a_bad_old_format_checkpoint_changes_nothing():
    model = recipe.TinyNet()
    opt = recipe.balancer(model, "uncertainty")
    recipe.run(model, opt, 0, 2)
    before = copy.deepcopy(opt.state_dict())
    bad = _format1(copy.deepcopy(before))
    bad["method"]["log_vars"] = torch.zeros(4)
    bad["balancer"]["steps"] = 7
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    _assert_same(opt.state_dict(), before)
