"""Reader (and writer) of the IDX format of MNIST / Fashion-MNIST, plain or gzipped.

An IDX file is a 4-byte magic ``00 00 T D`` (``T`` the element type, ``D``
the number of dimensions), ``D`` big-endian ``uint32`` sizes, then the
elements in big-endian C order. Gzip is detected from the file's first two
bytes, not its name. Every malformed file raises :class:`IdxError` naming
the path and what is wrong; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "IdxError", "read_idx", "write_idx"]

#: IDX element-type byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """A file that is not a well-formed IDX file (the message names it)."""


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a native-endian numpy array.

    Args:
        path: the file.

    Returns:
        An array of the file's shape and element type (``uint8`` for images
        and labels of (Fashion-)MNIST).

    Raises:
        FileNotFoundError: no such file.
        IdxError: bad magic, unknown element type, or a size that does not
            match the header (truncated or trailing bytes).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise IdxError(f"{path}: not an IDX file (magic {data[:4].hex() or 'empty'})")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{k:02x}" for k in IDX_DTYPES)
        raise IdxError(f"{path}: unknown IDX element type 0x{type_code:02x} (known: {known})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: truncated header ({len(data)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes"
        raise IdxError(
            f"{path}: {what}: shape {tuple(shape)} of {dtype.name} needs {expected} data bytes, "
            f"file has {got}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzipped if ``compress`` or the name ends in ``.gz``).

    Args:
        path: output file.
        array: any array whose dtype is one of :data:`IDX_DTYPES` (native
            byte order is fine).
        compress: force gzip on / off; default from the suffix.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"dtype {array.dtype} has no IDX code; use one of {sorted(codes)}")
    big = array.astype(IDX_DTYPES[code], copy=False)
    payload = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    payload += big.tobytes(order="C")
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
