"""`gradbalance train --quick` over a representative model x method x dataset matrix.

Every combination either trains (exit 0, the results table) or stops with exit code 2 and a
message that says what to use instead, never a traceback. The full matrix (11 model/data pairs
x 14 methods) was run by hand, and for ``--data qm9`` qm9-mpnn with each of the 22 methods and
each other model with equal; this file keeps one case per model and per kind of failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gradbalance as gb
from gradbalance.cli import main, recipes
from gradbalance.cli.errors import CommandError

pytest.importorskip("mlxtend")

#: The committed 60-molecule QM9 source: ``--data qm9`` runs read it (no full download).
QM9_FIXTURE = Path(__file__).resolve().parent / "data" / "fixtures" / "qm9"


def train(tmp_path, capsys, data: str, model: str, method: str, *extra: str):
    argv = ["train", "--quick", "--no-progress", "--threads", "1", "--out", str(tmp_path)]
    argv += ["--data", data, "--model", model, "--method", method, *extra]
    if data == "qm9":
        argv += ["--root", str(QM9_FIXTURE)]
    status = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


RUNS = [
    ("multimnist", "multilenet", "mgda-ub"),
    ("multimnist", "multilenet", "nash-mtl"),
    ("multimnist", "multilenet", "rlw"),
    ("multimnist", "mmoe", "graddrop"),  # MMoE on the flattened images
    ("qm9", "qm9-mpnn", "mgda-ub"),  # eleven regression targets, the shared features
    ("qm9", "qm9-mpnn", "gradnorm"),
    ("qm9", "qm9-mpnn", "nash-mtl"),
    ("qm9", "qm9-mpnn", "uncertainty"),
    ("synthetic", "split", "mgda"),
    ("synthetic", "split-wide", "equal"),
    ("synthetic", "segnet", "famo"),
    ("synthetic", "split", "gradnorm"),
    ("synthetic", "mtan", "upgrad"),
    ("synthetic", "cross-stitch", "cagrad"),
    ("synthetic", "pad-net", "mgda-ub"),
    ("synthetic", "pad-net", "dtp"),
    ("synthetic", "nddr-cnn", "moco"),
    ("synthetic", "dense", "pcgrad"),
    ("synthetic", "stan", "imtl-l"),
]


@pytest.mark.parametrize(("data", "model", "method"), RUNS)
def test_combination_trains(tmp_path, capsys, data, model, method):
    status, out, err = train(tmp_path, capsys, data, model, method)
    assert status == 0, err
    assert "final task weights" in out and "nan" not in out.lower()
    assert (tmp_path / "epochs.csv").is_file() and (tmp_path / "steps.csv").is_file()


ERRORS = [
    # gradient methods on models whose tasks share no parameter
    ("synthetic", "segnet", "mgda", (), "shares none"),
    ("synthetic", "stan", "gradnorm", (), "shares none"),
    # MGDA-UB and the representation engine need one shared feature tensor
    ("synthetic", "mtan", "mgda-ub", (), "shared representation, e.g. multilenet, "),
    ("synthetic", "cross-stitch", "mgda", ("--engine", "representation"), "--engine auto"),
    # a model that cannot read the data says which data it can read
    ("synthetic", "mmoe", "equal", (), "--data multimnist"),
    ("multimnist", "split", "equal", (), "--data synthetic"),
    ("qm9", "split", "equal", (), "--model qm9-mpnn"),
    ("multimnist", "qm9-mpnn", "equal", (), "it runs on --data qm9"),
    # a method that needs KPIs in [0, 1] on regression targets
    ("qm9", "qm9-mpnn", "dtp", (), "e.g. uncertainty, gls"),
    ("multimnist", "mmoe", "equal", ("--width", "0.5"), "no width multiplier"),
    # a method option the command line does not set by itself
    ("synthetic", "split", "fixed", (), "--method-arg"),
]


@pytest.mark.parametrize(("data", "model", "method", "extra", "message"), ERRORS)
def test_combination_fails_clearly(tmp_path, capsys, data, model, method, extra, message):
    status, _, err = train(tmp_path, capsys, data, model, method, *extra)
    assert status == 2
    assert "gradbalance train: error:" in err and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_missing_cuda_is_a_usage_error(tmp_path, capsys):
    status, _, err = train(tmp_path, capsys, "synthetic", "split", "equal", "--device", "cuda")
    assert status == 2 and "use --device cpu" in err


def test_mgda_ub_hint_lists_the_split_models(tmp_path, capsys):
    status, _, err = train(tmp_path, capsys, "synthetic", "segnet", "mgda-ub")
    assert status == 2
    hint = err.split("e.g.", 1)[1]
    assert {"split", "split-wide", "pad-net", "multilenet"} <= {n.strip() for n in hint.split(",")}


def test_broken_dataset_file_is_reported_without_traceback(tmp_path, capsys):
    from gradbalance.data import write_fixture

    root = write_fixture(tmp_path / "nyu", n=2, size=(32, 32), dataset="nyuv2")
    # NYUv2 labels (13 classes) read as CityScapes (7 classes): a format error, exit 1
    status, _, err = train(tmp_path, capsys, "cityscapes", "split", "equal", "--root", str(root))
    assert status == 1 and "CityScapes" in err and "expected" in err


#: What ``gradbalance train`` has always refused on a model whose tasks share no parameter: a
#: method that requires any of these. It is wider than `Method.is_gradient_method` (Gramian,
#: Jacobian, features): GradNorm weights the losses, yet reads the last shared layer's Gramian.
SHARED_GRADIENT_NEEDS = {"gramian", "jacobian", "features", "last_shared_gramian"}


@pytest.mark.parametrize("method", gb.methods.available())
def test_what_train_does_with_each_method_on_a_model_that_shares_nothing(
    tmp_path, capsys, monkeypatch, method
):
    """Pins, per registered method, the check `train` makes on SegNet (no shared parameter, no
    shared features): methods that pass it stop at the balancer, which is stubbed out here."""

    def balancer_reached(*args, **kwargs):
        raise CommandError("the balancer was reached")

    monkeypatch.setattr(recipes, "build_balancer", balancer_reached)
    status, _, err = train(tmp_path, capsys, "synthetic", "segnet", method)
    requires = gb.methods.get_class(method).requires
    if "features" in requires:  # stopped one check earlier: SegNet has no shared features
        assert status == 2 and "shared representation" in err
    elif requires & SHARED_GRADIENT_NEEDS:
        assert status == 2 and "shares none" in err
    else:
        assert status == 1 and "the balancer was reached" in err


def test_gradnorm_is_refused_though_not_a_gradient_method(tmp_path, capsys):
    """Where the command's rule and `Method.is_gradient_method` disagree (issue 13)."""
    assert not gb.methods.get_class("gradnorm").is_gradient_method()
    status, _, err = train(tmp_path, capsys, "synthetic", "segnet", "gradnorm")
    assert status == 2 and "shares none" in err
