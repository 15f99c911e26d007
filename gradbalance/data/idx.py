"""Reading and writing IDX files, the format of MNIST, Fashion-MNIST, KMNIST and EMNIST.

An IDX file is a header followed by a dense big-endian array (LeCun et al., *The MNIST database
of handwritten digits*, file format section):

* bytes 0-1: zero;
* byte 2: the element type, ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
  ``0x0D`` float32, ``0x0E`` float64;
* byte 3: the number of dimensions ``d``;
* ``d`` big-endian uint32 sizes, then the ``prod(sizes)`` elements in row-major order.

The files are often distributed gzip-compressed (``*.gz``); both forms are read.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from gradbalance.data.errors import DatasetFormatError, DatasetNotFoundError

__all__ = ["read_idx", "write_idx"]

# IDX type code -> big-endian numpy dtype.
_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in _TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == _GZIP_MAGIC:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"IDX file {str(path)!r} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(
            f"cannot read IDX file {str(path)!r}: {exc} (a corrupt or truncated .gz download?)"
        ) from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Compression is detected from the file's first bytes, not its name. The header is checked:
    the two leading zero bytes, a known type code, and a payload of exactly the size the header
    announces.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns:
        The array, with the header's shape and the native-endian version of its dtype
        (``uint8`` for MNIST images and labels).

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetFormatError: the file is not a valid IDX file (bad magic number, unknown type
            code, truncated or with trailing bytes, corrupt gzip stream); the message names it.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from gradbalance.data import read_idx, write_idx
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
        >>> write_idx(path, np.array([3, 1, 4], dtype=np.uint8))
        >>> read_idx(path)
        array([3, 1, 4], dtype=uint8)
    """
    path = Path(path)
    data = _read_bytes(path)
    where = f"IDX file {str(path)!r}"
    if len(data) < 4:
        raise DatasetFormatError(f"{where} is {len(data)} bytes long, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DatasetFormatError(
            f"{where} has magic number {data[:4].hex()}: an IDX file starts with two zero bytes "
            "(e.g. 00000803 for images, 00000801 for labels); is it the right file?"
        )
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        raise DatasetFormatError(
            f"{where} has unknown element type code 0x{code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in _TYPES)})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"{where} is truncated inside its header ({ndim} dimensions)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "followed by unexpected bytes"
        raise DatasetFormatError(
            f"{where} is {problem}: its header announces shape {shape} of {dtype.name}, i.e. "
            f"{expected} bytes of data, but it holds {payload}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``.

    Mostly useful to build small fixtures (see `read_idx` for the format).

    Args:
        path: where to write.
        array: an array of dtype uint8, int8, int16, int32, float32 or float64 with at most 255
            dimensions, each smaller than 2**32.

    Raises:
        TypeError: the dtype has no IDX type code.
        ValueError: too many dimensions or a dimension too large.

    Example:
        >>> import tempfile, os, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "x-idx2-ubyte")
        >>> write_idx(path, np.zeros((2, 3), dtype=np.uint8))
        >>> read_idx(path).shape
        (2, 3)
    """
    array = np.asarray(array)
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(
            f"IDX files cannot hold dtype {array.dtype}; use uint8, int8, int16, int32, "
            "float32 or float64"
        )
    if array.ndim > 255 or any(s >= 2**32 for s in array.shape):
        raise ValueError(f"shape {array.shape} does not fit an IDX header")
    head = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_TYPES[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(head + body)
    else:
        path.write_bytes(head + body)
