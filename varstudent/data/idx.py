"""Decode IDX files (the MNIST container format).

Layout: 2 zero bytes, a dtype byte (only 0x08 = uint8 is used by the datasets we read), an ndim byte,
ndim big-endian uint32 sizes, then the raw data in C order. Anything that does not match exactly is
rejected, because a silently mis-shaped dataset would only show up later as a mysteriously bad model.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from varstudent.errors import DataError

# dtype byte -> numpy dtype. The IDX spec also has int8/int16/int32/float/double, but no dataset we
# read uses them; refusing them is clearer than decoding with a guessed byte order.
_DTYPES: dict[int, np.dtype] = {0x08: np.dtype(np.uint8)}
_MAX_NDIM = 4


def read_idx(data: bytes, name: str) -> np.ndarray:
    """Decode one IDX blob; `name` is only used in error messages.

    The result is a read-only view of `data` (no copy): callers that need to write must copy.
    """
    if len(data) == 0:
        raise DataError(f"{name}: empty file, expected IDX data")
    if len(data) < 4:
        raise DataError(f"{name}: truncated header ({len(data)} bytes, need at least 4)")
    if data[0] != 0 or data[1] != 0:
        hint = " (it looks gzip-compressed: give it a .gz suffix)" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{name}: bad magic {data[:2].hex()}, expected 0000; not an IDX file{hint}")
    dtype_byte, ndim = data[2], data[3]
    if dtype_byte not in _DTYPES:
        raise DataError(f"{name}: unsupported IDX dtype byte 0x{dtype_byte:02x}, only 0x08 (uint8) is supported")
    if not 1 <= ndim <= _MAX_NDIM:
        raise DataError(f"{name}: unsupported number of dimensions {ndim}, expected 1 to {_MAX_NDIM}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{name}: truncated header ({len(data)} bytes, need {header_len} for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _DTYPES[dtype_byte]
    expected = math.prod(shape) * dtype.itemsize
    got = len(data) - header_len
    if got < expected:
        raise DataError(f"{name}: truncated data, header says shape {shape} ({expected} bytes) "
                        f"but only {got} bytes follow")
    if got > expected:
        raise DataError(f"{name}: {got - expected} trailing bytes after the data for shape {shape}")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_len).reshape(shape)


def read_idx_file(path: Path | str) -> np.ndarray:
    """Read an IDX file from disk; a `.gz` suffix means gzip-compressed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            # gzip raises BadGzipFile (an OSError) for bad magic and EOFError for a cut-off stream.
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return read_idx(raw, str(path))
