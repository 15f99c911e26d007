"""describe(): one row per registered method with its paper, kind, inputs, dependencies, state."""

from __future__ import annotations

import pytest
import torch

import gradbalance.methods.famo
import gradbalance.methods.gls
import gradbalance.methods.graddrop
import gradbalance.methods.imtl_l
import gradbalance.methods.moco
import gradbalance.methods.rlw  # noqa: F401  (registers the methods this file names)
from gradbalance.methods import GRAMIAN, JACOBIAN, KPIS, LOSSES, Method
from gradbalance.methods.describe import MethodInfo, MethodTable, describe, short_citation
from gradbalance.methods.registry import available, get_class


def test_every_registered_method_has_a_row():
    table = describe()
    assert isinstance(table, MethodTable)
    assert [row.name for row in table] == available()
    for row in table:
        cls = get_class(row.name)
        assert row.class_name == cls.__name__
        assert row.paper == cls.paper and row.paper, f"{row.name} has no paper"
        assert row.kind == ("gradient" if cls.is_gradient_method() else "loss weighting")
        assert row.needs and set(row.needs) <= {
            "losses",
            "Gramian",
            "Jacobian",
            "features",
            "KPIs",
            "last-shared Gramian",
        }
        assert row.extra_dependencies == tuple(cls.extra_dependencies)
        if cls.stateful is not None:
            assert row.stateful == cls.stateful
        assert row.stochastic == cls.stochastic


def test_rows_of_known_methods():
    table = describe()
    assert table["moco"].needs == ("losses", "Gramian", "Jacobian")
    assert table["moco"].stateful and not table["moco"].stochastic
    assert table["graddrop"].stochastic and table["rlw"].stochastic
    assert table["dtp"].needs == ("losses", "KPIs")
    assert table["gradnorm"].needs == ("losses", "last-shared Gramian")
    assert table["mgda-ub"].needs == ("losses", "Gramian", "features")
    assert table["GLS"].stateful is False and table["gls"].kind == "loss weighting"
    assert table["uncertainty"].stateful  # inferred or declared: it has parameters
    assert table["equal"].stateful is False and table["equal"].citation == "baseline"
    assert describe("imtl_l")[0] == table["imtl-l"]
    with pytest.raises(ValueError, match="unknown method"):
        describe("nope")
    with pytest.raises(KeyError):
        describe("gls")["moco"]


class _Declared(Method):
    name = "test-declared"
    requires = frozenset({LOSSES, GRAMIAN, JACOBIAN, KPIS})
    paper = "A. Author, B. Other. A Title. Some Venue 2030."
    extra_dependencies = ("cvxpy", "scs")
    stateful = False


class _Buffers(Method):
    name = "test-buffers"
    paper = "Q. Solo. Alone. Venue 2031."

    def __init__(self) -> None:
        super().__init__()
        self.seed = int(torch.randint(0, 100, ()))  # touches the global generator

    def bind(self, tasks):
        super().bind(tasks)
        self.register_buffer("count", torch.zeros(()))


class _Stateless(Method):
    name = "test-stateless"


class _NeedsArgs(Method):
    name = "test-needs-args"

    def __init__(self, required: float) -> None:
        super().__init__()


class _Updates(_NeedsArgs):
    name = "test-updates"

    def update(self, inputs, weights) -> None:
        pass


def test_columns_from_class_attributes_and_inferred_state():
    row = describe(_Declared)[0]
    assert row.kind == "gradient"
    assert row.needs == ("losses", "Gramian", "Jacobian", "KPIs")
    assert row.extra_dependencies == ("cvxpy", "scs")
    assert row.stateful is False
    assert row.citation == "Author et al., Some Venue 2030"
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert describe(_Buffers)[0].stateful is True  # found its buffer ...
    assert torch.equal(torch.rand(3), expected)  # ... without consuming global randomness
    assert describe(_Buffers)[0].citation == "Solo, Venue 2031"
    assert describe(_Stateless())[0].stateful is False
    assert describe(_NeedsArgs)[0].stateful is False  # cannot be built: no evidence of state
    assert describe(_Updates)[0].stateful is True  # overrides update()


def test_text_markdown_and_dicts():
    table = describe()
    text = str(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "needs"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + len(table)
    assert repr(table) == text
    assert any(line.startswith("moco ") and "Jacobian" in line for line in lines)
    markdown = table.to_markdown().splitlines()
    assert markdown[0].startswith("| name | kind | needs |") and len(markdown) == 2 + len(table)
    assert "| `gls` | loss weighting | losses |" in table.to_markdown()
    dicts = table.to_dicts()
    assert dicts[0].keys() == {
        "name",
        "class_name",
        "paper",
        "kind",
        "needs",
        "extra_dependencies",
        "stateful",
        "stochastic",
    }
    assert isinstance(table[:2], MethodTable) and len(table[:2]) == 2
    assert isinstance(table[0], MethodInfo)


@pytest.mark.parametrize(
    ("paper", "short"),
    [
        (
            "A. Kendall, Y. Gal, R. Cipolla. Multi-Task Learning. CVPR 2018.",
            "Kendall et al., CVPR 2018",
        ),
        (
            "H. D. Fernando, H. Shen. Mitigating Gradient Bias. ICLR 2023.",
            "Fernando et al., ICLR 2023",
        ),
        ("Q. Solo. A Single Author. NeurIPS 2020.", "Solo, NeurIPS 2020"),
        ("Baseline (no paper): the unweighted sum.", "baseline"),
        ("", "—"),
        ("no structure at all", "no structure at all"),
    ],
)
def test_short_citation(paper, short):
    assert short_citation(paper) == short
