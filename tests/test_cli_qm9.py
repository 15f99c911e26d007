"""``gradbalance train --data qm9``: QM9's eleven targets with ``qm9-mpnn``, on the committed
60-molecule fixture (``--root tests/data/fixtures/qm9``), so that no test needs qm9pack's full
data. The fixture is split 40 / 10 / 10 (train / val / test)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import gradbalance as gb
from gradbalance.cli import main, recipes
from gradbalance.cli.demo_data import QM9Demo
from gradbalance.cli.errors import CommandError
from gradbalance.data.qm9 import MEV_TARGETS, TARGETS

FIXTURE = Path(__file__).resolve().parent / "data" / "fixtures" / "qm9"
QUICK = ["train", "--data", "qm9", "--root", str(FIXTURE), "--quick", "--no-progress"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def train(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run with the default model (qm9-mpnn) and uncertainty weighting."""
    out = tmp_path_factory.mktemp("qm9") / "run"
    status = main([*QUICK, "--method", "uncertainty", "--out", str(out)])
    return status, out


def test_quick_run_writes_the_mae_of_every_target(quick_run):
    status, out = quick_run
    assert status == 0
    epochs = read_csv(out / "epochs.csv")
    assert len(epochs) == 1  # --quick: one epoch
    assert list(epochs[0]) == ["epoch", *(f"{t}/mae" for t in TARGETS)]  # MAE only
    assert all(0 < float(epochs[0][f"{t}/mae"]) < math.inf for t in TARGETS)
    steps = read_csv(out / "steps.csv")
    assert len(steps) == 2  # 40 training molecules, batch 32
    assert {f"weight/{t}" for t in TARGETS} <= set(steps[0])
    assert {"config.json", "checkpoint.pt"} <= {p.name for p in out.iterdir()}


def test_the_mae_is_in_the_papers_units(quick_run):
    """The logged MAE is the checkpoint's error on the test molecules in D, a0³, ... and meV."""
    _, out = quick_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model = gb.models.create("qm9-mpnn", width=state["config"]["width"])
    model.load_state_dict(state["model"])
    model.eval()
    test = gb.data.QM9("test", source=FIXTURE, split_sizes=(40, 10, 10), normalize="center")
    x, y = test.tensors()
    with torch.no_grad():
        pred = model(x)
    logged = read_csv(out / "epochs.csv")[-1]
    for t in ("mu", "r2", "homo", "u0", "cv"):
        mae = float((pred[t].squeeze(-1) - y[t]).abs().double().mean())  # in UNITS (eV, D, ...)
        expected = mae * (1000 if t in MEV_TARGETS else 1)
        assert float(logged[f"{t}/mae"]) == pytest.approx(expected, rel=1e-4)


def test_config_records_the_qm9_run_and_runs_again(quick_run, tmp_path, capsys):
    _, out = quick_run
    config = json.loads((out / "config.json").read_text())
    assert (config["data"], config["model"], config["method"]) == ("qm9", "qm9-mpnn", "uncertainty")
    assert config["size"] == 40  # the default (256 with --quick) capped by the fixture's split
    assert (config["epochs"], config["batch_size"], config["lr"], config["width"]) == (
        1,
        32,
        recipes.QM9_PROTOCOL["lr"],
        recipes.QM9_PROTOCOL["width"],
    )
    assert Path(config["root"]) == FIXTURE
    again = tmp_path / "again"
    argv = ["train", "--config", str(out / "config.json"), "--no-progress", "--out", str(again)]
    status, _, _ = train(argv, capsys)
    assert status == 0
    assert json.loads((again / "config.json").read_text()) == config
    first, second = read_csv(out / "epochs.csv")[-1], read_csv(again / "epochs.csv")[-1]
    for key in first:
        assert float(second[key]) == pytest.approx(float(first[key]), rel=1e-5)


def test_quick_run_prints_the_units_and_the_split(tmp_path, capsys):
    status, out, _ = train([*QUICK, "--method", "imtl-g", "--out", str(tmp_path)], capsys)
    assert status == 0
    assert "qm9: 40 train / 10 test samples; model qm9-mpnn (width 0.5), method imtl-g" in out
    assert "split 40 / 10 / 10 (train / val / test)" in out
    assert "mean absolute error in the papers' units (mu D, alpha a0^3, homo meV" in out
    assert "u0/mae" in out and "final task weights" in out and "nan" not in out.lower()


def test_tasks_subset(tmp_path, capsys):
    argv = [*QUICK, "--method", "mgda-ub", "--tasks", "u0", "mu", "cv", "--out", str(tmp_path)]
    status, out, _ = train(argv, capsys)
    assert status == 0
    assert "(u0 meV, mu D, cv cal/(mol K))" in out
    assert list(read_csv(tmp_path / "epochs.csv")[0]) == ["epoch", "u0/mae", "mu/mae", "cv/mae"]
    steps = read_csv(tmp_path / "steps.csv")
    weight_columns = {k for k in steps[0] if k.startswith("weight/")}
    assert weight_columns == {"weight/u0", "weight/mu", "weight/cv"}
    weights = [sum(float(s[f"weight/{t}"]) for t in ("u0", "mu", "cv")) for s in steps]
    assert all(w == pytest.approx(1.0) for w in weights)  # MGDA-UB: weights on the simplex
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tasks"] == ["u0", "mu", "cv"]


