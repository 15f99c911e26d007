"""The direction of the package's internal imports, as docs/architecture.md states it."""

from __future__ import annotations

import ast
from pathlib import Path

import gradbalance

ROOT = Path(gradbalance.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``gradbalance`` modules ``path`` imports, anywhere in the file (also in functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gradbalance"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "gradbalance":
                # `from gradbalance import engine` names a module, not a symbol
                subs = {f"{node.module}.{a.name}" for a in node.names}
                found |= {s for s in subs if _exists(s)} or {node.module}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _top(module: str) -> str:
    """``gradbalance.methods.base`` -> ``methods``; ``gradbalance.engine`` -> ``engine``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _outside(unit: str) -> dict[str, set[str]]:
    """For each module of ``unit``, the top-level units it imports other than itself."""
    return {m: {_top(i) for i in deps} - {unit} for m, deps in GRAPH.items() if _top(m) == unit}


def test_the_graph_was_read():
    assert "gradbalance.balancer" in GRAPH
    assert "engine" in {_top(i) for i in GRAPH["gradbalance.balancer"]}
    # relative imports would escape `_imports`: the package uses none
    relative = [
        p.name
        for p in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []


def test_engine_and_distributed_import_nothing_from_the_package():
    assert _outside("engine") == {"gradbalance.engine": set()}
    assert _outside("distributed") == {"gradbalance.distributed": set()}


def test_solvers_and_inputs_import_only_errors():
    for unit in ("solvers", "_inputs"):
        assert all(deps <= {"errors"} for deps in _outside(unit).values()), _outside(unit)


def test_methods_reach_the_engine_only_through_method_combine():
    outside = _outside("methods")
    assert all(deps <= {"solvers", "errors", "engine"} for deps in outside.values()), outside
    assert {m for m, deps in outside.items() if "engine" in deps} == {"gradbalance.methods.base"}


def test_the_core_does_not_import_what_sits_beside_or_above_it():
    core = {"balancer", "_inputs", "engine", "distributed", "methods", "solvers", "errors"}
    beside = {"models", "data", "losses", "metrics", "training", "runlog", "cli"}
    for unit in core:
        for module, deps in _outside(unit).items():
            assert not deps & beside, (module, deps & beside)
