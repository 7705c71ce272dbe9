"""Byte streams stored LZMA2-compressed (raw format, the standard library's `lzma`), and read back without
ever inflating past the length the spec announces."""

from __future__ import annotations

import lzma

import numpy as np

from varstudent.errors import ArtifactError

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def pack_bytes(stream: np.ndarray) -> np.ndarray:
    """uint8 stream -> its raw LZMA2 compression, as a uint8 array (what the safetensors file holds)."""
    packed = lzma.compress(stream.astype(np.uint8).tobytes(), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return np.frombuffer(packed, dtype=np.uint8).copy()


def unpack_bytes(packed: np.ndarray, length: int, where: str) -> np.ndarray:
    """The `length` bytes packed by pack_bytes; a clear error for a corrupt stream or another length."""
    if length < 0:  # lzma reads a negative max_length as "no limit"
        raise ArtifactError(f"{where}: the spec and row_entries imply a negative length ({length})")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:  # never inflate past what the spec announces (a crafted stream could otherwise fill memory)
        stream = decompressor.decompress(packed.astype(np.uint8).tobytes(), max_length=length + 1)
    except lzma.LZMAError as exc:
        raise ArtifactError(f"{where}: not a valid LZMA2 stream ({exc})") from None
    if len(stream) > length:
        raise ArtifactError(f"{where}: inflates past the {length} bytes the spec and row_entries imply")
    if len(stream) < length:
        raise ArtifactError(f"{where}: holds {len(stream)} bytes, the spec and row_entries imply {length}")
    return np.frombuffer(stream, dtype=np.uint8)
