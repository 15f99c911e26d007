"""`gb.models` has the registry verbs of `gb.methods`: available / get / describe / register,
with the earlier names `list` and `create` kept as aliases. Every list comes from the registry."""

from __future__ import annotations

import pytest

import gradbalance as gb
from gradbalance import models
from tests.models.helpers import ZOO_MODELS, inputs

VERBS = ("available", "get", "describe", "register")


@pytest.mark.parametrize("verb", VERBS)
def test_models_and_methods_share_the_verbs(verb):
    for registry in (gb.models, gb.methods):
        assert callable(getattr(registry, verb)), (registry.__name__, verb)
        assert verb in registry.__all__


def test_aliases_are_the_same_functions():
    assert models.list is models.available
    assert models.create is models.get
    assert {"list", "create"} <= set(models.__all__)


def test_available_is_sorted_and_agrees_with_describe():
    names = models.available()
    assert names == sorted(names) == models.list()
    assert [info.name for info in models.describe()] == names
    assert set(ZOO_MODELS) <= set(names)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_get_builds_what_describe_says(name):
    info = models.describe(name)
    options = {option: 6 for option in info.required_options}  # MMoE's in_features
    if info.accepts_width:
        options["width"] = 1 / 32
    model = models.get(name, **options)
    assert info.model_class is not None and isinstance(model, info.model_class)
    assert model.has_shared_features is info.has_shared_features
    assert list(model.eval()(inputs(name))) == list(model.tasks)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_names_ignore_case_and_separators(name):
    spelled = name.upper().replace("-", "_")
    assert models.describe(spelled) == models.describe(name)
    assert models.describe(spelled).name == name


def test_get_passes_tasks_positionally_or_by_keyword():
    by_position = models.get("split", {"depth": 1}, width=1 / 32)
    by_keyword = models.get("split", tasks={"depth": 1}, width=1 / 32)
    assert list(by_position.tasks) == list(by_keyword.tasks) == ["depth"]
    assert isinstance(models.get("split", width=1 / 32), models.Split)  # the default tasks


def test_get_errors_name_the_registry():
    with pytest.raises(ValueError, match=r"unknown model 'splt'.*did you mean \['split'"):
        models.get("splt")
    with pytest.raises(ValueError, match=r"Registered models: .*'mtan'"):
        models.get("no-such-model")
    with pytest.raises(TypeError, match="must be a string"):
        models.get(3)  # type: ignore[arg-type]


def test_registered_model_reachable_through_every_verb():
    @models.register("verbs-test-net")
    class VerbsNet(models.Split):
        """A Split for this test. More text."""

        def __init__(self, tasks=None, **kw):
            super().__init__(tasks, width=1 / 32, **kw)

    assert "verbs-test-net" in models.available()
    assert isinstance(models.get("Verbs_Test_Net"), VerbsNet)
    assert isinstance(models.create("verbs-test-net"), VerbsNet)
    info = models.describe("verbs-test-net")
    assert info.model_class is VerbsNet and info.summary == "A Split for this test."
    assert "verbs-test-net" not in ZOO_MODELS  # the test's own model is not the zoo's
