"""IDX reader/writer: the byte format, gzip handling and clear errors on broken files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance.data import DatasetFormatError, DatasetNotFoundError, read_idx, write_idx
from gradbalance.errors import GradBalanceError


def test_header_bytes_follow_the_spec(tmp_path):
    path = tmp_path / "x-idx2-ubyte"
    write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
    raw = path.read_bytes()
    # 0x00 0x00, type 0x08 (ubyte), 2 dims, sizes 2 and 3 as big-endian uint32, then the data
    assert raw == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])


def test_reads_big_endian_ints_written_by_hand(tmp_path):
    path = tmp_path / "ints-idx1-int"
    path.write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + (258).to_bytes(4, "big") + bytes(4))
    out = read_idx(path)
    assert out.dtype == np.int32 and out.tolist() == [258, 0]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_roundtrip_plain_and_gzip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    write_idx(path, images)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, images)


def test_gzip_is_detected_by_content_not_name(tmp_path):
    plain = tmp_path / "a"
    write_idx(plain, np.array([1, 2, 3], dtype=np.uint8))
    disguised = tmp_path / "labels-idx1-ubyte"
    disguised.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_idx(disguised).tolist() == [1, 2, 3]


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(["u1", "i1", "i2", "i4", "f4", "f8"]),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
)
def test_roundtrip_any_dtype_and_shape(tmp_path_factory, dtype, shape):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    path = tmp_path_factory.mktemp("idx") / "x.gz"
    write_idx(path, array)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == tuple(shape)
    np.testing.assert_array_equal(out, array)


def _broken(tmp_path, data: bytes, name: str = "broken-idx3-ubyte"):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DatasetFormatError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, GradBalanceError)
    return str(info.value)


def test_bad_magic_number(tmp_path):
    msg = _broken(tmp_path, bytes([1, 2, 8, 1, 0, 0, 0, 1, 7]))
    assert "magic number" in msg


def test_unknown_type_code(tmp_path):
    assert "type code 0x07" in _broken(tmp_path, bytes([0, 0, 7, 1, 0, 0, 0, 1, 7]))


def test_truncated_payload(tmp_path):
    msg = _broken(tmp_path, bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]))
    assert "truncated" in msg and "(2, 2)" in msg


def test_trailing_bytes(tmp_path):
    assert "unexpected bytes" in _broken(tmp_path, bytes([0, 0, 8, 1, 0, 0, 0, 1, 5, 6]))


def test_truncated_header(tmp_path):
    assert "header" in _broken(tmp_path, bytes([0, 0, 8, 3, 0, 0]))
    assert "too short" in _broken(tmp_path, bytes([0, 0]), name="tiny")


def test_corrupt_gzip(tmp_path):
    msg = _broken(tmp_path, b"\x1f\x8b" + b"not really gzip data", name="x.gz")
    assert "cannot read" in msg


def test_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        read_idx(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint32))
