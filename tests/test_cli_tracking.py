"""``gradbalance train``'s run folder: config.json and ``--config``, the CSV files, the
checkpoint, the figure and TensorBoard."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import gradbalance as gb
from gradbalance.cli import main, runconfig, rundir
from gradbalance.models.base import NYUV2_TASKS

#: A run of a few seconds with a gradient method (so the steps have cosines).
QUICK = ["train", "--data", "synthetic", "--method", "mgda", "--quick", "--no-progress"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def usage_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    assert main([*QUICK, "--method-arg", "normalization='loss'", "--out", str(out)]) == 0
    return out


def test_the_run_folder_holds_every_file(first_run):
    names = {p.name for p in first_run.iterdir()}
    expected = {"config.json", "steps.csv", "epochs.csv", "checkpoint.pt"}
    if importlib.util.find_spec("matplotlib") is not None:
        expected.add("run.png")
        assert (first_run / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert names == expected  # no tb/ without --tensorboard
    steps = read_csv(first_run / "steps.csv")
    assert len(steps) == 4
    assert {"cosine/segmentation~depth", "cosine/depth~normal"} <= set(steps[0])
    epochs = read_csv(first_run / "epochs.csv")
    assert len(epochs) == 1 and "segmentation/miou" in epochs[0]


def test_config_json_holds_every_resolved_option(first_run):
    config = json.loads((first_run / "config.json").read_text())
    assert config.pop(runconfig.VERSION_KEY) == gb.__version__
    assert list(config) == list(runconfig.DEFAULTS)
    assert config["model"] == "split" and config["method"] == "mgda"
    assert config["method_args"] == {"normalization": "loss"}
    assert config["tasks"] == ["segmentation", "depth", "normal"]
    assert (config["epochs"], config["batch_size"], config["lr"]) == (1, 4, 1e-3)
    assert config["width"] == 1 / 16 and config["quick"] is True and config["seed"] == 0


def test_the_checkpoint_loads_with_weights_only(first_run):
    state = torch.load(first_run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["method"] == "mgda"
    config = state["config"]
    tasks = {**NYUV2_TASKS, "segmentation": gb.tasks.TaskSpec("segmentation", 7)}  # synthetic
    model = gb.models.create("split", tasks=tasks, width=config["width"])
    model.load_state_dict(state["model"])
    opt = gb.GradBalancer(torch.optim.Adam(model.parameters()), "mgda", shared="auto")
    opt.load_state_dict(state["optimizer"])
    assert opt.steps == 4


def test_config_reruns_the_same_run(first_run, tmp_path):
    out = tmp_path / "b"
    assert main(["train", "--config", str(first_run / "config.json"), "--no-progress",
                 "--out", str(out)]) == 0  # fmt: skip
    a = json.loads((first_run / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == a  # it round-trips
    for name in ("steps.csv", "epochs.csv"):
        rows_a, rows_b = read_csv(first_run / name), read_csv(out / name)
        assert len(rows_a) == len(rows_b) and list(rows_a[-1]) == list(rows_b[-1])
        for row_a, row_b in zip(rows_a, rows_b):
            for key in row_a:
                assert float(row_b[key]) == pytest.approx(float(row_a[key]), rel=1e-5, abs=1e-7)


def test_flags_beside_config_override_it(first_run, tmp_path, monkeypatch):
    seen = {}

    def fake_run(args):  # the resolved options, without training
        runconfig.resolve(args, args.subparser)
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(gb.cli.train, "run", fake_run)
    argv = ["train", "--config", str(first_run / "config.json"), "--method-arg", "x=2"]
    argv += ["--epochs", "3", "--no-quick", "--seed", "0", "--optimizer", "adam"]
    assert main(argv) == 0
    assert seen["epochs"] == 3 and seen["quick"] is False and seen["seed"] == 0
    assert seen["batch_size"] == 4 and seen["method"] == "mgda"  # from the file
    assert dict(seen["method_arg"]) == {"normalization": "loss", "x": 2}


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"data": "synthetic", "epoch": 2}, "'epoch'"),
        ({"epochs": "2"}, "'epochs'"),
        ({"epochs": 0}, "'epochs'"),
        ({"quick": "yes"}, "'quick'"),
        ({"lr": -1}, "'lr'"),
        ({"method": "nope"}, "'method'"),
        ({"method_args": [1]}, "'method_args'"),
        ({"tasks": "depth"}, "'tasks'"),
        ({"data": "mnist"}, "'data'"),
    ],
)
def test_a_bad_key_in_config_is_a_usage_error_naming_it(content, named, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    line = usage_error(["train", "--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert "--config" in line and named in line
    assert not (tmp_path / "o").exists()


def test_a_config_that_is_not_json_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    assert "not a JSON file" in usage_error(["train", "--config", str(path)], capsys)
    assert "cannot read" in usage_error(["train", "--config", str(tmp_path / "no")], capsys)


def test_tensorboard_flag_without_tensorboard_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(rundir, "tensorboard_available", lambda: False)
    line = usage_error([*QUICK, "--tensorboard", "--out", str(tmp_path / "o")], capsys)
    assert "--tensorboard" in line and "pip install gradbalance[tensorboard]" in line


def test_tensorboard_flag_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", "--quick", "--data", "synthetic", "--method", "pcgrad", "--epochs", "2"]
    assert main([*argv, "--no-progress", "--tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/depth", "weight/normal", "cosine/segmentation~normal"} <= tags
    assert "test/depth/abs_err" in tags
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1


def test_a_failed_run_leaves_no_file_of_an_earlier_run_in_its_folder(tmp_path, monkeypatch):
    # the earlier run's checkpoint, epochs, figure and event files must not sit beside the new
    # run's config.json and steps.csv when the new run stops in its first epoch
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    old = ["checkpoint.pt", "epochs.csv", "run.png", "tb/events.out.tfevents.1.old"]
    for name in old:
        (out / name).write_text("an earlier run")
    from gradbalance.cli import train

    def failing_fit(*args, callbacks, **kwargs):
        raise gb.errors.NonFiniteError("task 'depth': the loss is nan")

    monkeypatch.setattr(train, "fit", failing_fit)
    assert main([*QUICK, "--out", str(out)]) == 1
    assert (out / "config.json").exists()
    left = [name for name in old if (out / name).exists()]
    assert left == [], f"files of the earlier run left beside the new config.json: {left}"
