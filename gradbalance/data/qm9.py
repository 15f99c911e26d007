"""QM9 with the eleven targets of the multi-task benchmark, as dense padded molecules.

The multi-task QM9 benchmark (Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML
2022, Nash-MTL; Liu et al., *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023) trains
on PyTorch Geometric's ``QM9`` with the target indices ``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15,
11]`` (``target_idx`` in ``experiments/quantum_chemistry/utils.py`` of both repositories). We
rebuild those eleven targets from QM9's raw values (read from ``qm9pack``, see
`gradbalance.data.qm9_source`), in PyG's units:

======== === ============================================ =========== ==========================
name     PyG property                                     unit        from QM9's raw value
======== === ============================================ =========== ==========================
mu       0   dipole moment μ                              D           as is
alpha    1   isotropic polarizability α                   a0³         as is
homo     2   ε_HOMO                                       eV          hartree × 27.211386246
lumo     3   ε_LUMO                                       eV          hartree × 27.211386246
r2       5   electronic spatial extent ⟨R²⟩               a0²         as is
zpve     6   zero-point vibrational energy                eV          hartree × 27.211386246
u0       12  atomization energy U0 (0 K)                  eV          (U0 − Σ atom refs) × Ha
u298     13  atomization energy U (298.15 K)              eV          (U − Σ atom refs) × Ha
h298     14  atomization enthalpy H (298.15 K)            eV          (H − Σ atom refs) × Ha
g298     15  atomization free energy G (298.15 K)         eV          (G − Σ atom refs) × Ha
cv       11  heat capacity c_v (298.15 K)                 cal/(mol K) as is
======== === ============================================ =========== ==========================

What was checked, and where:

* PyG's ``torch_geometric/datasets/qm9.py`` (pyg-team/pytorch_geometric): the ``conversion``
  table multiplies indices 2-4 (orbital energies) and 6-10 (ZPVE, U0, U, H, G) by ``HAR2EV =
  27.211386246`` (27.2113825435 in older releases: a 1e-7 relative difference) and leaves
  0, 1, 5, 11 (D, a0³, a0², cal/(mol K)) unchanged; indices 12-15 are the DeepChem CSV's
  ``u0_atom``, ``u298_atom``, ``h298_atom``, ``g298_atom`` columns (kcal/mol) ×
  ``KCALMOL2EV = 0.04336414``: the total energy minus the atoms' reference energies. PyG drops
  the 3,054 molecules of QM9's ``uncharacterized.txt`` (``assert len(skip) == 3054``) and
  keeps the others in QM9's order: 130,831 molecules, the same set as qm9pack (133,885 −
  3,054; qm9pack's ``doc/paper.md`` says so) in the same order (we sort by ``Index``).
* The atomic reference energies `ATOM_REFERENCE_HARTREE` are QM9's ``atomref.txt``
  (figshare file 3195395, B3LYP/6-31G(2df,p)); PyG's ``atomrefs`` (eV) divided by 27.211386
  give the same numbers to the 6 decimals printed.
* Methane (molecule 1): U0 = −40.47893 Ha, so U0_atom = (−40.47893 − (−37.846772 − 4 ×
  0.500273)) × 27.211386246 = −17.172181 eV; DeepChem's ``gdb9.sdf.csv`` (PyG's source) has
  ``u0_atom = −395.999594594`` kcal/mol, × 0.04336414 = −17.172182 eV. The tests check this.
* Navon et al.'s and Liu et al.'s ``trainer.py``: ``dataset.shuffle()``, then test = the first
  10,000, val = the next 10,000, train = the remaining 110,831; targets are normalised with
  ``train_dataset.data.y`` mean and (unbiased) std — ``.data`` of a sliced PyG dataset is the
  full storage, so in effect the statistics of all 130,831 molecules. Nash-MTL normalises by
  default (``--scale-y True``), FAMO's trainer defaults to ``--scale-y False``. MAE is reported
  in meV for `MEV_TARGETS` (homo, lumo, zpve, u0, u298, h298, g298), in the units above
  otherwise.

Our split (`SPLIT_SIZES`): a permutation of all molecules by
``numpy.random.default_rng(seed).permutation``; ``"train"`` is its first 110,000 entries,
``"val"`` the next 10,000, ``"test"`` the next 10,000; the last 831 are unused (the papers'
code trains on them too: 110,831). Normalisation uses the mean and unbiased std of the full
training split, whatever ``size`` is (the papers' code: of all molecules, see above).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gradbalance.data.errors import DatasetFormatError
from gradbalance.data.qm9_source import ELEMENTS, MAX_ATOMS, PROPERTY_COLUMNS, load_arrays

__all__ = [
    "ATOM_REFERENCE_HARTREE",
    "HARTREE_TO_EV",
    "MAX_ATOMS",
    "MEV_TARGETS",
    "PYG_INDEX",
    "QM9",
    "SPLIT_SIZES",
    "TARGETS",
    "UNITS",
    "benchmark_targets",
    "split_indices",
]

#: The eleven targets of the multi-task benchmark, in the papers' order.
TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u298", "h298", "g298", "cv")
#: Unit of each target (PyG's units, which the papers use).
UNITS = {
    "mu": "D",
    "alpha": "a0^3",
    "homo": "eV",
    "lumo": "eV",
    "r2": "a0^2",
    "zpve": "eV",
    "u0": "eV",
    "u298": "eV",
    "h298": "eV",
    "g298": "eV",
    "cv": "cal/(mol K)",
}
#: Index of each target in PyTorch Geometric's ``QM9().y``.
PYG_INDEX = {
    "mu": 0,
    "alpha": 1,
    "homo": 2,
    "lumo": 3,
    "r2": 5,
    "zpve": 6,
    "u0": 12,
    "u298": 13,
    "h298": 14,
    "g298": 15,
    "cv": 11,
}
#: Targets whose MAE the papers report in meV (multiply the eV error by 1000).
MEV_TARGETS = ("homo", "lumo", "zpve", "u0", "u298", "h298", "g298")
#: Hartree in eV (CODATA 2018, PyG's ``HAR2EV``).
HARTREE_TO_EV = 27.211386246
#: QM9's atomic reference energies (hartree): U0, U(298.15 K), H(298.15 K), G(298.15 K).
ATOM_REFERENCE_HARTREE = {
    1: (-0.500273, -0.498857, -0.497912, -0.510927),
    6: (-37.846772, -37.845355, -37.844411, -37.861317),
    7: (-54.583861, -54.582445, -54.581501, -54.598897),
    8: (-75.064579, -75.063163, -75.062219, -75.079532),
    9: (-99.718730, -99.717314, -99.716370, -99.733544),
}
#: Molecules in the train, val and test splits of the benchmark.
SPLIT_SIZES = (110_000, 10_000, 10_000)

_SPLITS = ("train", "val", "test")
_NORMALIZE = {
    True: "standardize",
    "standardize": "standardize",
    "center": "center",
    False: "none",
    "none": "none",
}
_COLUMN = {name: i for i, name in enumerate(PROPERTY_COLUMNS)}
_RAW = {
    "mu": ("Dipole_debye", 1.0),
    "alpha": ("Polarizability_bohr3", 1.0),
    "homo": ("HOMO_au", HARTREE_TO_EV),
    "lumo": ("LUMO_au", HARTREE_TO_EV),
    "r2": ("R2_bohr2", 1.0),
    "zpve": ("ZPVE_au", HARTREE_TO_EV),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),
}
_ATOMIZATION = {
    "u0": ("InternalEnergy_0K_au", 0),
    "u298": ("InternalEnergy_298K_au", 1),
    "h298": ("Enthalphy_298K_au", 2),
    "g298": ("GibbsFreeEnergy_298K_au", 3),
}


def benchmark_targets(
    z: np.ndarray, properties: np.ndarray, names: Sequence[str] = TARGETS
) -> np.ndarray:
    """The benchmark targets (float64 ``(N, len(names))``, units `UNITS`) from QM9's raw values.

    Args:
        z: atomic numbers ``(N, atoms)``, 0 for padding.
        properties: ``(N, 15)`` raw properties in the order of
            `gradbalance.data.qm9_source.PROPERTY_COLUMNS` (QM9's units: hartree, D, a0³, ...).
        names: targets among `TARGETS`.

    Example:
        >>> import numpy as np
        >>> z = np.array([[6, 1, 1, 1, 1]])  # methane: U0 = -40.47893 Ha
        >>> raw = np.zeros((1, 15)); raw[0, 10] = -40.47893
        >>> round(float(benchmark_targets(z, raw, ["u0"])[0, 0]), 4)
        -17.1722
    """
    _check_names(names)
    counts = np.stack([(z == number).sum(axis=1) for number in ELEMENTS.values()], axis=1)
    if (counts.sum(axis=1) != (z != 0).sum(axis=1)).any():
        raise DatasetFormatError(f"atomic numbers outside QM9's elements {sorted(ELEMENTS)}")
    refs = np.array([ATOM_REFERENCE_HARTREE[number] for number in ELEMENTS.values()])
    atoms = counts.astype(np.float64) @ refs  # (N, 4): summed reference energies
    out = np.empty((properties.shape[0], len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        if name in _RAW:
            column, scale = _RAW[name]
            out[:, j] = properties[:, _COLUMN[column]] * scale
        else:
            column, ref = _ATOMIZATION[name]
            out[:, j] = (properties[:, _COLUMN[column]] - atoms[:, ref]) * HARTREE_TO_EV
    return out


def split_indices(
    num_molecules: int,
    split: str,
    seed: int = 0,
    split_sizes: Sequence[int] = SPLIT_SIZES,
) -> np.ndarray:
    """Rows of one split: ``numpy.random.default_rng(seed).permutation(num_molecules)`` cut in
    train, val and test blocks of ``split_sizes``, in this order (any remainder is unused).

    Example:
        >>> split_indices(10, "val", seed=0, split_sizes=(6, 2, 2)).shape
        (2,)
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    sizes = _check_sizes(split_sizes)
    if sum(sizes) > num_molecules:
        raise DatasetFormatError(
            f"the QM9 source holds {num_molecules:,} molecules, fewer than the "
            f"{sum(sizes):,} the splits need ({sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,}); "
            "pass smaller split_sizes=(train, val, test) for a small source"
        )
    start = sum(sizes[: _SPLITS.index(split)])
    perm = np.random.default_rng(seed).permutation(num_molecules)
    return perm[start : start + sizes[_SPLITS.index(split)]]


def _check_sizes(split_sizes: Sequence[int]) -> tuple[int, int, int]:
    sizes = tuple(split_sizes)
    if len(sizes) != 3 or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes
    ):
        raise ValueError(
            f"split_sizes must be three positive integers (train, val, test), got {split_sizes!r}"
        )
    return int(sizes[0]), int(sizes[1]), int(sizes[2])


