"""Reader for IDX files, the array format that MNIST and Fashion-MNIST are distributed in.

An IDX file is a 4-byte magic number -- two zero bytes, a data-type code and the number of
dimensions -- followed by one big-endian unsigned 32-bit size per dimension and then the values,
big-endian, in C order. Files may be gzip-compressed (detected from their content, not their name).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from sparsejax.data.errors import DatasetFileError

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX data-type codes (third byte of the magic number) and the dtypes they stand for."""

_MAGIC_BYTES = 4
_DIM_BYTES = 4
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Returns the file's content, decompressed if it is gzip-compressed."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFileError(
            f"{os.fspath(path)!r} is a corrupt or truncated gzip file ({err}); "
            "download it again."
        ) from err


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file, plain or gzip-compressed.

    Args:
      path: the file to read.

    Returns:
      A writable array with the file's shape and dtype, in native byte order.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      DatasetFileError: if the file is not a valid IDX file: a bad magic number, an unknown
        data-type code, or a size that does not match the header (truncated or with trailing
        bytes).
    """
    name = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < _MAGIC_BYTES:
        raise DatasetFileError(
            f"{name!r} is too short ({len(data)} bytes) to be an IDX file; download it again."
        )
    zero0, zero1, code, ndim = data[:_MAGIC_BYTES]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise DatasetFileError(
            f"{name!r} is not an IDX file: magic number 0x{data[:_MAGIC_BYTES].hex()} should be "
            "0x0000 followed by a data-type code in "
            f"{{{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}}} and the number of dimensions."
        )
    header_bytes = _MAGIC_BYTES + _DIM_BYTES * ndim
    if len(data) < header_bytes:
        raise DatasetFileError(
            f"{name!r} is truncated: its header declares {ndim} dimensions but the file has only "
            f"{len(data)} bytes; download it again."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=_MAGIC_BYTES))
    dtype = IDX_DTYPES[code]
    expected = header_bytes + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header declares"
        raise DatasetFileError(
            f"{name!r} is {problem}: a {dtype.name} array of shape {shape} needs {expected} "
            f"bytes but the (decompressed) file has {len(data)}; download it again."
        )
    values = np.frombuffer(data, dtype, offset=header_bytes).reshape(shape)
    return values.astype(dtype.newbyteorder("="))
