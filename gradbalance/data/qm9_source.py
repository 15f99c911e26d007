"""Reading QM9 from the CSV files of the ``qm9pack`` package, and caching the result as ``.npz``.

``qm9pack`` (MIT licence, by R. Ramakrishnan, first author of QM9) ships the 130,831
characterised molecules of QM9 as ``qm9pack/data/qm9_part{1,2,3}.csv``: one row per molecule
with, among others, the columns ``Index`` (the QM9 molecule number, 1..133,885),
``N_atoms``, ``Elements`` (``"['C','H','H','H','H']"``), ``XYZ_Ang`` (``"[[x,y,z],...]"`` in
Å) and the fifteen scalar properties in QM9's own units (hartree for energies). We read these
files with the `csv` module and numpy only; ``qm9pack`` itself is never imported (its loader
needs pandas and ``pkg_resources``): `default_source` finds its data folder with
`importlib.util.find_spec`.

`load_arrays` parses the files once and saves the arrays as one ``.npz`` in a cache folder
(written to a temporary file, then renamed, so a crash or a concurrent reader never sees half
a file); later calls read the ``.npz`` only.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gradbalance.data.errors import DatasetFormatError, DatasetNotFoundError

__all__ = [
    "ELEMENTS",
    "MAX_ATOMS",
    "PROPERTY_COLUMNS",
    "cache_dir",
    "default_source",
    "load_arrays",
    "parse_csv",
]

logger = logging.getLogger(__name__)

#: Atomic number of each element QM9 holds.
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
#: Most atoms in a QM9 molecule (hydrogens included); molecules are padded to this length.
MAX_ATOMS = 29
#: The fifteen scalar properties kept, in QM9's order and units (qm9pack's column names).
PROPERTY_COLUMNS = (
    "RotA_GHz",
    "RotB_GHz",
    "RotC_GHz",
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "HOMO_LUMO_gap_au",
    "R2_bohr2",
    "ZPVE_au",
    "InternalEnergy_0K_au",
    "InternalEnergy_298K_au",
    "Enthalphy_298K_au",  # sic: qm9pack's spelling
    "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
)

_STRUCTURE_COLUMNS = ("Index", "N_atoms", "Elements", "XYZ_Ang")
_FORMAT_VERSION = 1
_ARRAYS = ("z", "pos", "num_atoms", "index", "properties")
_INSTALL_HINT = (
    "run `pip install qm9pack` (or `pip install gradbalance[examples]`), or pass source= a "
    "folder holding qm9_part*.csv files in qm9pack's format"
)


def default_source() -> Path:
    """The data folder of the installed ``qm9pack`` package, found without importing it.

    Raises:
        ImportError: ``qm9pack`` is not installed (the message says what to install).
    """
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "QM9 reads the CSV files shipped by the 'qm9pack' package, which is not "
            f"installed: {_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``root``, else ``$GRADBALANCE_DATA``, else ``~/.cache/gradbalance``.

    Example:
        >>> str(cache_dir("/tmp/gb"))
        '/tmp/gb'
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("GRADBALANCE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gradbalance"


def _part_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"QM9 source folder {str(folder)!r} does not exist; {_INSTALL_HINT}"
        )

    def number(p: Path) -> tuple[int, str]:
        digits = p.stem.removeprefix("qm9_part")
        return (int(digits) if digits.isdigit() else 1 << 30, p.name)

    files = sorted(folder.glob("qm9_part*.csv"), key=number)
    if not files:
        raise DatasetNotFoundError(
            f"QM9 source folder {str(folder)!r} holds no qm9_part*.csv file (qm9pack ships "
            "qm9_part1.csv, qm9_part2.csv and qm9_part3.csv)"
        )
    return files


def _floats(text: str, count: int, what: str, path: Path) -> np.ndarray:
    """Parse ``count`` comma-separated numbers; anything else is a format error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (does not raise) on a malformed string
        try:
            values = np.fromstring(text, dtype=np.float64, sep=",")
        except (ValueError, DeprecationWarning) as exc:
            raise DatasetFormatError(f"{str(path)!r}: {what} holds a non-number") from exc
    if values.size != count:
        raise DatasetFormatError(
            f"{str(path)!r}: expected {count} numbers in {what}, read {values.size}"
        )
    return values