def _check_names(names: Sequence[str]) -> None:
    if isinstance(names, str):
        raise TypeError(f"targets must be a sequence of names, got the string {names!r}")
    unknown = [n for n in names if n not in UNITS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"targets must be distinct names among {TARGETS}, got {tuple(names)!r}"
            + (f" (unknown: {unknown})" if unknown else "")
        )


class QM9(Dataset):
    """QM9's eleven benchmark targets on dense padded molecules (no graph library needed).

    Sample ``i`` is ``(x, {name: y})``: ``x`` float32 ``(29, 4)``, one row per atom slot;
    column 0 is the atomic number (1 H, 6 C, 7 N, 8 O, 9 F; **0 marks padding**), columns 1-3
    the coordinates in Å as in QM9's files (not centred; 0 for padding). Atoms come first in
    the file's order, then the padding, so ``mask = x[..., 0] > 0``. Each ``y`` is a float32
    scalar: the target in `UNITS`, or ``(value - mean) / std`` with ``normalize=True``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (see `split_indices`).
        targets: names among `TARGETS` (default: all eleven, in the papers' order).
        size: keep the first ``size`` molecules of the split (reproducible quick runs).
        root: cache folder of the parsed ``.npz`` (default ``$GRADBALANCE_DATA`` or
            ``~/.cache/gradbalance``).
        seed: seeds the permutation behind the splits.
        normalize: ``True`` or ``"standardize"`` (default): ``(value - mean) / std`` with the
            full training split's statistics, as the papers train; ``"center"``: ``value -
            mean``, each target keeping its own unit and scale (they span orders of
            magnitude: what loss balancing is for); ``False`` or ``"none"``: the values
            themselves.
        source: folder of qm9pack-format ``qm9_part*.csv`` files (default: the installed
            ``qm9pack``); nothing is downloaded.
        split_sizes: ``(train, val, test)`` sizes, default `SPLIT_SIZES`; smaller ones let
            small sources (test fixtures) work.

    Attributes:
        x: float32 ``(n, 29, 4)``, the molecules (layout above).
        y: float32 ``(n, len(tasks))``, the targets (normalised if ``normalize``).
        mean: float32 ``(len(tasks),)``, the training split's mean in `UNITS` (computed
            whether or not ``normalize`` is set).
        std: float32 ``(len(tasks),)``, the training split's unbiased std in `UNITS`.
        indices: int64 ``(n,)``, rows in the full data (sorted by QM9 number).
        qm9_index: int64 ``(n,)``, QM9 molecule numbers (``dsgdb9nsd_<number>.xyz``).
        num_atoms: int64 ``(n,)``, atoms per molecule.
        tasks: the target names, in the order of ``y``'s columns.
        units: ``{name: unit}`` for ``tasks``.

    Raises:
        ImportError: ``source`` is not given, nothing is cached and ``qm9pack`` is missing.
        DatasetNotFoundError: the source folder or its CSV files are missing.
        DatasetFormatError: a CSV file is broken, or the source holds fewer molecules than
            ``split_sizes`` need.

    Example:
        >>> from gradbalance.data import QM9
        >>> train = QM9("train", size=1000)  # doctest: +SKIP
        >>> x, y = train[0]  # doctest: +SKIP
        >>> x.shape, y["u0"].shape  # doctest: +SKIP
        (torch.Size([29, 4]), torch.Size([]))
        >>> train.denormalize(train.y)[0, 6]  # U0 atomization energy in eV  # doctest: +SKIP
    """

    x: Tensor
    y: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        split: str = "train",
        targets: Sequence[str] = TARGETS,
        *,
        size: int | None = None,
        root: str | os.PathLike[str] | None = None,
        seed: int = 0,
        normalize: bool | str = True,
        source: str | os.PathLike[str] | None = None,
        split_sizes: tuple[int, int, int] | None = None,
    ) -> None:
        _check_names(targets)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive integer or None, got {size!r}")
        sizes = _check_sizes(SPLIT_SIZES if split_sizes is None else split_sizes)
        arrays = load_arrays(source, root)
        n_all = len(arrays["index"])
        rows = split_indices(n_all, split, seed, sizes)
        if size is not None:
            if size > len(rows):
                raise ValueError(f"size={size} exceeds the {len(rows):,} molecules of {split!r}")
            rows = rows[:size]
        train_rows = split_indices(n_all, "train", seed, sizes)
        z, props = arrays["z"], arrays["properties"]
        stats = benchmark_targets(z[train_rows], props[train_rows], targets)
        mean = stats.mean(axis=0)
        std = stats.std(axis=0, ddof=1) if len(train_rows) > 1 else np.ones_like(mean)
        std[~(std > 0)] = 1.0  # a constant target: nothing to scale
        values = benchmark_targets(z[rows], props[rows], targets)
        mode = _NORMALIZE.get(normalize) if isinstance(normalize, (bool, str)) else None
        if mode is None:
            raise ValueError(
                f"normalize must be True, False, 'standardize', 'center' or 'none', got "
                f"{normalize!r}"
            )
        if mode != "none":
            values = values - mean
        if mode == "standardize":
            values = values / std

        self.split, self.seed, self.split_sizes = split, seed, sizes
        self.tasks = tuple(targets)
        self.units = {name: UNITS[name] for name in self.tasks}
        #: ``"standardize"``, ``"center"`` or ``"none"``: how ``y`` relates to `UNITS`.
        self.normalization = mode
        self.mean = torch.from_numpy(mean.astype(np.float32))
        self.std = torch.from_numpy(std.astype(np.float32))
        self.indices = torch.from_numpy(rows.astype(np.int64))
        self.qm9_index = torch.from_numpy(arrays["index"][rows].astype(np.int64))
        self.num_atoms = torch.from_numpy(arrays["num_atoms"][rows].astype(np.int64))
        x = np.concatenate([z[rows, :, None].astype(np.float32), arrays["pos"][rows]], axis=2)
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(values.astype(np.float32))

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        y = self.y[index]
        return self.x[index], {name: y[j] for j, name in enumerate(self.tasks)}

    def tensors(self) -> tuple[Tensor, dict[str, Tensor]]:
        """All molecules and targets at once: ``(x, {name: (n,) tensor})``."""
        return self.x, {name: self.y[:, j] for j, name in enumerate(self.tasks)}

    @overload
    def denormalize(self, pred: Tensor) -> Tensor: ...

    @overload
    def denormalize(self, pred: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def denormalize(self, pred: Tensor | Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Map predictions back to `UNITS` (``pred * std + mean``; unchanged if not normalised).

        Args:
            pred: a tensor ``(..., len(tasks))`` in the order of ``tasks``, or a dict
                ``{name: tensor}`` (each of any shape, e.g. ``(batch,)`` or ``(batch, 1)``).

        Example:
            >>> ds = QM9.__new__(QM9)  # a stand-in with statistics only
            >>> ds.tasks, ds.normalization = ("mu", "cv"), "standardize"
            >>> ds.mean, ds.std = torch.tensor([2.7, 31.6]), torch.tensor([1.5, 4.1])
            >>> ds.denormalize({"cv": torch.tensor([0.0, 1.0])})["cv"]
            tensor([31.6000, 35.7000])
        """
        if isinstance(pred, Mapping):
            unknown = [k for k in pred if k not in self.tasks]
            if unknown:
                raise KeyError(
                    f"denormalize: unknown target(s) {unknown}; this QM9 has {self.tasks}"
                )
            if not self.normalized:
                return dict(pred)
            out = {}
            for name, value in pred.items():
                j = self.tasks.index(name)
                out[name] = value * self.target_scale[j].to(value) + self.mean[j].to(value)
            return out
        if pred.shape[-1:] != (len(self.tasks),):
            raise ValueError(
                f"denormalize expects a last dimension of {len(self.tasks)} (one per target of "
                f"{self.tasks}), got shape {tuple(pred.shape)}; pass a dict for other layouts"
            )
        if not self.normalized:
            return pred
        return pred * self.target_scale.to(pred) + self.mean.to(pred)

    @property
    def normalized(self) -> bool:
        """Whether ``y`` differs from the values in `UNITS` (standardised or centred)."""
        return self.normalization != "none"

    @property
    def target_scale(self) -> Tensor:
        """Per target, the factor from ``y``'s unit to `UNITS` (an MAE of ``y`` times it is
        the MAE in `UNITS`): ``std`` when standardised, else ones."""
        if self.normalization == "standardize":
            return self.std
        return torch.ones_like(self.std)

    def __repr__(self) -> str:
        return (
            f"QM9(split={self.split!r}, n={len(self)}, targets={len(self.tasks)}, "
            f"normalized={self.normalized})"
        )