def test_size_and_batch_size(tmp_path, capsys):
    argv = [*QUICK, "--size", "20", "--batch-size", "8", "--epochs", "2", "--out", str(tmp_path)]
    status, out, _ = train(argv, capsys)
    assert status == 0 and "qm9: 20 train / 10 test samples" in out
    assert len(read_csv(tmp_path / "steps.csv")) == 6  # 3 batches x 2 epochs
    assert len(read_csv(tmp_path / "epochs.csv")) == 2
    assert json.loads((tmp_path / "config.json").read_text())["size"] == 20


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # DTP weights by KPIs in [0, 1], which regression targets do not define
        (["--method", "dtp"], "KPIs in [0, 1] (accuracy-like), which --data qm9 does not define"),
        (["--method", "dtp"], "e.g. uncertainty, gls, imtl-g, nash-mtl or famo"),
        (["--size", "41"], "the QM9 training split holds 40 molecules; pass --size 40 or less"),
        (["--tasks", "gap"], "--data qm9 has no task(s) ['gap']; its tasks are ['mu', 'alpha'"),
        (["--model", "split"], "on --data qm9 use --model qm9-mpnn (the default)"),
        (["--model", "pad-net"], "on --data qm9 use --model qm9-mpnn"),
        (["--method", "fixed"], "--method-arg KEY=VALUE"),
    ],
)
def test_what_cannot_run_is_a_usage_error(tmp_path, capsys, extra, message):
    status, _, err = train([*QUICK, *extra, "--out", str(tmp_path)], capsys)
    assert status == 2
    assert "gradbalance train: error:" in err and message in err


def test_fixed_weights_run_with_method_args(tmp_path, capsys):
    weights = "weights=[" + ",".join(["1"] * 10) + ",2]"
    argv = [*QUICK, "--method", "fixed", "--method-arg", weights, "--out", str(tmp_path)]
    status, out, _ = train(argv, capsys)
    assert status == 0 and "cv=2" in out


def test_size_is_for_qm9_only(capsys):
    status, _, err = train(["train", "--data", "synthetic", "--size", "8", "--quick"], capsys)
    assert status == 2 and "--size is used with --data qm9 only" in err


def test_qm9_mpnn_on_other_data_names_qm9(tmp_path, capsys):
    argv = ["train", "--data", "synthetic", "--model", "qm9-mpnn", "--quick"]
    status, _, err = train([*argv, "--out", str(tmp_path)], capsys)
    assert status == 2 and "qm9-mpnn reads padded molecules: it runs on --data qm9" in err


@pytest.mark.parametrize("method", gb.methods.available())
def test_every_method_reaches_the_balancer_or_is_refused(tmp_path, capsys, monkeypatch, method):
    """Per registered method on QM9's regression targets: only the methods that need KPIs are
    refused (exit 2) before training; every other one gets to build its balancer (stubbed out
    here; tests/test_cli_matrix.py trains a representative set end to end)."""

    def balancer_reached(*args, **kwargs):
        raise CommandError("the balancer was reached")

    monkeypatch.setattr(recipes, "build_balancer", balancer_reached)
    status, _, err = train([*QUICK, "--method", method, "--out", str(tmp_path)], capsys)
    if "kpis" in gb.methods.get_class(method).requires:
        assert status == 2 and "KPIs" in err
    else:
        assert status == 1 and "the balancer was reached" in err


def test_a_missing_source_folder_is_reported(tmp_path, capsys):
    argv = ["train", "--data", "qm9", "--root", str(tmp_path / "nowhere"), "--quick"]
    status, _, err = train(argv, capsys)
    assert status == 1
    assert "nowhere" in err and "does not exist" in err and "pass --root " in err


def test_missing_qm9pack_is_reported(tmp_path, capsys, monkeypatch):
    """Without --root, QM9 reads the installed qm9pack; without it (and no cache) the command
    says what to install and that --root is the alternative."""
    from gradbalance.data import qm9_source

    monkeypatch.setenv("GRADBALANCE_DATA", str(tmp_path / "empty-cache"))
    find_spec = qm9_source.importlib.util.find_spec
    monkeypatch.setattr(
        qm9_source.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "qm9pack" else find_spec(name, *args),
    )
    status, _, err = train(["train", "--data", "qm9", "--quick", "--out", str(tmp_path)], capsys)
    assert status == 1
    assert "pip install qm9pack" in err and "pass --root " in err


def test_the_defaults_are_the_demos():
    """``gradbalance train --data qm9`` trains with the protocol of ``gradbalance demo``."""
    demo = QM9Demo()
    assert recipes.QM9_PROTOCOL == {
        "lr": demo.lr,
        "epochs": demo.epochs,
        "batch_size": demo.batch_size,
        "width": demo.width,
    }
    assert recipes.QM9_SIZES == demo.sizes
    assert recipes.QM9_METHOD_KWARGS == demo.method_kwargs
    assert recipes.DEFAULT_MODELS["qm9"] == "qm9-mpnn"
