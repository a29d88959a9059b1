"""A reader for the IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed.

An IDX file is a 4-byte magic number ``0, 0, type, ndim``, then ``ndim`` big-endian uint32
sizes, then the values in C order (big-endian for multi-byte types).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataFormatError

# IDX type byte -> numpy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_bytes(path: Path) -> bytes:
    """The raw (decompressed) bytes of an IDX file; a ``.gz`` file is detected by its header."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: cannot read it as gzip ({exc}); the file is corrupt or truncated") from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an IDX file into an array of its declared type and shape.

    Raises ``DataFormatError`` naming ``name`` for a bad magic number, an unknown type, or a
    body whose length does not match the declared sizes.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataFormatError(f"{name}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_TYPES:
        raise DataFormatError(f"{name}: unknown IDX type byte 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{name}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[type_code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataFormatError(
            f"{name}: IDX header declares shape {shape} ({expected} bytes) but the file has {len(data)} bytes"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    return parse_idx(read_idx_bytes(path), str(path))
