"""The direction of the package's internal imports, as docs/architecture.md states it."""

from __future__ import annotations

import ast
import re
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
    assert "gradbalance.balancer.step" in GRAPH
    assert "engine" in {_top(i) for i in GRAPH["gradbalance.balancer.step"]}
    # relative imports would escape `_imports`: the package uses none
    relative = [
        p.name
        for p in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []


def test_engine_and_distributed_import_nothing_from_the_package():
    # nothing but the layer underneath (`_linalg`, the torch shims) and the errors
    engine = _outside("engine")
    assert set(engine) >= {f"gradbalance.engine.{m}" for m in ENGINE_MODULES}
    assert all(deps <= {"_linalg", "_torch_compat", "errors"} for deps in engine.values()), engine
    assert _outside("distributed") == {"gradbalance.distributed": set()}


#: One module per engine, the protocol and result, and the policy that picks among them.
ENGINE_MODULES = (
    "base",
    "result",
    "loop",
    "batched",
    "chained",
    "representation",
    "memory",
    "auto",
)


def test_the_step_flows_one_way():
    """optimizer face -> step pipeline -> engine -> methods -> solvers, `_linalg` underneath."""
    balancer = {m: deps for m, deps in GRAPH.items() if _top(m) == "balancer"}
    # inside the balancer: the face imports the pipeline, never the reverse
    below_the_face = {m for m in balancer if m != "gradbalance.balancer.optimizer"}
    for module in below_the_face - {"gradbalance.balancer"}:
        assert "gradbalance.balancer.optimizer" not in GRAPH[module], module
    assert "gradbalance.balancer.step" in GRAPH["gradbalance.balancer.optimizer"]
    # nothing below the balancer imports it
    for module, deps in GRAPH.items():
        if _top(module) in {"engine", "methods", "solvers", "_linalg", "_torch_compat", "errors"}:
            assert not {d for d in deps if _top(d) == "balancer"}, module


#: The most lines a module of the package may have (the renovation's bound, with some slack).
MAX_LINES = 430


def test_modules_stay_small():
    long = {
        str(p.relative_to(ROOT)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_linalg_and_the_torch_shims_sit_underneath_everything():
    assert _outside("_linalg") == {"gradbalance._linalg": {"_torch_compat"}}
    assert _outside("_torch_compat") == {"gradbalance._torch_compat": set()}
    checkpoint = GRAPH["gradbalance.balancer.checkpoint"]
    assert {_top(d) for d in checkpoint} <= {"balancer", "engine", "methods"}, checkpoint


#: Private torch entry points (``torch._*``, private functions and node attributes): only
#: `gradbalance._torch_compat` may use them, each with its fallback.
PRIVATE_TORCH = re.compile(r"torch\._|_engine_run_backward|_amp_foreach|_saved_[a-z]")


def test_private_torch_entry_points_live_in_one_module():
    users = sorted(
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if p.name != "_torch_compat.py" and PRIVATE_TORCH.search(p.read_text(encoding="utf-8"))
    )
    assert users == []
    assert PRIVATE_TORCH.search((ROOT / "_torch_compat.py").read_text(encoding="utf-8"))


def test_solvers_and_inputs_import_only_errors():
    assert all(deps <= {"errors"} for deps in _outside("solvers").values()), _outside("solvers")
    # what backward() accepts: checked against the errors and the method's declared needs
    inputs = {_top(d) for d in GRAPH["gradbalance.balancer.inputs"]}
    assert inputs <= {"errors", "methods"}, inputs


def test_methods_do_not_import_the_engine():
    # the default `Method.combine` (Jᵀw) comes from `_linalg`, underneath both
    outside = _outside("methods")
    assert all(deps <= {"solvers", "errors", "_linalg"} for deps in outside.values()), outside


def test_the_core_does_not_import_what_sits_beside_or_above_it():
    core = {
        "balancer",
        "_graph",
        "_linalg",
        "_torch_compat",
        "engine",
        "distributed",
        "methods",
        "solvers",
        "errors",
    }
    beside = {
        "models",
        "data",
        "losses",
        "metrics",
        "tasks",
        "training",
        "runlog",
        "callbacks",
        "cli",
        "integrations",
    }
    for unit in core:
        for module, deps in _outside(unit).items():
            assert not deps & beside, (module, deps & beside)
