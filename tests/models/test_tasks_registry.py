"""TaskSpec, the tasks= spellings, the presets and the registry."""

from __future__ import annotations

import re

import pytest

from gradbalance import models
from gradbalance.models import parse_tasks
from gradbalance.tasks import TaskSpec
from tests.models.helpers import ZOO_MODELS


def test_presets():
    assert list(models.NYUV2_TASKS) == ["segmentation", "depth", "normal"]
    assert models.NYUV2_TASKS["segmentation"] == TaskSpec("segmentation", 13)
    assert models.NYUV2_TASKS["normal"] == TaskSpec("normal", 3)
    assert dict(models.CITYSCAPES_TASKS) == {
        "segmentation": TaskSpec("segmentation", 7),
        "depth": TaskSpec("depth", 1),
    }
    with pytest.raises(TypeError):
        models.NYUV2_TASKS["x"] = TaskSpec("depth", 1)  # read-only


def test_kinds_inferred_from_standard_names():
    tasks = parse_tasks({"semantic": 13, "Depth": 1, "surface-normals": 3, "cls": 4, "reg": 2})
    assert [s.kind for s in tasks.values()] == [
        "segmentation",
        "depth",
        "normal",
        "classification",
        "regression",
    ]


def test_all_spellings():
    tasks = parse_tasks(
        {
            "a": TaskSpec("classification", 3),
            "b": ("regression", 2),
            "c": {"kind": "segmentation", "channels": 5},
            "d": "depth",
            "e": "normal",
        }
    )
    assert tasks == {
        "a": TaskSpec("classification", 3),
        "b": TaskSpec("regression", 2),
        "c": TaskSpec("segmentation", 5),
        "d": TaskSpec("depth", 1),
        "e": TaskSpec("normal", 3),
    }
    assert list(parse_tasks(["normal", "depth"])) == ["normal", "depth"]  # order kept
    assert parse_tasks(["left"], default_kind="classification", default_channels=10) == {
        "left": TaskSpec("classification", 10)
    }
    assert parse_tasks(None, default=models.NYUV2_TASKS) == dict(models.NYUV2_TASKS)


@pytest.mark.parametrize(
    ("tasks", "error", "match"),
    [
        ({"foo": 3}, ValueError, "cannot infer the kind of task 'foo'"),
        (["foo"], ValueError, "cannot infer the kind"),
        ({"seg": "segmentation"}, ValueError, "needs a number of classes"),
        ({"e": "edges"}, ValueError, "kind must be one of"),
        ({"a": ("depth",)}, ValueError, "tuple spec"),
        ({"a": {"kind": "depth"}}, ValueError, "'kind' and 'channels'"),
        ({"a": 1.5}, TypeError, "expected a TaskSpec"),
        ({}, ValueError, "at least one task"),
        ("segmentation", TypeError, "not a single string"),
        (["depth", "depth"], ValueError, "listed twice"),
        ({"a.b": ("depth", 1)}, ValueError, "contains '.'"),
        ({"keys": ("depth", 1)}, ValueError, "clashes"),
        ({"": ("depth", 1)}, TypeError, "non-empty"),
        (None, ValueError, "must be given"),
        (3, TypeError, "mapping or a sequence"),
    ],
)
def test_bad_tasks(tasks, error, match):
    with pytest.raises(error, match=match):
        parse_tasks(tasks)


@pytest.mark.parametrize(
    ("kind", "channels", "error"),
    [
        ("segmantation", 3, ValueError),
        ("segmentation", 1, ValueError),
        ("classification", 1, ValueError),
        ("depth", 0, ValueError),
        ("depth", 1.0, TypeError),
        ("depth", True, TypeError),
    ],
)
def test_bad_task_spec(kind, channels, error):
    with pytest.raises(error):
        TaskSpec(kind, channels)


def test_registry_names():
    # the zoo the package documents (the table of `gradbalance.models`' docstring) is registered
    documented = set(re.findall(r"^``([a-z0-9-]+)``", models.__doc__ or "", flags=re.MULTILINE))
    names = models.list()
    assert len(documented) >= 13
    assert documented == set(ZOO_MODELS)
    assert documented <= set(names)
    assert names == sorted(names)


def test_registry_lookup_ignores_case_and_separators():
    assert isinstance(models.create("PAD_Net", width=1 / 16), models.PADNet)
    assert isinstance(models.create("crossstitch", width=1 / 16), models.CrossStitch)
    assert models.create("split-deep", width=1 / 16).variant == "deep"
    assert models.create("Split_Wide", width=1 / 16).variant == "wide"


def test_registry_passes_tasks_and_options():
    m = models.create("mtan", tasks={"depth": 1}, width=1 / 32)
    assert list(m.tasks) == ["depth"]
    assert m.backbone.channels[0] == 2


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown model 'mtam'.*did you mean \['mtan'"):
        models.create("mtam")
    with pytest.raises(TypeError):
        models.create(3)
    with pytest.raises(ValueError, match="already registered"):
        models.register("MTAN", models.SegNetMTAN)


def test_register_decorator():
    @models.register("test-registry-tiny")
    class Tiny(models.Split):
        def __init__(self, tasks=None, **kw):
            super().__init__(tasks, width=1 / 32, **kw)

    assert "test-registry-tiny" in models.list()
    assert isinstance(models.create("test_registry_tiny"), Tiny)
