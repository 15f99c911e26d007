"""The ``gradbalance`` command: demo, train, list, bench and its error handling."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest

import gradbalance as gb
from gradbalance import cli
from gradbalance.cli import bench, main

pytest.importorskip("mlxtend")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- demo
#: The QM9 demo reads qm9pack's copy of QM9 (the test extra installs it).
needs_qm9 = pytest.mark.skipif(
    importlib.util.find_spec("qm9pack") is None, reason="needs qm9pack (pip install qm9pack)"
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `gradbalance demo --quick` run (QM9, two seeds in two processes) shared by the demo
    tests (stdout captured)."""
    if importlib.util.find_spec("qm9pack") is None:
        pytest.skip("needs qm9pack (pip install qm9pack)")
    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(["demo", "--quick", "--no-progress", "--threads", "1", "--out", str(out)])
    return status, buffer.getvalue(), out


def test_demo_quick_finishes_and_prints_the_table(demo_run):
    status, stdout, _ = demo_run
    assert status == 0
    assert "Δm% vs equal" in stdout and "ms/step" in stdout and "u0 (meV)" in stdout
    assert "seeds 0, 1" in stdout
    table = stdout.split("Δm% vs equal", 1)[1]
    for method in cli.DEMO_METHODS:
        assert f"\n{method} " in table
    # equal is the baseline of Δm: exactly zero on its own row
    equal_row = next(line for line in table.splitlines() if line.startswith("equal "))
    assert "+0.00" in equal_row


def test_demo_quick_writes_png_and_csv(demo_run):
    _, _, out = demo_run
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = read_csv(out / "results.csv")
    assert [r["method"] for r in results] == list(cli.DEMO_METHODS)
    targets = gb.data.qm9.TARGETS
    for r in results:
        assert int(r["seeds"]) == 2
        for target in targets:
            assert float(r[f"{target}_mae"]) > 0
        assert float(r["seconds_per_step"]) > 0
    assert float(results[0]["delta_m_vs_equal"]) == 0.0
    epochs = read_csv(out / "epochs.csv")
    assert len(epochs) == 2 * len(cli.DEMO_METHODS)  # one epoch, two seeds
    assert {e["seed"] for e in epochs} == {"0", "1"}
    steps = read_csv(out / "steps" / "mgda-ub-seed1.csv")
    assert len(steps) == int(results[0]["steps"]) > 0
    weights = [sum(float(s[f"weight/{t}"]) for t in targets) for s in steps]
    assert all(w == pytest.approx(1.0) for w in weights)  # MGDA-UB: weights on the simplex


@needs_qm9
def check_demo_reruns_identically(tmp_path: Path, argv: list[str]) -> None:
    """Two runs of ``gradbalance demo ARGV`` write the same results.csv but for the times."""
    rows = []
    for run in ("a", "b"):
        assert main(["demo", *argv, "--no-progress", "--out", str(tmp_path / run)]) == 0
        rows.append(read_csv(tmp_path / run / "results.csv"))
    for a, b in zip(*rows):
        for key in a:
            if key != "seconds_per_step":
                assert a[key] == b[key], key


def test_demo_is_reproducible_with_seeds_in_parallel(tmp_path, capsys):
    argv = ["--quick", "--methods", "equal", "gls", "--seeds", "2", "--jobs", "2"]
    check_demo_reruns_identically(tmp_path, argv)
    capsys.readouterr()