def parse_csv(folder: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Parse the ``qm9_part*.csv`` files of ``folder`` into arrays, molecules sorted by ``Index``.

    Returns:
        ``z`` int8 ``(N, 29)`` atomic numbers (0 = padding), ``pos`` float32 ``(N, 29, 3)``
        coordinates in Å (0 for padding), ``num_atoms`` int8 ``(N,)``, ``index`` int32 ``(N,)``
        (QM9 molecule numbers) and ``properties`` float64 ``(N, 15)`` in the order and units
        of `PROPERTY_COLUMNS`.

    Raises:
        DatasetNotFoundError: the folder or its CSV files are missing.
        DatasetFormatError: a file lacks a column, or a row is inconsistent (the message names
            the file and the line).
    """
    indices: list[int] = []
    counts: list[int] = []
    symbols: list[str] = []
    xyz: list[str] = []
    props: list[str] = []
    for path in _part_files(Path(folder)):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            missing = [c for c in (*_STRUCTURE_COLUMNS, *PROPERTY_COLUMNS) if c not in header]
            if missing:
                raise DatasetFormatError(
                    f"{str(path)!r} lacks the column(s) {missing}; expected qm9pack's CSV format"
                )
            i_idx, i_n, i_el, i_xyz = (header.index(c) for c in _STRUCTURE_COLUMNS)
            i_props = [header.index(c) for c in PROPERTY_COLUMNS]
            for line, row in enumerate(reader, start=2):
                try:
                    n = int(row[i_n])
                    indices.append(int(row[i_idx]))
                    elements = row[i_el].strip("[] ").replace("'", "")
                    coords = row[i_xyz].replace("[", "").replace("]", "")
                    prop = ",".join(row[i] for i in i_props)
                except (IndexError, ValueError) as exc:
                    raise DatasetFormatError(f"{str(path)!r}, line {line}: {exc}") from exc
                if not 1 <= n <= MAX_ATOMS or elements.count(",") != n - 1:
                    raise DatasetFormatError(
                        f"{str(path)!r}, line {line}: N_atoms={n} does not match Elements "
                        f"{row[i_el]!r} (1 to {MAX_ATOMS} atoms expected)"
                    )
                if coords.count(",") != 3 * n - 1:
                    raise DatasetFormatError(
                        f"{str(path)!r}, line {line}: XYZ_Ang does not hold {n} x 3 coordinates"
                    )
                counts.append(n)
                symbols.append(elements)
                xyz.append(coords)
                props.append(prop)
    num = np.array(counts, dtype=np.int64)
    n_mol = num.size
    where = Path(folder)
    flat_xyz = _floats(",".join(xyz), 3 * int(num.sum()), "XYZ_Ang", where)
    properties = _floats(",".join(props), n_mol * len(PROPERTY_COLUMNS), "a property", where)
    try:
        flat_z = np.array([ELEMENTS[s] for s in ",".join(symbols).split(",")], dtype=np.int8)
    except KeyError as exc:
        raise DatasetFormatError(
            f"{str(where)!r}: unknown element {exc.args[0]!r} (QM9 has {sorted(ELEMENTS)})"
        ) from exc
    mask = np.arange(MAX_ATOMS) < num[:, None]
    z = np.zeros((n_mol, MAX_ATOMS), dtype=np.int8)
    z[mask] = flat_z
    pos = np.zeros((n_mol, MAX_ATOMS, 3), dtype=np.float32)
    pos[mask] = flat_xyz.reshape(-1, 3)
    index = np.array(indices, dtype=np.int64)
    order = np.argsort(index, kind="stable")
    if n_mol > 1 and not (np.diff(index[order]) > 0).all():
        raise DatasetFormatError(f"{str(where)!r}: a molecule Index appears twice")
    return {
        "z": z[order],
        "pos": pos[order],
        "num_atoms": num[order].astype(np.int8),
        "index": index[order].astype(np.int32),
        "properties": properties.reshape(n_mol, -1)[order],
    }


def _cache_file(directory: Path, source: Path | None) -> Path:
    if source is None:
        return directory / "qm9.npz"
    # A custom folder: key the file on its path and on its files' sizes and times.
    key = [str(source.resolve())]
    for p in _part_files(source):
        st = p.stat()
        key.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha1("\n".join(key).encode()).hexdigest()[:16]
    return directory / f"qm9-{digest}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["format_version"]) != _FORMAT_VERSION:
                return None
            return {name: npz[name] for name in _ARRAYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        warnings.warn(
            f"QM9: ignoring the unreadable cache file {str(path)!r} ({exc}); parsing the CSV "
            "files again",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            payload = {"format_version": np.array(_FORMAT_VERSION), **arrays}
            save: Callable[..., None] = np.savez  # its stubs read **payload as allow_pickle
            with os.fdopen(fd, "wb") as f:
                save(f, **payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(
            f"QM9: could not write the cache file {str(path)!r} ({exc}); the CSV files will be "
            "parsed again next time (set root= or $GRADBALANCE_DATA to a writable folder)",
            RuntimeWarning,
            stacklevel=3,
        )


def load_arrays(
    source: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] | None = None
) -> dict[str, np.ndarray]:
    """The parsed QM9 arrays (see `parse_csv`), from the cache if there, else parsed and cached.

    Args:
        source: folder of qm9pack-format CSV files; ``None`` for the installed ``qm9pack``.
        root: cache folder (see `cache_dir`).

    With ``source=None`` the cache file is ``qm9.npz`` and, once written, is read without
    ``qm9pack`` installed; a custom ``source`` gets ``qm9-<hash>.npz``, the hash covering the
    folder's path and its files' sizes and modification times. Delete the file to rebuild it.
    """
    src = None if source is None else Path(source).expanduser()
    path = _cache_file(cache_dir(root), src)
    if path.is_file():
        cached = _read_cache(path)
        if cached is not None:
            return cached
    folder = default_source() if src is None else src
    start = time.perf_counter()
    arrays = parse_csv(folder)
    logger.info(
        "QM9: parsed %d molecules from %s in %.1f s; caching them in %s",
        len(arrays["index"]),
        folder,
        time.perf_counter() - start,
        path,
    )
    _write_cache(path, arrays)
    return arrays
