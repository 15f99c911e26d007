"""`gb.models.describe`: the public description of the registered models."""

from __future__ import annotations

import pytest

import gradbalance as gb
from gradbalance.models import ModelInfo


def test_describe_all_matches_list():
    infos = gb.models.describe()
    assert [i.name for i in infos] == gb.models.list()
    assert all(isinstance(i, ModelInfo) and i.summary for i in infos)


@pytest.mark.parametrize(
    ("name", "cls", "features"),
    [
        ("split", gb.models.Split, True),  # a factory function, not a class
        ("split-deep", gb.models.Split, True),
        ("mtan-resnet", gb.models.MTAN, False),  # known from the return annotation
        ("pad-net", gb.models.PADNet, True),
        ("multilenet", gb.models.MultiLeNet, True),
        ("mtan", gb.models.SegNetMTAN, False),
        ("cross-stitch", gb.models.CrossStitch, False),
    ],
)
def test_describe_class_and_features(name, cls, features):
    info = gb.models.describe(name)
    assert info.model_class is cls
    assert info.has_shared_features is features
    assert info.has_shared_features == gb.models.create(name, width=1 / 32).has_shared_features


def test_describe_options():
    mmoe = gb.models.describe("MMoE")  # names ignore case, - and _
    assert mmoe.required_options == ("in_features",) and not mmoe.accepts_width
    split = gb.models.describe("split_wide")
    assert split.name == "split-wide" and split.accepts_width and split.required_options == ()


def test_describe_unknown_name():
    with pytest.raises(ValueError, match="did you mean"):
        gb.models.describe("mtann")
    with pytest.raises(TypeError, match="must be a string"):
        gb.models.describe(3)  # type: ignore[call-overload]


def test_describe_a_user_model_without_annotation():
    @gb.models.register("describe-test-net")
    def build(tasks=None, **kw):
        """My own net. More text."""
        return gb.models.Split(tasks, width=1 / 32, **kw)

    info = gb.models.describe("describe-test-net")
    assert info.summary == "My own net."
    assert info.model_class is None and not info.has_shared_features