@needs_qm9
def test_demo_leaves_out_a_method_that_cannot_run(tmp_path, capsys):
    argv = ["demo", "--quick", "--methods", "equal", "fixed", "dtp", "--seeds", "1"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "method 'fixed' cannot be built with its default options" in captured.err
    # DTP needs a KPI in [0, 1], which regression targets do not define
    assert "method 'dtp' cannot be built" in captured.err and "KPI" in captured.err
    assert "one seed (0): differences between methods may be seed noise" in captured.out
    assert "--method-arg" in captured.err and "Left out (see the messages above): fixed, dtp" in (
        captured.out
    )
    assert [r["method"] for r in read_csv(tmp_path / "results.csv")] == ["equal"]


def test_demo_on_multimnist(tmp_path, capsys):
    argv = ["demo", "--data", "multimnist", "--quick", "--epochs", "1", "--methods", "equal"]
    assert main([*argv, "mgda-ub", "dtp", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MultiMNIST" in out and "left acc %" in out and "one seed (0)" in out
    results = read_csv(tmp_path / "results.csv")
    assert [r["method"] for r in results] == ["equal", "mgda-ub", "dtp"]
    for r in results:
        for task in ("left", "right"):
            assert 0.0 <= float(r[f"{task}_accuracy"]) <= 1.0
    steps = read_csv(tmp_path / "steps" / "mgda-ub.csv")
    weights = [float(s["weight/left"]) + float(s["weight/right"]) for s in steps]
    assert all(w == pytest.approx(1.0) for w in weights)


def test_demo_multimnist_is_reproducible(tmp_path, capsys):
    argv = ["--data", "multimnist", "--quick", "--epochs", "1", "--methods", "equal", "dtp"]
    check_demo_reruns_identically(tmp_path, argv)
    capsys.readouterr()


# ----------------------------------------------------------------------------- list / help
def test_list_shows_methods_models_and_datasets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in gb.methods.available():
        assert f"\n{name} " in out
    for name in gb.models.list():
        assert f"\n{name} " in out
    for name in cli.DATASETS:
        assert f"\n{name} " in out
    assert "NeurIPS 2018" in out  # papers are shown


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["list"], ["bench"]])
def test_help_works_everywhere(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "usage: gradbalance" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--bogus"], "gradbalance demo: error: unrecognized arguments: --bogus"),
        (["demo", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["demo", "--methods", "equal", "nope"], "unknown method 'nope'; choose from: "),
        (["train", "--method", "nope"], "unknown method 'nope'; choose from: "),
        (["train", "--model", "resnet9000"], "unknown model 'resnet9000'; choose from:"),
        (["train", "--data", "imagenet"], "invalid choice: 'imagenet'"),
        (["train", "--method-arg", "novalue"], "expected key=value"),
        (["train", "--lr", "-1"], "expected a positive number, got '-1'"),
        (["train", "--data", "nyuv2"], "--data nyuv2 needs --root"),
        (["train", "--tasks", "middle"], "has no task(s) ['middle']; its tasks are ['left'"),
        (["bench", "gpu"], "invalid choice: 'gpu'"),
        (["list", "--", "x"], "only passed to benchmark scripts"),
    ],
)
def test_bad_command_lines_exit_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: gradbalance" in err
    if "choose from: " in message:  # every valid name is listed
        names = gb.methods.available() if "method" in message else gb.models.list()
        assert all(name in err for name in names)


def test_unknown_method_option_is_a_usage_error(capsys):
    argv = ["train", "--quick", "--method", "dwa", "--method-arg", "temprature=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "method 'dwa'" in err and "temprature" in err


def test_feature_method_on_a_model_without_features(capsys, tmp_path):
    argv = ["train", "--data", "synthetic", "--model", "cross-stitch", "--method", "mgda-ub"]
    assert main([*argv, "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "works on the shared features" in err and "multilenet" in err


def test_model_that_cannot_read_the_data(capsys, tmp_path):
    argv = ["train", "--data", "multimnist", "--model", "mtan", "--quick", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "model 'mtan'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train
def test_train_quick_synthetic(tmp_path, capsys):
    argv = ["train", "--data", "synthetic", "--model", "split", "--method", "mgda", "--quick"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "segmentation/miou" in out and "normal/mean" in out and "final task weights" in out
    steps = read_csv(tmp_path / "steps.csv")
    assert len(steps) == 4  # 16 scenes, batch 4, one epoch
    assert {"loss/depth", "weight/normal"} <= set(steps[0])
    assert len(read_csv(tmp_path / "epochs.csv")) == 1


def test_train_quick_multimnist_with_method_args(tmp_path, capsys):
    argv = ["train", "--method", "dtp", "--method-arg", "gamma=2.0", "--quick"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "left/accuracy" in out and "right/accuracy" in out
    assert len(read_csv(tmp_path / "steps.csv")) == 8  # 512 digits, batch 64


def test_train_quick_nyuv2_fixture_with_pad_net(tmp_path, capsys):
    root = gb.data.write_fixture(tmp_path / "nyu", n=2, size=(32, 32))
    argv = ["train", "--data", "nyuv2", "--root", str(root), "--model", "pad-net"]
    argv += ["--method", "uncertainty", "--tasks", "segmentation", "depth", "--quick"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "segmentation/pixel_acc" in out and "normal" not in out.split("tasks", 1)[1]


def test_train_missing_dataset_folder_is_reported(tmp_path, capsys):
    argv = ["train", "--data", "cityscapes", "--root", str(tmp_path / "nowhere"), "--quick"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "gradbalance train: error:" in err and "nowhere" in err


# ----------------------------------------------------------------------------- bench
@pytest.fixture
def bench_dir(tmp_path):
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "solver.py").write_text(
        "import sys\nprint('fake solver', ' '.join(sys.argv[1:]))\n", encoding="utf-8"
    )
    return d


def test_bench_runs_a_script_with_quick_and_passthrough_args(bench_dir, capfd):
    assert (
        main(["bench", "solver", "--quick", "--dir", str(bench_dir), "--", "--threads", "2"]) == 0
    )
    out = capfd.readouterr().out
    assert "fake solver --ks 2 4 8 --n 5 --repeats 2 --threads 2" in out


def test_bench_missing_script_gives_a_clear_error(bench_dir, capfd):
    assert main(["bench", "step", "--dir", str(bench_dir)]) == 1
    err = capfd.readouterr().err
    assert "gradbalance bench: error: benchmark 'step' needs" in err
    assert "step.py, which does not exist" in err and "solver.py" in err


def test_bench_all_runs_what_exists_and_reports_the_rest(bench_dir, capfd):
    assert main(["bench", "all", "--dir", str(bench_dir)]) == 1
    captured = capfd.readouterr()
    assert "fake solver" in captured.out
    assert "step.py, which does not exist" in captured.err


def test_bench_without_a_benchmarks_folder(tmp_path, capsys):
    assert main(["bench", "--dir", str(tmp_path / "none")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_bench_finds_the_checkout_folder():
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not here.is_dir():  # pragma: no cover - tests run from a checkout
        pytest.skip("no benchmarks/ folder in this checkout")
    assert bench.find_benchmarks(None) == here


def test_entry_point_module_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gradbalance.cli", "demo", "--epochs", "-3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "expected a positive integer" in result.stderr
