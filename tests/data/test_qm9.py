"""QM9: CSV parsing, units, splits, normalisation, the .npz cache and the errors.

Everything runs on the committed 60-molecule fixture (``tests/data/fixtures/qm9``); the last
test checks the full data and runs only when ``qm9pack`` is installed.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gradbalance.data import QM9, DatasetFormatError, DatasetNotFoundError, qm9_source
from gradbalance.data.qm9 import (
    HARTREE_TO_EV,
    PYG_INDEX,
    SPLIT_SIZES,
    TARGETS,
    UNITS,
    benchmark_targets,
    split_indices,
)
from gradbalance.errors import GradBalanceError

FIXTURE = Path(__file__).parent / "fixtures" / "qm9"
SIZES = (40, 10, 10)
# DeepChem's gdb9.sdf.csv (PyG's source) for methane: u0_atom, u298_atom, h298_atom, g298_atom
# in kcal/mol; PyG multiplies them by KCALMOL2EV.
METHANE_ATOMIZATION_KCAL = (-395.999594594, -398.643290011, -401.014646522, -372.471772148)
KCALMOL2EV = 0.04336414


def qm9(tmp_path: Path, split: str = "train", **kwargs) -> QM9:
    kwargs.setdefault("split_sizes", SIZES)
    kwargs.setdefault("source", FIXTURE)
    return QM9(split, root=tmp_path, **kwargs)


def csv_rows() -> dict[int, dict[str, str]]:
    rows = {}
    for path in sorted(FIXTURE.glob("qm9_part*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows[int(row["Index"])] = row
    return rows


def all_splits(tmp_path: Path, **kwargs) -> dict[str, QM9]:
    return {s: qm9(tmp_path, s, **kwargs) for s in ("train", "val", "test")}


# ---------------------------------------------------------------- parsing


def test_fixture_is_small_and_in_qm9pack_format():
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 100_000
    header = next(csv.reader(open(FIXTURE / "qm9_part1.csv", newline="")))
    assert header[:8] == [
        "XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Stoichiometry", "Elements", "XYZ_Ang"
    ]  # fmt: skip
    assert set(qm9_source.PROPERTY_COLUMNS) <= set(header)


def test_parse_counts_padding_and_order():
    arrays = qm9_source.parse_csv(FIXTURE)
    rows = csv_rows()
    assert len(arrays["index"]) == len(rows) == 60
    assert list(arrays["index"]) == sorted(rows)
    z, pos, num = arrays["z"], arrays["pos"], arrays["num_atoms"]
    assert z.dtype == np.int8 and z.shape == (60, 29)
    assert pos.dtype == np.float32 and pos.shape == (60, 29, 3)
    assert arrays["properties"].dtype == np.float64 and arrays["properties"].shape == (60, 15)
    for i, index in enumerate(arrays["index"]):
        n = int(rows[int(index)]["N_atoms"])
        assert num[i] == n
        assert (z[i, :n] > 0).all() and (z[i, n:] == 0).all()
        assert (pos[i, n:] == 0).all()
        assert set(z[i, :n].tolist()) <= {1, 6, 7, 8, 9}


def test_methane_ammonia_water_atoms_and_coordinates():
    arrays = qm9_source.parse_csv(FIXTURE)
    assert list(arrays["index"][:3]) == [1, 2, 3]
    assert arrays["z"][0, :5].tolist() == [6, 1, 1, 1, 1]  # CH4
    assert arrays["z"][1, :4].tolist() == [7, 1, 1, 1]  # NH3
    assert arrays["z"][2, :3].tolist() == [8, 1, 1]  # H2O
    methane = np.array(
        [
            [-0.0126981359, 1.0858041578, 0.0080009958],
            [0.002150416, -0.0060313176, 0.0019761204],
            [1.0117308433, 1.4637511618, 0.0002765748],
            [-0.540815069, 1.4475266138, -0.8766437152],
            [-0.5238136345, 1.4379326443, 0.9063972942],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(arrays["pos"][0, :5], methane)


def test_items_layout_matches_the_arrays(tmp_path):
    arrays = qm9_source.parse_csv(FIXTURE)
    for ds in all_splits(tmp_path).values():
        rows = ds.indices.numpy()
        assert ds.x.shape == (len(ds), 29, 4) and ds.x.dtype == torch.float32
        np.testing.assert_array_equal(ds.x[..., 0].numpy(), arrays["z"][rows])
        np.testing.assert_array_equal(ds.x[..., 1:].numpy(), arrays["pos"][rows])
        assert ds.qm9_index.tolist() == arrays["index"][rows].tolist()
        assert ((ds.x[..., 0] > 0).sum(1) == ds.num_atoms).all()
        x, y = ds[0]
        assert x.shape == (29, 4) and list(y) == list(TARGETS)
        assert all(v.shape == () and v.dtype == torch.float32 for v in y.values())


def test_dataloader_batches_and_tensors(tmp_path):
    ds = qm9(tmp_path, targets=("u0", "mu"))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 29, 4) and sorted(y) == ["mu", "u0"] and y["u0"].shape == (8,)
    xs, ys = ds.tensors()
    assert xs.shape == (40, 29, 4) and ys["mu"].shape == (40,)
    torch.testing.assert_close(ys["u0"][:8], y["u0"])
    assert repr(ds) == "QM9(split='train', n=40, targets=2, normalized=True)"


# ---------------------------------------------------------------- units


def test_methane_atomization_energies_by_hand_and_against_pyg_source(tmp_path):
    # QM9's atomref.txt (hartree): C and H for U0, U, H, G
    carbon = (-37.846772, -37.845355, -37.844411, -37.861317)
    hydrogen = (-0.500273, -0.498857, -0.497912, -0.510927)
    totals = (-40.47893, -40.476062, -40.475117, -40.498597)  # methane's U0, U, H, G (Ha)
    by_hand = [(e - (c + 4 * h)) * 27.211386246 for e, c, h in zip(totals, carbon, hydrogen)]
    assert by_hand[0] == pytest.approx(-17.17218, abs=1e-5)
    arrays = qm9_source.parse_csv(FIXTURE)
    got = benchmark_targets(
        arrays["z"][:1], arrays["properties"][:1], ("u0", "u298", "h298", "g298")
    )
    np.testing.assert_allclose(got[0], by_hand, rtol=0, atol=1e-9)
    pyg = np.array(METHANE_ATOMIZATION_KCAL) * KCALMOL2EV
    np.testing.assert_allclose(got[0], pyg, rtol=0, atol=1e-5)


def test_every_target_in_pyg_units(tmp_path):
    rows = csv_rows()
    for ds in all_splits(tmp_path, normalize=False).values():
        for k, index in enumerate(ds.qm9_index.tolist()):
            row, (_, y) = rows[index], ds[k]

            def raw(column: str, row=row) -> float:
                return float(row[column])

            expect = {
                "mu": raw("Dipole_debye"),
                "alpha": raw("Polarizability_bohr3"),
                "homo": raw("HOMO_au") * HARTREE_TO_EV,
                "lumo": raw("LUMO_au") * HARTREE_TO_EV,
                "r2": raw("R2_bohr2"),
                "zpve": raw("ZPVE_au") * HARTREE_TO_EV,
                "cv": raw("Heatcapacity_Cv_cal_mol_K"),
            }
            for name, value in expect.items():
                assert float(y[name]) == pytest.approx(value, rel=1e-6, abs=1e-6), (index, name)
            assert float(y["u0"]) < 0 and float(y["g298"]) > float(y["u0"])


def test_unit_tables_cover_the_eleven_targets():
    names = "mu alpha homo lumo r2 zpve u0 u298 h298 g298 cv"
    assert names.split() == list(TARGETS)
    assert set(UNITS) == set(PYG_INDEX) == set(TARGETS)
    assert [PYG_INDEX[t] for t in TARGETS] == [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]


# ---------------------------------------------------------------- splits


def test_splits_are_reproducible_disjoint_and_seeded(tmp_path):
    a = {s: d.indices.tolist() for s, d in all_splits(tmp_path).items()}
    b = {s: d.indices.tolist() for s, d in all_splits(tmp_path).items()}
    assert a == b
    assert [len(a[s]) for s in ("train", "val", "test")] == list(SIZES)
    assert len(set(a["train"]) | set(a["val"]) | set(a["test"])) == sum(SIZES)
    c = {s: d.indices.tolist() for s, d in all_splits(tmp_path, seed=1).items()}
    assert c["train"] != a["train"]


def test_benchmark_split_sizes():
    assert SPLIT_SIZES == (110_000, 10_000, 10_000)
    parts = [split_indices(130_831, s, seed=0) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [110_000, 10_000, 10_000]
    assert len(np.unique(np.concatenate(parts))) == 130_000
    np.testing.assert_array_equal(parts[1], split_indices(130_831, "val", seed=0))


def test_size_takes_the_first_molecules_of_the_split(tmp_path):
    full, small = qm9(tmp_path, "val"), qm9(tmp_path, "val", size=4)
    assert len(small) == 4 and small.indices.tolist() == full.indices[:4].tolist()
    torch.testing.assert_close(small.y, full.y[:4])
    torch.testing.assert_close(small.mean, full.mean)  # statistics of the full training split
    with pytest.raises(ValueError, match="size=11 exceeds"):
        qm9(tmp_path, "val", size=11)
    with pytest.raises(ValueError, match="positive integer"):
        qm9(tmp_path, size=0)


# ---------------------------------------------------------------- normalisation


def test_train_targets_are_standardised_and_denormalize_inverts(tmp_path):
    train, raw = qm9(tmp_path), qm9(tmp_path, normalize=False)
    torch.testing.assert_close(train.y.mean(0), torch.zeros(11), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.y.std(0), torch.ones(11), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.mean, raw.y.double().mean(0).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(train.denormalize(train.y), raw.y, rtol=1e-5, atol=1e-4)
    val, val_raw = qm9(tmp_path, "val"), qm9(tmp_path, "val", normalize=False)
    torch.testing.assert_close(val.mean, train.mean)
    torch.testing.assert_close(val.denormalize(val.y), val_raw.y, rtol=1e-5, atol=1e-4)
    _, y = val.tensors()
    back = val.denormalize({"u0": y["u0"], "cv": y["cv"][:, None]})
    torch.testing.assert_close(back["u0"], val_raw.y[:, 6], rtol=1e-5, atol=1e-4)
    assert back["cv"].shape == (10, 1)
    assert raw.denormalize(raw.y) is raw.y


def test_denormalize_rejects_wrong_layouts(tmp_path):
    ds = qm9(tmp_path, targets=("mu", "u0"))
    with pytest.raises(ValueError, match="last dimension of 2"):
        ds.denormalize(torch.zeros(3, 11))
    with pytest.raises(KeyError, match="unknown target"):
        ds.denormalize({"cv": torch.zeros(3)})


def test_target_subset_keeps_the_order_given(tmp_path):
    full, sub = qm9(tmp_path, normalize=False), qm9(tmp_path, targets=("cv", "mu"), normalize=False)
    torch.testing.assert_close(sub.y, full.y[:, [10, 0]])
    assert sub.tasks == ("cv", "mu") and sub.units == {"cv": "cal/(mol K)", "mu": "D"}


# ---------------------------------------------------------------- cache


def test_second_load_reads_only_the_npz(tmp_path, monkeypatch):
    first = qm9(tmp_path)
    files = [p.name for p in tmp_path.iterdir()]
    assert len(files) == 1 and files[0].startswith("qm9-") and files[0].endswith(".npz")

    def no_parse(folder):
        raise AssertionError("the CSV files were parsed again")

    monkeypatch.setattr(qm9_source, "parse_csv", no_parse)
    second = qm9(tmp_path)
    torch.testing.assert_close(second.x, first.x)
    torch.testing.assert_close(second.y, first.y)


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADBALANCE_DATA", str(tmp_path / "env"))
    QM9("test", source=FIXTURE, split_sizes=SIZES)
    assert len(list((tmp_path / "env").glob("qm9-*.npz"))) == 1
    assert qm9_source.cache_dir() == tmp_path / "env"


def test_default_cache_is_read_without_qm9pack(tmp_path, monkeypatch):
    qm9(tmp_path / "a")
    (cached,) = (tmp_path / "a").glob("qm9-*.npz")
    shutil.copy(cached, tmp_path / "qm9.npz")  # as if built from the installed qm9pack
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    ds = QM9("val", root=tmp_path, split_sizes=SIZES)
    assert len(ds) == 10
    with pytest.raises(ImportError, match="pip install qm9pack"):
        QM9("val", root=tmp_path / "empty", split_sizes=SIZES)


def test_broken_cache_is_rebuilt_with_a_warning(tmp_path):
    first = qm9(tmp_path)
    (cached,) = tmp_path.glob("qm9-*.npz")
    cached.write_bytes(b"not a zip file")
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        again = qm9(tmp_path)
    torch.testing.assert_close(again.y, first.y)
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary file left


def test_a_changed_source_gets_its_own_cache(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    qm9(tmp_path / "cache", source=src)
    (src / "qm9_part3.csv").unlink()
    ds = QM9("train", source=src, root=tmp_path / "cache", split_sizes=(20, 10, 10))
    assert len(list((tmp_path / "cache").glob("qm9-*.npz"))) == 2
    assert ds.qm9_index.max() < 89_000  # only parts 1 and 2 remain


# ---------------------------------------------------------------- errors


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown: \\['U0'\\]"):
        qm9(tmp_path, targets=("U0",))
    with pytest.raises(TypeError, match="sequence of names"):
        qm9(tmp_path, targets="mu")
    with pytest.raises(ValueError, match="distinct"):
        qm9(tmp_path, targets=("mu", "mu"))
    with pytest.raises(ValueError, match="split must be one of"):
        qm9(tmp_path, "validation")
    with pytest.raises(ValueError, match="three positive integers"):
        qm9(tmp_path, split_sizes=(40, 10))


def test_source_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        QM9(source=tmp_path / "nowhere", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"no qm9_part\*\.csv"):
        QM9(source=tmp_path / "empty", root=tmp_path)
    with pytest.raises(DatasetFormatError, match="pass smaller split_sizes") as info:
        QM9(source=FIXTURE, root=tmp_path)
    assert isinstance(info.value, GradBalanceError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('"XYZ_Ang"', '"XYZ"', 1).replace("XYZ_Ang,", "XYZ,", 1), "lacks"),
        (lambda t: t.replace('"InChI=1S/CH4/h1H4",5,', '"InChI=1S/CH4/h1H4",6,'), "line 2"),
        (lambda t: t.replace("1.0858041578", "1.08x"), "non-number"),
        (lambda t: t.replace("'C','H','H','H','H'", "'C','H','H','H','Cl'"), "unknown element"),
    ],
)
def test_broken_csv_names_the_problem(tmp_path, edit, message):
    src = tmp_path / "src"
    src.mkdir()
    text = (FIXTURE / "qm9_part1.csv").read_text()
    (src / "qm9_part1.csv").write_text(edit(text))
    with pytest.raises(DatasetFormatError, match=message):
        qm9_source.parse_csv(src)


# ---------------------------------------------------------------- the full data (qm9pack)


@pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason="qm9pack not installed")
def test_full_qm9_from_qm9pack(tmp_path):
    arrays = qm9_source.load_arrays(root=tmp_path)
    assert len(arrays["index"]) == 130_831 == 133_885 - 3_054
    assert arrays["index"][0] == 1 and arrays["index"][-1] == 133_885
    assert arrays["num_atoms"].max() == 29 and arrays["num_atoms"].min() >= 1
    test = QM9("test", root=tmp_path, normalize=False)
    assert len(test) == 10_000
    # PyG-scale values (training means, eV for energies): U0_atom about -76 eV, cv about 31.6
    assert -80 < float(test.mean[6]) < -72 and 30 < float(test.mean[10]) < 33


def test_centred_targets_keep_their_units(tmp_path):
    raw = qm9(tmp_path, normalize=False)
    centred = qm9(tmp_path, normalize="center")
    standard = qm9(tmp_path, normalize="standardize")
    assert centred.normalization == "center" and standard.normalization == "standardize"
    # computed in float64, then stored in float32
    torch.testing.assert_close(centred.y, raw.y - raw.mean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(standard.y, (raw.y - raw.mean) / raw.std, rtol=1e-5, atol=1e-5)
    # one unit of y is one unit of UNITS when centred; std units when standardised
    torch.testing.assert_close(centred.target_scale, torch.ones(len(TARGETS)))
    torch.testing.assert_close(standard.target_scale, standard.std)
    torch.testing.assert_close(centred.denormalize(centred.y), raw.y, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(standard.denormalize(standard.y), raw.y, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="normalize must be"):
        qm9(tmp_path, normalize="minmax")
