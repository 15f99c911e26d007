"""`describe`: a table of the registered methods (paper, inputs, dependencies, state)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, overload

import torch

from gradbalance.methods.base import (
    FEATURES,
    GRAMIAN,
    JACOBIAN,
    KPIS,
    LAST_SHARED_GRAMIAN,
    LOSSES,
    Method,
)
from gradbalance.methods.registry import available, get_class, normalise

__all__ = ["MethodInfo", "MethodTable", "describe"]

# Requirement -> label, in the order the table lists them.
_NEEDS = (
    (LOSSES, "losses"),
    (GRAMIAN, "Gramian"),
    (JACOBIAN, "Jacobian"),
    (FEATURES, "features"),
    (KPIS, "KPIs"),
    (LAST_SHARED_GRAMIAN, "last-shared Gramian"),
)
_COLUMNS = ("name", "kind", "needs", "extra dependencies", "stateful", "random", "paper")
# The end of the author list: a period right after a lower-case letter ("... R. Cipolla. Title").
_AUTHORS_END = re.compile(r"(?<=[a-z)])\.\s")


@dataclass(frozen=True)
class MethodInfo:
    """One row of `describe`: what a registered method is and what it needs.

    Attributes:
        name: the registry name (``method="..."``).
        class_name: the class, importable from ``gradbalance.methods``.
        paper: the full citation.
        kind: ``"gradient"`` (combines task gradients on the shared parameters) or
            ``"loss weighting"`` (weights the losses of the whole model).
        needs: what the method reads: ``"losses"``, ``"Gramian"``, ``"Jacobian"``,
            ``"features"``, ``"KPIs"``, ``"last-shared Gramian"``.
        extra_dependencies: optional packages the method needs (``pip install`` them).
        stateful: whether it keeps state beyond the task names (carried by ``state_dict``).
        stochastic: whether it draws random numbers (seeded and reproducible).
    """

    name: str
    class_name: str
    paper: str
    kind: str
    needs: tuple[str, ...]
    extra_dependencies: tuple[str, ...]
    stateful: bool
    stochastic: bool

    @property
    def citation(self) -> str:
        """A short form of the citation: ``"Kendall et al., CVPR 2018"``."""
        return short_citation(self.paper)

    def as_dict(self) -> dict[str, Any]:
        """The row as a plain dict (lists for the tuples)."""
        row = asdict(self)
        row["needs"] = list(self.needs)
        row["extra_dependencies"] = list(self.extra_dependencies)
        return row

    def _cells(self) -> tuple[str, ...]:
        return (
            self.name,
            self.kind,
            " + ".join(self.needs) or "—",
            ", ".join(self.extra_dependencies) or "—",
            "yes" if self.stateful else "no",
            "yes" if self.stochastic else "no",
            self.citation,
        )


class MethodTable(Sequence[MethodInfo]):
    """The rows of `describe`; ``str()`` renders them as a text table.

    Index it by position or by method name (``table["mgda"]``); `to_dicts` and
    `to_markdown` export it.
    """

    def __init__(self, rows: Iterable[MethodInfo]) -> None:
        self._rows = tuple(rows)

    @overload
    def __getitem__(self, index: int | str) -> MethodInfo: ...

    @overload
    def __getitem__(self, index: slice) -> MethodTable: ...

    def __getitem__(self, index: int | str | slice) -> MethodInfo | MethodTable:
        if isinstance(index, slice):
            return MethodTable(self._rows[index])
        if isinstance(index, str):
            key = normalise(index)
            for row in self._rows:
                if normalise(row.name) == key:
                    return row
            raise KeyError(f"method {index!r} is not in this table")
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[MethodInfo]:
        return iter(self._rows)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MethodTable):
            return self._rows == other._rows
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._rows)

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as a list of plain dicts."""
        return [row.as_dict() for row in self._rows]

    def to_markdown(self) -> str:
        """The table as Markdown."""
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        for row in self._rows:
            cells = list(row._cells())
            cells[0] = f"`{cells[0]}`"
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        cells = [_COLUMNS, *(row._cells() for row in self._rows)]
        widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]

        def render(line: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([render(cells[0]), rule, *(render(line) for line in cells[1:])])

    def __repr__(self) -> str:
        return str(self)


def short_citation(paper: str) -> str:
    """``"A. Kendall, Y. Gal, R. Cipolla. Title. CVPR 2018."`` -> ``"Kendall et al., CVPR 2018"``.

    Examples:
        >>> short_citation("O. Sener, V. Koltun. Multi-Task Learning as MOO. NeurIPS 2018.")
        'Sener et al., NeurIPS 2018'
    """
    text = " ".join(paper.split())
    if not text:
        return "—"
    if text.lower().startswith("baseline"):
        return "baseline"
    end = _AUTHORS_END.search(text)
    venue = text.rstrip(". ").rsplit(". ", 1)[-1]
    if end is None or venue == text.rstrip(". "):
        return text if len(text) <= 48 else text[:47] + "…"
    authors = text[: end.start()]
    first = authors.split(",")[0].split(" and ")[0].strip()
    surname = first.split()[-1] if first.split() else first
    several = "," in authors or " and " in authors
    if len(venue) > 32:
        venue = venue[:31] + "…"
    return f"{surname}{' et al.' if several else ''}, {venue}"


def _infer_stateful(cls: type[Method]) -> bool:
    """Whether a method without a ``stateful`` declaration keeps state of its own."""
    for hook in ("update", "get_extra_state", "set_extra_state", "_load_from_state_dict"):
        if getattr(cls, hook) is not getattr(Method, hook):
            return True
    # Parameters and buffers are created at bind(): build one with defaults, without touching
    # the global random state, and look.
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method = cls()
            method.bind(("task0", "task1"))
    except Exception:
        return False
    return any(True for _ in method.parameters()) or any(True for _ in method.buffers())


def _info(cls: type[Method]) -> MethodInfo:
    stateful = cls.stateful if cls.stateful is not None else _infer_stateful(cls)
    return MethodInfo(
        name=cls.name,
        class_name=cls.__name__,
        paper=cls.paper,
        kind="gradient" if cls.is_gradient_method() else "loss weighting",
        needs=tuple(label for req, label in _NEEDS if req in cls.requires),
        extra_dependencies=tuple(cls.extra_dependencies),
        stateful=bool(stateful),
        stochastic=bool(cls.stochastic),
    )


def describe(name: str | type[Method] | Method | None = None) -> MethodTable:
    """A table of every registered method, or of one: paper, kind, inputs, dependencies, state.

    Args:
        name: a registered name (or a method class or instance) to describe only that method;
            ``None`` (default) describes every registered method, sorted by name.

    Returns:
        A `MethodTable` of `MethodInfo` rows. ``print()`` it for a text table; index it by
        name; `MethodTable.to_dicts` / `MethodTable.to_markdown` export it.

    Raises:
        ValueError: if ``name`` is not a registered method.

    Examples:
        >>> table = describe()  # print(table) shows every method
        >>> table["mgda"].needs, table["mgda"].kind
        (('losses', 'Gramian'), 'gradient')
        >>> row = describe("gls")[0]
        >>> row.kind, row.stateful, row.citation
        ('loss weighting', False, 'Chennupati et al., CVPR Workshops 2019')
        >>> str(describe("gls")).splitlines()[0].split()
        ['name', 'kind', 'needs', 'extra', 'dependencies', 'stateful', 'random', 'paper']
    """
    if name is None:
        classes = [get_class(n) for n in available()]
    elif isinstance(name, Method):
        classes = [type(name)]
    elif isinstance(name, type) and issubclass(name, Method):
        classes = [name]
    else:
        classes = [get_class(name)]
    return MethodTable(_info(cls) for cls in classes)
