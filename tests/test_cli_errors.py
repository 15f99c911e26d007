"""The ``gradbalance`` command's bad flag values and its shutdown on SIGTERM.

Every bad value of ``--seed``, ``--device``, ``--out``, ``--threads`` or ``--width`` is a usage
error (exit 2, one ``gradbalance COMMAND: error: ...`` line naming the flag, no traceback)
found before any training. SIGTERM (a timeout, SLURM, Kubernetes) stops a run like Ctrl-C does:
the CSV rows written so far are kept and the exit status is 143 (128 + 15).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradbalance import cli
from gradbalance.cli import listing, main, recipes

pytest.importorskip("mlxtend")

ROOT = Path(__file__).resolve().parent.parent


def usage_error(argv: list[str], capsys, flag: str) -> str:
    """Run ``main(argv)``; check exit 2 and a one-line error that names ``flag``."""
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"gradbalance {argv[0]}: error: ")
    assert flag in errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- --seed
@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("seed", ["-1", str(2**64), "1.5"])
def test_bad_seed_is_a_usage_error(command, seed, capsys, tmp_path):
    argv = [command, "--quick", "--no-progress", "--out", str(tmp_path), "--seed", seed]
    line = usage_error(argv, capsys, "--seed")
    assert repr(seed) in line
    assert not any(tmp_path.iterdir())  # nothing ran


def test_largest_seed_is_accepted():
    args = cli.build_parser().parse_args(["train", "--seed", str(2**64 - 1)])
    assert args.seed == 2**64 - 1


# ----------------------------------------------------------------------------- --device
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("meta", "no data"),
        ("frobnicate", "unknown device"),
        ("cpu:banana", "unknown device"),
    ],
)
def test_bad_device_is_a_usage_error(device, message, capsys, tmp_path):
    argv = ["train", "--quick", "--no-progress", "--out", str(tmp_path), "--device", device]
    line = usage_error(argv, capsys, "--device")
    assert message in line and "--device cpu" in line
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_found_before_loading_data(capsys, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):  # pragma: no cover - the check must come first
        raise AssertionError("the data was loaded before --device was checked")

    monkeypatch.setattr(recipes, "train_data", no_data)
    argv = ["train", "--quick", "--out", str(tmp_path), "--device", "cuda:0"]
    assert "use --device cpu" in usage_error(argv, capsys, "--device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_missing_cuda_index_is_a_usage_error(capsys, tmp_path):  # pragma: no cover - GPU only
    device = f"cuda:{torch.cuda.device_count()}"
    argv = ["train", "--quick", "--out", str(tmp_path), "--device", device]
    usage_error(argv, capsys, "--device")


# ----------------------------------------------------------------------------- --out
@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["train", "demo"])
def test_out_that_is_a_file_is_a_usage_error(command, a_file, capsys):
    line = usage_error([command, "--quick", "--out", str(a_file)], capsys, "--out")
    assert "is a file" in line and str(a_file) in line
    assert a_file.read_text(encoding="utf-8") == "not a folder\n"


@pytest.mark.parametrize("command", ["train", "demo"])
def test_out_below_a_file_is_a_usage_error(command, a_file, capsys):
    out = a_file / "run" / "deeper"
    line = usage_error([command, "--quick", "--out", str(out)], capsys, "--out")
    assert "cannot" in line and str(out) in line


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
@pytest.mark.parametrize("command", ["train", "demo"])
def test_out_in_a_read_only_folder_is_a_usage_error(
    command, tmp_path, capsys
):  # pragma: no cover - not as root
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = usage_error([command, "--quick", "--out", str(locked / "run")], capsys, "--out")
        assert "cannot" in line
    finally:
        locked.chmod(0o700)


def test_out_check_leaves_no_folder_behind(capsys, tmp_path):
    out = tmp_path / "new" / "run"
    # a usage error found after the --out check: the folders it probed are removed again
    argv = ["train", "--quick", "--data", "synthetic", "--model", "segnet", "--method", "mgda"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "shares none" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_out_whose_csv_is_a_folder_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "steps.csv").mkdir()
    line = usage_error(["train", "--quick", "--out", str(tmp_path)], capsys, "--out")
    assert "steps.csv" in line


def test_demo_out_whose_steps_is_a_file_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "steps").write_text("", encoding="utf-8")
    line = usage_error(["demo", "--quick", "--out", str(tmp_path)], capsys, "--out")
    assert "steps" in line


# ----------------------------------------------------------------------------- other flags
@pytest.mark.parametrize("command", ["train", "demo"])
def test_absurd_thread_count_is_a_usage_error(command, capsys, tmp_path):
    argv = [command, "--quick", "--out", str(tmp_path), "--threads", "100000"]
    assert "100000" in usage_error(argv, capsys, "--threads")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--epochs", "-2"),
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--width", "-1"),
        ("--width", "inf"),
    ],
)
def test_non_positive_numbers_are_usage_errors(flag, value, capsys, tmp_path):
    usage_error(["train", "--quick", "--out", str(tmp_path), flag, value], capsys, flag)


def test_width_too_large_for_memory_is_a_usage_error(capsys, tmp_path):
    argv = ["train", "--quick", "--data", "synthetic", "--out", str(tmp_path)]
    line = usage_error([*argv, "--width", "1e4"], capsys, "--width")
    assert "memory" in line


# ----------------------------------------------------------------------------- SIGTERM
def test_fit_flushes_the_csv_rows_after_every_epoch(tmp_path):
    """What an epoch logged is on disk before the next epoch starts (a SIGKILL keeps it)."""
    import gradbalance as gb
    from gradbalance.runlog import RunLogger

    net = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), {"a": torch.randn(4), "b": torch.randn(4)})] * 3
    balancer = gb.GradBalancer(torch.optim.SGD(net.parameters(), lr=0.01), shared=net)
    lines_at_eval = []

    def evaluate(model):
        lines_at_eval.append(len((tmp_path / "steps.csv").read_text().splitlines()))
        return {}

    def losses(outputs, targets):
        return {t: ((outputs[:, i] - targets[t]) ** 2).mean() for i, t in enumerate("ab")}

    with RunLogger(tmp_path, "steps", tensorboard=False) as log:
        gb.training.fit(
            net,
            balancer,
            data,
            losses,
            epochs=2,
            evaluate=evaluate,
            run_logger=log,
            show_progress=False,
        )
    assert lines_at_eval == [1 + 3, 1 + 6]  # the header and every step so far


def test_sigterm_stops_like_ctrl_c_and_restores_the_handler(monkeypatch, capsys):
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal interrupts the sleep
        raise AssertionError("SIGTERM did not stop the command")  # pragma: no cover

    def before(signum, frame):  # pragma: no cover - must not be called
        raise AssertionError("the previous handler ran")

    previous = signal.signal(signal.SIGTERM, before)
    try:
        monkeypatch.setattr(listing, "run", terminated)
        assert main(["list"]) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "Traceback" not in err


def test_sigterm_keeps_the_csv_rows_written_so_far(tmp_path):
    out = tmp_path / "run"
    steps = out / "steps.csv"
    argv = ["train", "--data", "synthetic", "--quick", "--epochs", "100000", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradbalance.cli", *argv, "--threads", "1", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        # wait (bounded) until the first epoch's 4 steps are on disk, then terminate
        deadline = time.monotonic() + 120
        seen = 0
        while seen < 1 + 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no CSV row reached the disk"
            time.sleep(0.05)
            seen = len(steps.read_text().splitlines()) if steps.is_file() else 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the test fails
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "Traceback" not in err
    with steps.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= seen - 1
    assert [int(r["step"]) for r in rows] == list(range(len(rows)))
    assert all(r["weight/depth"] not in (None, "") for r in rows)  # no half-written last row
